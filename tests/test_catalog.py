"""Offer catalogs: the shipped files, the loader's validation and filters, and the builder's curation."""

from __future__ import annotations

import csv
import importlib.util
import math
from pathlib import Path

import pandas as pd
import pytest

from thunderops.catalog import (
    DERIVED_COLUMNS,
    OFFER_COLUMNS,
    load_offers,
    offers_from_skypilot,
    shipped_offers_dir,
    write_offers,
)
from thunderops.errors import CatalogError, SpecError, UserError
from thunderops.specs import get_gpu

REPO = Path(__file__).resolve().parents[1]
SNAPSHOT = REPO.parent / "shared" / "reference" / "price-snapshot"

GOOD = {
    "cloud": "aws", "region": "us-east-1", "zone": "use1-az1", "instance_type": "p4d.24xlarge",
    "accelerator": "A100", "gpu": "A100", "gpus_per_node": "8", "vcpus": "96", "memory_gib": "1152",
    "gpu_memory_gib": "40", "price_ondemand": "32.7726", "price_spot": "12.5", "host_price_ondemand": "",
    "host_price_spot": "", "network_gbps": "400", "source": "test", "as_of": "2026-11-01",
}


def write_csv(path: Path, rows: list[dict], columns: list[str] = OFFER_COLUMNS) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return path


def row(**changes) -> dict:
    return {**GOOD, **changes}


# --------------------------------------------------------------------------------------- shipped catalog


@pytest.fixture(scope="module")
def shipped() -> pd.DataFrame:
    return load_offers(shipped_offers_dir())


def test_shipped_catalog_covers_all_clouds_with_one_schema(shipped):
    assert set(shipped["cloud"]) == {"aws", "gcp", "azure", "lambda", "nebius", "oci", "vast", "cudo"}
    assert list(shipped.columns) == OFFER_COLUMNS + DERIVED_COLUMNS
    for path in sorted(shipped_offers_dir().glob("*.csv")):
        with open(path, newline="") as f:
            assert next(csv.reader(f)) == OFFER_COLUMNS, path


def test_shipped_prices_carry_source_and_date_and_are_positive(shipped):
    assert (shipped["price_ondemand"] > 0).all()
    assert (shipped["price_spot"].dropna() > 0).all()
    assert shipped["source"].str.len().gt(0).all() and shipped["as_of"].str.match(r"\d{4}-\d\d-\d\d$").all()
    # Every GPU name is one of our specs, so the perf model can price every offer.
    assert all(get_gpu(g).name == g for g in shipped["gpu"].unique())


def test_gcp_vm_price_is_host_plus_gpus(shipped):
    a2 = shipped[(shipped.instance_type == "a2-highgpu-1g") & (shipped.region == "us-central1")]
    assert len(a2) > 0
    # SOURCES.md: a2-highgpu-1g in us-central1 costs 0.739 (host) + 2.934 (A100) = 3.67 $/h.
    assert a2["price_ondemand"].round(2).eq(3.67).all()
    assert a2["host_price_ondemand"].round(3).eq(0.739).all()
    assert (shipped[shipped.cloud != "gcp"]["host_price_ondemand"].isna()).all()


def test_shipped_catalog_drops_what_it_cannot_price_or_model(shipped):
    assert not shipped["instance_type"].str.startswith("g6f").any()  # fractional GPUs
    assert "p5e.48xlarge" not in set(shipped["instance_type"])  # capacity blocks only: no on-demand price
    assert not shipped["accelerator"].isin(["B300", "GB200", "RTX5090"]).any()  # no spec
    assert not ((shipped.cloud == "gcp") & shipped.gpu.isin(["L4", "T4", "V100"])).any()  # no host price


def test_known_network_and_nvl_corrections(shipped):
    p5 = shipped[shipped.instance_type == "p5.48xlarge"]
    assert (p5["network_gbps"] == 3200).all() and (p5["gpus_per_node"] == 8).all()
    nd = shipped[shipped.instance_type == "Standard_ND96isr_H100_v5"]
    assert len(nd) and (nd["gpus_per_node"] == 8).all()  # the snapshot says 12
    nc = shipped[shipped.instance_type == "Standard_NC40ads_H100_v5"]
    assert len(nc) and (nc["gpu"] == "H100-NVL").all() and (nc["accelerator"] == "H100").all()


def test_derived_price_per_gpu(shipped):
    assert (shipped["price_per_gpu_ondemand"] * shipped["gpus_per_node"] - shipped["price_ondemand"]).abs().max() < 1e-9
    spot = shipped.dropna(subset=["price_spot"])
    assert (spot["price_per_gpu_spot"] * spot["gpus_per_node"] - spot["price_spot"]).abs().max() < 1e-9


# ------------------------------------------------------------------------------------------------ filters


def test_filters_are_forgiving_and_sorted(shipped):
    df = load_offers(shipped_offers_dir(), gpus="a100_80gb", clouds=["AWS", "gcp"])
    assert set(df["gpu"]) == {"A100-80GB"} and set(df["cloud"]) <= {"aws", "gcp"}
    assert df["price_per_gpu_ondemand"].is_monotonic_increasing
    spot = load_offers(shipped_offers_dir(), gpus="H100", spot=True, max_price_per_gpu=3.0)
    assert spot["price_spot"].notna().all() and (spot["price_per_gpu_spot"] <= 3.0).all()
    assert spot["price_per_gpu_spot"].is_monotonic_increasing
    every = load_offers(shipped_offers_dir(), gpus="H100")
    assert len(spot) < len(every)
    regional = load_offers(shipped_offers_dir(), regions="US-CENTRAL1")
    assert set(regional["region"]) == {"us-central1"}
    assert len(load_offers(shipped_offers_dir(), clouds="aws,gcp")) == len(shipped.query("cloud in ['aws','gcp']"))


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"gpus": "H10"}, "did you mean: H100"),
        ({"clouds": "awz"}, "did you mean: aws"),
        ({"regions": "us-centrl1"}, "did you mean: us-central1"),
        ({"gpus": "H100", "max_price_per_gpu": 0.01}, "no offers match"),
        ({"gpus": "MI300X", "clouds": "aws"}, "no offers match"),
        ({"max_price_per_gpu": -1}, "positive"),
    ],
)
def test_bad_filters_say_what_to_do(kwargs, fragment):
    with pytest.raises(UserError) as e:
        load_offers(shipped_offers_dir(), **kwargs)
    assert fragment in str(e.value) and "\n" not in str(e.value)


# ----------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "changes, fragment",
    [
        ({"price_ondemand": ""}, "missing price_ondemand"),
        ({"price_ondemand": "-3"}, "price_ondemand='-3' must be a positive $/h price"),
        ({"price_spot": "-0.5"}, "price_spot='-0.5'"),
        ({"price_ondemand": "abc"}, "is not a number"),
        ({"price_ondemand": "nan"}, "must be a positive"),
        ({"gpu": "H1OO"}, "unknown GPU 'H1OO'"),
        ({"gpus_per_node": "0.5"}, "whole number"),
        ({"as_of": "last week"}, "YYYY-MM-DD"),
        ({"source": ""}, "empty source"),
        ({"region": ""}, "empty region"),
        ({"gpu": "H100\nH200"}, "line break"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, changes, fragment):
    path = write_csv(tmp_path / "offers.csv", [row(), row(zone="use1-az2", **changes)])
    with pytest.raises(CatalogError) as e:
        load_offers(path)
    message = str(e.value)
    assert f"{path}:3:" in message and fragment in message, message


def test_structural_errors(tmp_path):
    short = tmp_path / "short.csv"
    short.write_text(",".join(OFFER_COLUMNS) + "\n" + "aws,us-east-1,,p4d.24xlarge\n")
    with pytest.raises(CatalogError, match=r"short.csv:2: wrong number of fields"):
        load_offers(short)
    nohead = write_csv(tmp_path / "nohead.csv", [row()], [c for c in OFFER_COLUMNS if c != "price_ondemand"])
    with pytest.raises(CatalogError, match="missing column.*price_ondemand"):
        load_offers(nohead)
    dup = write_csv(tmp_path / "dup.csv", [row(), row()])
    with pytest.raises(CatalogError, match=r"dup.csv:3: duplicate offer"):
        load_offers(dup)
    binary = tmp_path / "binary.csv"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(CatalogError, match="UTF-8"):
        load_offers(binary)
    with pytest.raises(CatalogError, match="no such catalog"):
        load_offers(tmp_path / "missing.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CatalogError, match="no offer files"):
        load_offers(tmp_path / "empty")


def test_one_bad_file_in_a_directory_loads_nothing(tmp_path):
    write_csv(tmp_path / "a.csv", [row()])
    write_csv(tmp_path / "b.csv", [row(cloud="gcp", price_ondemand="-1")])
    with pytest.raises(CatalogError, match="b.csv:2"):
        load_offers(tmp_path)
    write_csv(tmp_path / "b.csv", [row(cloud="gcp")])
    assert sorted(load_offers(tmp_path)["cloud"]) == ["aws", "gcp"]


def test_host_price_columns_are_optional(tmp_path):
    cols = [c for c in OFFER_COLUMNS if not c.startswith("host_price_")]
    df = load_offers(write_csv(tmp_path / "o.csv", [row(gpu="a100-40gb", accelerator="")], cols))
    assert df.loc[0, "gpu"] == "A100" and df.loc[0, "accelerator"] == "A100"
    assert math.isnan(df.loc[0, "host_price_ondemand"])
    assert df.loc[0, "price_per_gpu_spot"] == pytest.approx(12.5 / 8)


def test_gpu_filter_with_unknown_gpu_is_a_spec_error():
    with pytest.raises(SpecError, match="did you mean"):
        load_offers(shipped_offers_dir(), gpus="a100-90gb")


# ------------------------------------------------------------------------------------- builder / conversion


def _sky_row(**kw) -> dict:
    base = {"InstanceType": "", "AcceleratorName": "", "AcceleratorCount": "", "vCPUs": "", "MemoryGiB": "",
            "GpuMemoryMiB": "", "Price": "", "SpotPrice": "", "Region": "us-central1",
            "AvailabilityZone": "us-central1-a"}
    return {**base, **kw}


def test_conversion_prices_gcp_vms_and_drops_what_it_must():
    rows = [
        _sky_row(InstanceType="a2-highgpu-2g", vCPUs="24", MemoryGiB="170", Price="1.5", SpotPrice="0.5"),
        _sky_row(AcceleratorName="A100", AcceleratorCount="2", GpuMemoryMiB="40960", Price="5.8", SpotPrice="2"),
        _sky_row(AcceleratorName="A100", AcceleratorCount="2", Price="5.8", AvailabilityZone="us-central1-b"),
        _sky_row(AcceleratorName="T4", AcceleratorCount="1", Price="0.35"),
        _sky_row(AcceleratorName="B300", AcceleratorCount="8", Price="99"),
        _sky_row(InstanceType="g2-standard-4", vCPUs="4", MemoryGiB="16", Price="0.15"),
        _sky_row(AcceleratorName="L4", AcceleratorCount="1", Price="0.56", SpotPrice="0.2"),
    ]
    offers, dropped = offers_from_skypilot("gcp", rows, source="s", as_of="2026-11-01")
    assert [o["instance_type"] for o in offers] == ["a2-highgpu-2g", "g2-standard-4"]
    l4 = offers[1]
    assert float(l4["price_ondemand"]) == pytest.approx(0.71) and l4["price_spot"] == ""  # host has no spot price
    o = offers[0]
    assert (o["instance_type"], o["gpu"], o["gpus_per_node"]) == ("a2-highgpu-2g", "A100", 2)
    assert float(o["price_ondemand"]) == pytest.approx(7.3) and float(o["price_spot"]) == pytest.approx(2.5)
    assert float(o["host_price_ondemand"]) == 1.5 and o["vcpus"] == "24"
    assert sum(dropped.values()) == 3  # zone b has no host row, T4 needs an n1 host, B300 has no spec


def test_conversion_other_clouds(tmp_path):
    rows = [
        {"InstanceType": "g6f.xlarge", "AcceleratorName": "L4", "AcceleratorCount": "0.125", "Price": "0.2",
         "Region": "us-east-1"},
        {"InstanceType": "p5e.48xlarge", "AcceleratorName": "H200", "AcceleratorCount": "8", "Price": "",
         "SpotPrice": "20", "Region": "us-east-1"},
        {"InstanceType": "g6.xlarge", "AcceleratorName": "L4", "AcceleratorCount": "1.0", "vCPUs": "4",
         "MemoryGiB": "16", "Price": "0.8048", "SpotPrice": "0.3", "Region": "us-east-1", "AvailabilityZone": "use1-az1",
         "GpuInfo": "{'Gpus': [{'Name': 'L4', 'Manufacturer': 'NVIDIA', 'Count': 1.0, 'MemoryInfo': "
                    "{'SizeInMiB': 22888}}], 'TotalGpuMemoryInMiB': 22888}"},
    ]
    offers, dropped = offers_from_skypilot("aws", rows, source="s", as_of="2026-11-01")
    assert [o["instance_type"] for o in offers] == ["g6.xlarge"] and sum(dropped.values()) == 2
    assert float(offers[0]["gpu_memory_gib"]) == pytest.approx(22888 / 1024)
    write_offers(tmp_path / "aws.csv", offers)
    assert load_offers(tmp_path / "aws.csv")["price_ondemand"].tolist() == [0.8048]


def test_write_offers_refuses_bad_rows_and_leaves_the_old_file(tmp_path):
    path = write_csv(tmp_path / "aws.csv", [row()])
    before = path.read_text()
    with pytest.raises(CatalogError):
        write_offers(path, [row(price_ondemand="-1")])
    assert path.read_text() == before and list(tmp_path.iterdir()) == [path]


@pytest.mark.skipif(not (SNAPSHOT / "gcp_gpu.csv").exists(), reason="reference price snapshot not present")
def test_builder_reproduces_the_shipped_catalogs(tmp_path):
    spec = importlib.util.spec_from_file_location("build_catalogs", REPO / "scripts" / "build_catalogs.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    for cloud in ("gcp", "azure", "lambda"):
        offers, _ = offers_from_skypilot(cloud, build.snapshot_rows(cloud, SNAPSHOT),
                                         source=build.SOURCE.format(cloud=cloud), as_of=build.AS_OF)
        write_offers(tmp_path / f"{cloud}.csv", offers)
        assert (tmp_path / f"{cloud}.csv").read_text() == (shipped_offers_dir() / f"{cloud}.csv").read_text()
