"""SkyPilot round trip, live refresh (over real local HTTP) and the cloud API request construction.

SkyPilot reads `SKY_RUNTIME_DIR` when it is imported, so its side runs in a subprocess with the variable set
first and every network connection refused and recorded.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import subprocess
import sys
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import boto3
import pandas as pd
import pytest
from botocore.stub import ANY, Stubber

from thunderops.catalog import (
    OFFER_COLUMNS,
    aws_spot_prices,
    export_skypilot,
    gcp_accelerator_zones,
    load_offers,
    refresh,
    shipped_offers_dir,
    skypilot_catalog_dir,
)
from thunderops.catalog import _refresh_aws_spot as refresh_aws_spot  # noqa: PLC2701 - the AWS step alone

SKY_SIDE = r'''
import json, socket, sys
attempts = []
def refuse(*args, **kwargs):
    attempts.append(repr(args[1:] if args and isinstance(args[0], socket.socket) else args)[:200])
    raise OSError("network disabled by test")
socket.socket.connect = refuse
socket.getaddrinfo = refuse
socket.create_connection = refuse

import sky
from sky import catalog

out = []
for o in json.load(sys.stdin):
    cloud, itype, region, zone = o["cloud"], o["instance_type"], o["region"], o["zone"] or None
    r = {"key": o["key"]}
    price = catalog.get_hourly_cost(itype, use_spot=False, region=region, zone=zone, clouds=cloud)
    spot = None
    if o["price_spot"] is not None:
        spot = catalog.get_hourly_cost(itype, use_spot=True, region=region, zone=zone, clouds=cloud)
    if cloud == "gcp":  # SkyPilot prices the GPUs of a GCP VM separately and adds them to the host
        price += catalog.get_accelerator_hourly_cost(o["accelerator"], o["gpus_per_node"], False, region=region,
                                                     zone=zone, clouds=cloud)
        if spot is not None:
            spot += catalog.get_accelerator_hourly_cost(o["accelerator"], o["gpus_per_node"], True,
                                                        region=region, zone=zone, clouds=cloud)
        res = sky.Resources(infra=f"gcp/{region}/{zone}", instance_type=itype,
                            accelerators={o["accelerator"]: o["gpus_per_node"]})
        r["resources_cost"] = res.get_cost(3600)
    r["price"], r["spot"] = price, spot
    types, _ = catalog.get_instance_type_for_accelerator(o["accelerator"], o["gpus_per_node"], region=region,
                                                         clouds=cloud)
    r["instance_types"] = types
    r["accelerators"] = catalog.get_accelerators_from_instance_type(itype, clouds=cloud)
    r["regions"] = sorted(x.name for x in catalog.get_region_zones_for_instance_type(itype, False, clouds=cloud))
    out.append(r)
print(json.dumps({"results": out, "attempts": attempts}))
'''


def _md5s(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def offers() -> pd.DataFrame:
    return load_offers(shipped_offers_dir())


def _samples(offers: pd.DataFrame) -> list[dict]:
    """Per cloud: its cheapest and dearest offer by $/GPU-h, plus a few more at random (fixed seed)."""
    picks = []
    for _, group in offers.groupby("cloud"):
        picks += [group.iloc[0], group.iloc[-1], *[r for _, r in group.sample(min(3, len(group)), random_state=7).iterrows()]]
    out = []
    for r in picks:
        d = {k: (None if isinstance(v, float) and pd.isna(v) else v) for k, v in r.items()}
        d["gpus_per_node"] = int(d["gpus_per_node"])
        d["key"] = f"{d['cloud']}/{d['region']}/{d['zone']}/{d['instance_type']}"
        out.append(d)
    return out


@pytest.mark.slow
def test_skypilot_reads_our_export_offline_and_agrees(tmp_path, offers):
    runtime = tmp_path / "sky-runtime"
    written = export_skypilot(runtime, offers)
    assert {p.parent.name for p in written if p.name == "vms.csv"} == set(offers["cloud"])
    assert {p.relative_to(skypilot_catalog_dir(runtime)).as_posix() for p in written if p.parent.name == "common"} \
        == {"common/accelerators.csv", "common/metadata.csv"}
    before = _md5s(runtime)
    samples = _samples(offers)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "GOOGLE_", "SKYPILOT_"))}
    env.update(SKY_RUNTIME_DIR=str(runtime), HOME=str(tmp_path / "home"), AWS_EC2_METADATA_DISABLED="true")
    proc = subprocess.run([sys.executable, "-c", SKY_SIDE], input=json.dumps(samples, default=str), env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["attempts"] == [], report["attempts"]  # SkyPilot downloaded nothing
    assert _md5s(runtime) == before  # ... and rewrote none of our files
    assert not (runtime / ".sky" / "catalogs" / "v8" / ".meta").exists()

    for o, r in zip(samples, report["results"], strict=True):
        assert r["price"] == pytest.approx(o["price_ondemand"], abs=1e-5), o["key"]
        if o["price_spot"] is not None:
            assert r["spot"] == pytest.approx(o["price_spot"], abs=1e-5), o["key"]
        if o["cloud"] == "gcp":
            assert r["resources_cost"] == pytest.approx(o["price_ondemand"], abs=1e-5)
        assert o["instance_type"] in r["instance_types"], (o["key"], r["instance_types"])
        assert r["accelerators"] == {o["accelerator"]: o["gpus_per_node"]}
        ours = sorted(offers.loc[(offers.cloud == o["cloud"]) & (offers.instance_type == o["instance_type"]), "region"]
                      .unique())
        assert r["regions"] == ours, o["key"]


def test_export_layout_and_gcp_split(tmp_path, offers):
    export_skypilot(tmp_path, offers)
    base = skypilot_catalog_dir(tmp_path)
    gcp = pd.read_csv(base / "gcp" / "vms.csv")
    assert list(gcp.columns) == ["InstanceType", "vCPUs", "MemoryGiB", "AcceleratorName", "AcceleratorCount",
                                 "GpuInfo", "Region", "AvailabilityZone", "Price", "SpotPrice"]
    hosts, gpus = gcp[gcp.InstanceType.notna()], gcp[gcp.InstanceType.isna()]
    assert hosts.AcceleratorName.isna().all() and gpus.AcceleratorName.notna().all()
    host = hosts[(hosts.InstanceType == "a2-highgpu-1g") & (hosts.AvailabilityZone == "us-central1-a")]
    gpu = gpus[(gpus.AcceleratorName == "A100") & (gpus.AcceleratorCount == 1) & (gpus.AvailabilityZone == "us-central1-a")]
    assert host.Price.iloc[0] == pytest.approx(0.73948) and gpu.Price.iloc[0] == pytest.approx(2.93391)
    aws = pd.read_csv(base / "aws" / "vms.csv")
    assert list(aws.columns)[:6] == ["InstanceType", "AcceleratorName", "AcceleratorCount", "vCPUs", "MemoryGiB",
                                     "GpuInfo"]
    lam = pd.read_csv(base / "lambda" / "vms.csv")
    assert list(lam.columns) == ["InstanceType", "AcceleratorName", "AcceleratorCount", "vCPUs", "MemoryGiB",
                                 "Price", "Region", "GpuInfo", "SpotPrice"]
    assert len(aws) == (offers.cloud == "aws").sum() and len(lam) == (offers.cloud == "lambda").sum()


# --------------------------------------------------------------------------------------------------- refresh


@pytest.fixture
def no_aws_credentials(monkeypatch, tmp_path):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


class _Server:
    """A real HTTP server on 127.0.0.1 serving a directory (and recording request paths)."""

    def __init__(self, root: Path, handler=None):
        self.paths: list[str] = []
        outer = self

        class Handler(handler or SimpleHTTPRequestHandler):
            def log_message(self, *args):
                outer.paths.append(self.path)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(root)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


def test_refresh_offline_says_so_and_changes_nothing(tmp_path):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "offers"
    result = refresh(out_dir=out, base_url=f"http://127.0.0.1:{port}/catalogs/v8", timeout=2)
    assert len(result.lines) == 1 and result.lines[0].startswith("offline: cannot reach 127.0.0.1")
    assert result.changed == [] and not out.exists()


def test_refresh_from_a_live_skypilot_catalog_round_trips(tmp_path, offers, no_aws_credentials):
    served = tmp_path / "served"
    export_skypilot(served, offers)  # SkyPilot's format, as its hosted catalog serves it
    out = tmp_path / "refreshed"
    with _Server(skypilot_catalog_dir(served)) as server:
        result = refresh(clouds=["aws", "GCP", "lambda"], out_dir=out, base_url=server.url, timeout=5,
                         aws_session=boto3.Session(), gcp_client=_FakeGcp({("nvidia-tesla-a100", "us-central1-a")}),
                         gcp_project="p")
    assert sorted(server.paths) == ["/aws/vms.csv", "/gcp/vms.csv", "/lambda/vms.csv"]
    assert any(line.startswith("aws spot: no AWS credentials") for line in result.lines)
    assert sorted(p.name for p in result.changed) == ["aws.csv", "gcp.csv", "lambda.csv"]
    fresh = load_offers(out)
    assert set(fresh["cloud"]) == set(offers["cloud"])  # the other clouds were copied from the shipped set
    cols = [c for c in OFFER_COLUMNS if c not in ("source", "as_of")]
    for cloud in ("aws", "lambda"):
        a = offers[offers.cloud == cloud].sort_values(["instance_type", "region", "zone"])[cols].reset_index(drop=True)
        b = fresh[fresh.cloud == cloud].sort_values(["instance_type", "region", "zone"])[cols].reset_index(drop=True)
        pd.testing.assert_frame_equal(a, b, check_exact=False, atol=1e-5)
        assert fresh[fresh.cloud == cloud]["source"].str.endswith("(live)").all()
        assert (fresh[fresh.cloud == cloud]["as_of"] == dt.date.today().isoformat()).all()
    gcp = fresh[fresh.cloud == "gcp"]
    assert set(zip(gcp.accelerator, gcp.zone, strict=True)) == {("A100", "us-central1-a")}  # GCP lists only that
    expected = offers[(offers.cloud == "gcp") & (offers.accelerator == "A100") & (offers.zone == "us-central1-a")]
    assert sorted(gcp.price_ondemand.round(5)) == sorted(expected.price_ondemand.round(5))
    # load_offers now prefers the refreshed copy under THUNDEROPS_HOME only when refresh wrote there
    assert load_offers()["source"].str.contains("snapshot").all()


class _FakeGcp:
    """Stands in for compute_v1.AcceleratorTypesClient (cloud boundary): one zone list."""

    def __init__(self, pairs):
        self.pairs = pairs

    def aggregated_list(self, project):
        from google.cloud import compute_v1

        for name, zone in sorted(self.pairs):
            yield f"zones/{zone}", compute_v1.AcceleratorTypesScopedList(
                accelerator_types=[compute_v1.AcceleratorType(name=name, zone=zone)])


# ----------------------------------------------------------------------------------- cloud request construction


def _ec2(region="us-east-1"):
    return boto3.client("ec2", region_name=region, aws_access_key_id="AKIDTEST", aws_secret_access_key="secret")


def test_aws_spot_request_pagination_and_newest_price_wins():
    client = _ec2()
    t0 = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
    with Stubber(client) as stub:
        expected = {"InstanceTypes": ["g6.xlarge", "p5.48xlarge"], "ProductDescriptions": ["Linux/UNIX"],
                    "StartTime": ANY}
        stub.add_response("describe_spot_price_history", {
            "SpotPriceHistory": [
                {"InstanceType": "p5.48xlarge", "AvailabilityZone": "us-east-1a", "AvailabilityZoneId": "use1-az1",
                 "SpotPrice": "30.0", "Timestamp": t0},
                {"InstanceType": "p5.48xlarge", "AvailabilityZone": "us-east-1a", "AvailabilityZoneId": "use1-az1",
                 "SpotPrice": "28.5", "Timestamp": t0 + dt.timedelta(hours=1)},
            ], "NextToken": "page2"}, expected)
        stub.add_response("describe_spot_price_history", {
            "SpotPriceHistory": [
                {"InstanceType": "g6.xlarge", "AvailabilityZone": "us-east-1b", "AvailabilityZoneId": "use1-az2",
                 "SpotPrice": "0.31", "Timestamp": t0},
            ]}, {**expected, "NextToken": "page2"})
        prices = aws_spot_prices(client, ["p5.48xlarge", "g6.xlarge", "p5.48xlarge"])
        stub.assert_no_pending_responses()
    assert prices == {("p5.48xlarge", "use1-az1"): 28.5, ("g6.xlarge", "use1-az2"): 0.31}


class _StubbedSession:
    """A boto3 session whose EC2 clients are real but answered by botocore's Stubber (cloud boundary)."""

    def __init__(self, answers: dict[str, list]):
        self.answers, self.stubs, self.regions = answers, [], []

    def get_credentials(self):
        return object()

    def client(self, service, region_name, config=None):
        client = _ec2(region_name)
        stub = Stubber(client)
        rows = self.answers.get(region_name)
        if rows is None:
            stub.add_client_error("describe_spot_price_history", "UnauthorizedOperation")
        else:
            stub.add_response("describe_spot_price_history", {"SpotPriceHistory": rows})
        stub.activate()
        self.stubs.append(stub)
        self.regions.append(region_name)
        return client


def test_aws_spot_refresh_updates_matching_zones_and_reports_failed_regions():
    offers = [
        {"region": "us-east-1", "zone": "use1-az1", "instance_type": "p5.48xlarge", "price_spot": "40",
         "source": "s", "as_of": "2026-11-01"},
        {"region": "us-east-1", "zone": "use1-az9", "instance_type": "p5.48xlarge", "price_spot": "41",
         "source": "s", "as_of": "2026-11-01"},
        {"region": "eu-west-1", "zone": "euw1-az1", "instance_type": "g6.xlarge", "price_spot": "0.4",
         "source": "s", "as_of": "2026-11-01"},
    ]
    session = _StubbedSession({"us-east-1": [{"InstanceType": "p5.48xlarge", "AvailabilityZoneId": "use1-az1",
                                              "AvailabilityZone": "us-east-1a", "SpotPrice": "12.25"}]})
    line = refresh_aws_spot(offers, timeout=1, session=session)
    assert sorted(session.regions) == ["eu-west-1", "us-east-1"]
    assert offers[0]["price_spot"] == "12.25" and "DescribeSpotPriceHistory" in offers[0]["source"]
    assert offers[1]["price_spot"] == "41" and offers[2]["price_spot"] == "0.4"
    assert line.startswith("aws spot: 1 offers repriced") and "eu-west-1 (ClientError)" in line
    for stub in session.stubs:
        stub.assert_no_pending_responses()


def test_gcp_accelerator_types_request_over_real_http(tmp_path):
    """compute_v1's real REST client with anonymous credentials, talking to a local HTTP server."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import compute_v1
    from google.cloud.compute_v1.services.accelerator_types.transports.rest import (
        AcceleratorTypesRestTransport,
    )

    body = {"items": {
        "zones/us-central1-a": {"acceleratorTypes": [{"name": "nvidia-tesla-a100", "zone": "us-central1-a"},
                                                     {"name": "nvidia-h100-80gb", "zone": "us-central1-a"}]},
        "zones/europe-west4-b": {"warning": {"code": "NO_RESULTS_ON_PAGE"}},
    }}

    class Handler(SimpleHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            payload = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    with _Server(tmp_path, Handler) as server:
        transport = AcceleratorTypesRestTransport(host=server.url.removeprefix("http://"),
                                                  credentials=AnonymousCredentials(), url_scheme="http")
        pairs = gcp_accelerator_zones(compute_v1.AcceleratorTypesClient(transport=transport), "my-proj")
    assert pairs == {("nvidia-tesla-a100", "us-central1-a"), ("nvidia-h100-80gb", "us-central1-a")}
    assert server.paths and server.paths[0].startswith("/compute/v1/projects/my-proj/aggregated/acceleratorTypes")


def test_export_writes_skypilots_common_accelerator_files(tmp_path, offers):
    """SkyPilot canonicalizes accelerator names from common/accelerators.csv (cloud names as `str(cloud)`)."""
    import sky

    export_skypilot(tmp_path, offers)
    base = skypilot_catalog_dir(tmp_path) / "common"
    acc = pd.read_csv(base / "accelerators.csv")
    assert list(acc.columns) == ["AcceleratorName", "Clouds"]
    want = {a: {str(sky.CLOUD_REGISTRY.from_str(c)) for c in g["cloud"]} for a, g in offers.groupby("accelerator")}
    assert {r.AcceleratorName: set(r.Clouds.split(",")) for r in acc.itertuples()} == want
    meta = pd.read_csv(base / "metadata.csv")
    assert list(meta.columns) == ["GPU", "MemoryGB", "Manufacturer"]
    mem = offers.groupby("accelerator")["gpu_memory_gib"].max()
    assert {r.GPU: r.MemoryGB for r in meta.itertuples()} == pytest.approx(mem.to_dict())
