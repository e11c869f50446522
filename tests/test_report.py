"""Cost reports: hand-computed spend over a store with a preempted and replaced node, $/1M tokens from recorded
token counts, baselines at equal SLO, CSV/JSON round trips, the CLI, bad input."""

from __future__ import annotations

import json
import sqlite3
import subprocess
from datetime import datetime, timedelta
from decimal import Decimal
from fractions import Fraction

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from thunderops import report as rp
from thunderops.errors import ReportError, StateError, UserError
from thunderops.plan import Group, Instance, Plan, Prediction, Stage
from thunderops.state import Store


def T(hhmm: str) -> datetime:
    return datetime.fromisoformat(f"2026-11-20T{hhmm}:00+00:00")


def ts(hhmm: str) -> str:
    return T(hhmm).isoformat()


def inst(iid: str, cloud: str, price: float, spot: bool, gpu: str = "A100") -> Instance:
    return Instance(iid, cloud, "r1", "z1", f"{gpu.lower()}-box", gpu, 1, spot, price, source="test catalog",
                    as_of="2026-11-01")


def split_plan(instances: list[Instance], goodput: float = 4.0) -> Plan:
    """Instance 0 prefills, instance 1 decodes (one GPU each); baselines as the scheduler records them."""
    groups = [Group("g0", "prefill", [Stage(instances[0].id, instances[0].gpu, 1, 60, [0])]),
              Group("g1", "decode", [Stage(instances[1].id, instances[1].gpu, 1, 60, [0])])]
    return Plan("llama-30b", 10.0, round(sum(i.price_per_hour for i in instances), 4), instances, groups, [],
                Prediction(goodput_rps=goodput, tokens_per_s=goodput * 200),
                inputs={"workload": "conversation", "slo": {"ttft_s": 2.0, "tpot_s": 0.1, "attainment": 0.9},
                        "baselines": {"vllm": {"goodput_rps": 2.0, "cost_per_hour": 5.0, "gpus": 2},
                                      "melange": {"goodput_rps": 3.0, "cost_per_hour": 3.0, "gpus": 1},
                                      "hexgen": {"goodput_rps": 0.0, "cost_per_hour": 4.0, "gpus": 2}}})


def node(store: Store, dep: str, nid: str, iid: str, cloud: str, price: float, spot: bool, launched: str | None,
         terminated: str | None = None, status: str = "ready", gpu: str = "A100") -> None:
    store.record_node_intent(dep, nid, iid, f"to-{dep}-{nid}", cloud=cloud, region="r1", zone="z1",
                             instance_type=f"{gpu.lower()}-box", gpu=gpu, gpus=1, spot=spot, price_per_hour=price,
                             status=status, launched_at=ts(launched) if launched else None,
                             terminated_at=ts(terminated) if terminated else None)


@pytest.fixture
def store(tmp_path) -> Store:
    return Store(tmp_path / "state.db")


def make_deployment(store: Store, dep: str = "chat1", events: bool = True, ended: str | None = None,
                    usage: bool = True) -> None:
    """Spot node A (prefill, 1.20 $/h) from 10:00, preempted 11:30; on-demand B (decode, 2.00 $/h) from 10:00;
    replacement C (1.50 $/h spot) launched 11:40, serving 11:50; D never launched. `ended`: all down then."""
    store.create_deployment(dep, provider="skypilot", model="llama-30b", status="up")
    a, b = inst("a", "aws", 1.20, True), inst("b", "gcp", 2.00, False)
    store.add_plan(dep, split_plan([a, b]), reason="initial")
    node(store, dep, "na", "a", "aws", 1.20, True, "10:00", "11:30", status="preempted")
    node(store, dep, "nb", "b", "gcp", 2.00, False, "10:00", ended, status="terminated" if ended else "ready")
    node(store, dep, "nd", "x", "aws", 9.99, True, None, status="failed")
    if events:
        store.add_event(dep, "reschedule", "lost a", {"key": "k1", "lost": {"a": "provider: preempted"}},
                        ts=ts("11:31"))
        store.add_event(dep, "reprovision-start", "replacing a",
                        {"key": "k1", "replacements": {"a": {"id": "ar1", "price_per_hour": 1.5}}}, ts=ts("11:39"))
        node(store, dep, "nc", "ar1", "aws", 1.50, True, "11:40", ended, status="terminated" if ended else "ready")
        store.add_event(dep, "reprovisioned", "ar1 serving", {"key": "k1", "instances": ["ar1"]}, ts=ts("11:50"))
        store.add_plan(dep, split_plan([inst("ar1", "aws", 1.50, True), b]), reason="reprovisioned")
    else:  # replaced by hand on the same plan instance; no controller events
        node(store, dep, "nc", "a", "aws", 1.50, True, "11:40", ended, status="terminated" if ended else "ready")
    if usage:
        store.record_usage(dep, [{"ts": ts("10:30"), "prompt_tokens": 1000, "output_tokens": 200},
                                 {"ts": ts("11:00"), "prompt_tokens": 500, "output_tokens": 100},
                                 {"ts": ts("12:00"), "prompt_tokens": 1500, "output_tokens": 300}])


def by(df: pd.DataFrame, key: str, col: str) -> dict:
    return dict(zip(df[key], df[col], strict=True))


def test_hand_computed_spend_preemption_and_unit_costs(store):
    make_deployment(store)
    r = rp.deployment_report(store, "chat1", now=T("13:00"))
    # A: 1.5 h x 1.20 = 1.80; B: 3 h x 2.00 = 6.00; C: 1 h 20 min x 1.50 = 2.00; D: never launched
    cost = by(r.tables["nodes"], "node", "cost_usd")
    assert cost == {"na": Decimal("1.80"), "nb": Decimal("6.00"), "nc": Decimal("2.00"), "nd": Decimal(0)}
    assert all(isinstance(v, Decimal) for v in cost.values())
    assert r.total("spend") == Decimal("9.80")
    assert float(r.total("spend")) == pytest.approx(store.spend("chat1", now=T("13:00")))  # the store's own sum
    assert r.total("spend on spot") == Decimal("3.80") and r.total("spend on on-demand") == Decimal("6.00")
    assert r.total("$/h now") == Decimal("3.50")  # B and C run at 13:00
    assert r.total("average $/h") == Decimal("9.80") / 3
    assert (r.start, r.end) == ("2026-11-20T10:00:00+00:00", "2026-11-20T13:00:00+00:00")
    # per phase: A and C prefill (C through plan v2, A through v1), B decodes; per cloud
    assert by(r.tables["phases"], "phase", "cost_usd") == {"prefill": Decimal("3.80"), "decode": Decimal("6.00")}
    assert by(r.tables["clouds"], "cloud", "cost_usd") == {"aws": Decimal("3.80"), "gcp": Decimal("6.00")}
    assert by(r.tables["clouds"], "cloud", "usd_per_hour") == {"aws": Decimal("1.5"), "gcp": Decimal("2.0")}
    # tokens: 3000 prompt, 600 output; prefill spend -> prompt, decode spend -> output
    assert (r.total("requests"), r.total("prompt tokens"), r.total("output tokens")) == (3, 3000, 600)
    assert r.total("$ per 1M prompt tokens") == Decimal("3.80") * 1_000_000 / 3000
    assert r.total("$ per 1M output tokens") == Decimal("6.00") * 1_000_000 / 600
    assert r.total("$ per 1M tokens") == Decimal("9.80") * 1_000_000 / 3600
    # preemption: A lost 11:30, C serving 11:50 (the reprovisioned event) -> 20 min down; C cost 2.00
    pre = r.tables["preemptions"]
    assert list(pre["node"]) == ["na"] and list(pre["replacement"]) == ["nc"]
    assert list(pre["downtime_s"]) == [1200.0]
    assert r.total("preemptions") == 1 and r.total("downtime") == 1200.0
    assert r.total("replacement cost") == Decimal("2.00")
    assert by(r.tables["nodes"], "node", "replaces")["nc"] == "na"


def test_since_clips_spend_tokens_and_downtime(store):
    make_deployment(store)
    r = rp.deployment_report(store, "chat1", since=T("11:00"), now=T("13:00"))
    # A 0.5 h x 1.20 = 0.60; B 2 h x 2.00 = 4.00; C 2.00
    assert r.total("spend") == Decimal("6.60")
    assert (r.total("prompt tokens"), r.total("output tokens")) == (2000, 400)
    assert r.total("$ per 1M prompt tokens") == Decimal("2.60") * 1_000_000 / 2000
    r2 = rp.deployment_report(store, "chat1", since=T("11:40"), now=T("13:00"))
    assert r2.total("downtime") == 600.0  # 11:40 .. 11:50 of the 20 minutes fall in the window
    assert r2.total("preemptions") == 0  # the loss itself was before the window


def test_replacement_found_without_controller_events(store):
    make_deployment(store, events=False)
    r = rp.deployment_report(store, "chat1", now=T("13:00"))
    pre = r.tables["preemptions"]
    assert list(pre["replacement"]) == ["nc"]
    assert list(pre["downtime_s"]) == [600.0]  # 11:30 .. the replacement's launch at 11:40
    assert r.total("spend") == Decimal("9.80")
    assert by(r.tables["phases"], "phase", "cost_usd") == {"prefill": Decimal("3.80"), "decode": Decimal("6.00")}


def test_baselines_at_equal_slo(store):
    make_deployment(store)
    r = rp.deployment_report(store, "chat1", now=T("13:00"))
    b = r.tables["baselines"].set_index("strategy")
    rate = 3 / 10800  # 3 requests in 3 h
    # ours (plan v2): 3.50 $/h for 4 req/s; vllm 5 $/h for 2 req/s; melange 3 $/h for 3 req/s; hexgen serves none
    ours = b.loc["thunderops (ours, plan v2)"]
    assert ours["usd_per_hour_per_rps"] == Decimal("3.5") / 4
    assert b.loc["vllm", "usd_per_hour_per_rps"] == Decimal("2.5")
    assert b.loc["vllm", "ours_saves"] == pytest.approx(1 - 0.875 / 2.5)
    assert b.loc["melange", "ours_saves"] == pytest.approx(1 - 0.875 / 1.0)
    assert b.loc["hexgen", "usd_per_hour_per_rps"] is None
    assert b.loc["vllm", "rate_rps"] == pytest.approx(rate)
    assert float(b.loc["vllm", "cost_usd"]) == pytest.approx(2.5 * rate * 3)
    # tokens per request observed: 1200; $/1M tokens = $/h per req/s / (1200 tokens x 3600 s) x 1e6
    assert float(b.loc["vllm", "usd_per_1m_tokens"]) == pytest.approx(2.5 / (1200 * 3600) * 1e6)
    assert b.loc["thunderops (ours, actual)", "cost_usd"] == Decimal("9.80")
    assert r.total("savings vs best baseline") == pytest.approx(1 - 0.875 / 1.0)  # melange is the best one
    est = r.tables["estimate"].set_index("metric")
    assert est.loc["$/h", "predicted"] == Decimal("3.5")
    assert est.loc["requests/s", "ratio"] == pytest.approx(rate / 4)
    assert est.loc["output tokens/request", "observed"] == 200.0


def test_no_traffic_uses_plan_predictions(store):
    make_deployment(store, usage=False)
    r = rp.deployment_report(store, "chat1", now=T("13:00"))
    assert r.total("requests") == 0
    assert any("no traffic" in n for n in r.notes)
    per_1m = r.total("$ per 1M output tokens")
    assert isinstance(per_1m, Decimal) and per_1m > 0
    from thunderops.workload import get_workload

    wl = get_workload("conversation")
    # plan v2: 3.50 $/h, half its GPUs decode; 4 req/s x mean output tokens
    assert float(per_1m) == pytest.approx(3.5 * 0.5 * 1e6 / (4 * wl.mean_output * 3600))
    assert "no traffic yet" in r.tables["totals"].set_index("metric").loc["$ per 1M output tokens", "covers"]


def test_colocated_split_follows_the_performance_model():
    a = inst("a", "aws", 2.0, True)
    plan = Plan("Llama-3.1-8B", 10.0, 2.0, [a], [Group("g0", "colocated", [Stage("a", "A100", 1, 32, [0])])], [],
                Prediction(goodput_rps=1.0, tokens_per_s=200.0),
                inputs={"workload": "conversation", "slo": {"ttft_s": 2.0, "tpot_s": 0.1, "attainment": 0.9}})
    att = rp.attribution(plan)
    share = att.group_share["g0"]
    assert 0.0 < share < 1.0 and "50/50" not in att.note
    from thunderops.perf import PerfModel, layout_of
    from thunderops.plan import SLO
    from thunderops.specs import get_model
    from thunderops.workload import get_workload

    perf = PerfModel(get_model("Llama-3.1-8B"))
    lay = layout_of(plan, plan.groups[0], perf)
    wl, slo = get_workload("conversation"), SLO(2.0, 0.1, 0.9)
    cp, cd = perf.capacity(lay, "prefill", wl, slo), perf.capacity(lay, "decode", wl, slo)
    assert share == pytest.approx((1 / cp) / (1 / cp + 1 / cd))
    # longer prompts: prefill takes more of the GPU time
    long = Plan.from_dict({**plan.to_dict(), "inputs": {**plan.inputs, "workload": "coding"}})
    assert rp.attribution(long).group_share["g0"] > share


def test_csv_and_json_round_trip(store, tmp_path):
    make_deployment(store)
    r = rp.deployment_report(store, "chat1", now=T("13:00"))
    back = rp.Report.from_dict(json.loads(r.to_json()))
    out = tmp_path / "csv"
    out.mkdir()
    for name, text in r.csv_texts().items():
        (out / f"{name}.csv").write_text(text)
    from_csv = rp.Report.read_csv(out)
    for copy in (back, from_csv):
        assert set(copy.tables) == set(r.tables)
        for name, df in r.tables.items():
            want = [{k: v.quantize(rp.MICRO) if isinstance(v, Decimal) else v for k, v in row.items()}
                     for row in df.to_dict("records")]
            got = copy.tables[name]
            assert list(got.columns) == list(df.columns), name
            assert got.to_dict("records") == want, name
    assert from_csv.total("spend") == Decimal("9.800000")
    assert back.notes == r.notes and (back.start, back.end) == (r.start, r.end)


def test_plan_view_from_a_plan_file_and_compare_output(tmp_path):
    plan = split_plan([inst("a", "aws", 1.20, True), inst("b", "gcp", 2.00, False)])
    path = tmp_path / "plan.json"
    plan.save(path)
    r = rp.plan_report(*rp.load_plan_file(path))
    assert r.total("$/h") == Decimal("3.20")
    assert by(r.tables["phases"], "phase", "usd_per_hour") == {"prefill": Decimal("1.2"), "decode": Decimal("2.0")}
    b = r.tables["baselines"].set_index("strategy")
    assert b.loc["vllm", "ours_saves"] == pytest.approx(1 - 0.8 / 2.5)
    # `thunderops plan --json --compare` output: full baseline plans override the summaries
    other = split_plan([inst("c", "aws", 4.00, False), inst("d", "aws", 4.00, False)], goodput=2.0)
    cmp = tmp_path / "compare.json"
    cmp.write_text(json.dumps({"plan": plan.to_dict(), "baselines": {"vllm": other.to_dict()}}))
    r2 = rp.plan_report(*rp.load_plan_file(cmp))
    assert r2.tables["baselines"].set_index("strategy").loc["vllm", "usd_per_hour"] == Decimal("8.0")


def test_bad_input_raises_user_errors(store, tmp_path):
    with pytest.raises(StateError, match="unknown deployment 'nope'"):
        rp.deployment_report(store, "nope")
    with pytest.raises(ReportError, match="no deployments"):
        rp.build_reports(store, None, all_=True)
    with pytest.raises(ReportError, match="--since"):
        rp.parse_since("yesterday-ish")
    assert rp.parse_since("90m", now=T("13:00")) == T("11:30")
    assert rp.parse_since("2026-11-20T11:00") == T("11:00")
    make_deployment(store)
    db = sqlite3.connect(store.path)
    db.execute("UPDATE nodes SET launched_at = 'last tuesday' WHERE id = 'nb'")
    db.commit()
    with pytest.raises(StateError, match="nb launched_at"):
        rp.deployment_report(store, "chat1")
    db.execute("UPDATE nodes SET launched_at = ? WHERE id = 'nb'", (ts("10:00"),))
    db.execute("UPDATE plans SET json = '{\"model\": \"x\", \"groups\": [' WHERE deployment = 'chat1'")
    db.commit()
    db.close()
    with pytest.raises(UserError, match="not valid JSON"):
        rp.deployment_report(store, "chat1")
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ReportError, match="not a plan"):
        rp.load_plan_file(tmp_path / "bad.json")


# ------------------------------------------------------------------------------------------ CLI


def run_cli(exe: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([exe, "report", *args], capture_output=True, text=True, timeout=120)


def test_cli_formats(store, thunderops_cli, tmp_path):
    make_deployment(Store(), ended="13:00")  # all down at 13:00: the report no longer moves with the clock
    res = run_cli(thunderops_cli, "chat1", "--format", "json")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    totals = {t["metric"]: t["value"] for t in data["tables"]["totals"]}
    assert Decimal(totals["spend"]) == Decimal("9.80") and Decimal(totals["$/h now"]) == 0
    out = tmp_path / "csv"
    res = run_cli(thunderops_cli, "chat1", "--format", "csv", "--out", str(out))
    assert res.returncode == 0, res.stderr
    back = rp.Report.read_csv(out)
    assert back.total("spend") == Decimal("9.80")
    assert by(back.tables["nodes"], "node", "cost_usd")["nb"] == Decimal("6.00")
    assert (out / "spend.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = run_cli(thunderops_cli, "chat1")
    assert res.returncode == 0 and "9.80" in res.stdout and "$/1M tokens" in res.stdout
    res = run_cli(thunderops_cli, "--all", "--format", "json", "--since", "2026-11-20T11:00")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)["summary"]
    assert [row["deployment"] for row in summary] == ["chat1"] and Decimal(summary[0]["cost_usd"]) == Decimal("6.60")
    out = tmp_path / "all"
    res = run_cli(thunderops_cli, "--all", "--format", "html", "--out", str(out))
    assert res.returncode == 0, res.stderr
    page = (out / "report.html").read_text()
    assert "id=\"summary\"" in page and page.count("data:image/png;base64,") == 3
    assert (out / "chat1" / "spend.png").exists()


@pytest.mark.parametrize("args, message", [
    (["nope"], "unknown deployment 'nope'"),
    (["--all"], "no deployments"),
    ([], "name a DEPLOYMENT"),
    (["--plan", "/nonexistent/plan.json"], "cannot read the plan"),
])
def test_cli_bad_input_one_line_exit_2(thunderops_cli, tmp_path, args, message):
    out = tmp_path / "out"
    res = run_cli(thunderops_cli, *args, "--out", str(out))
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in res.stderr
    assert not out.exists()  # nothing half-written


def test_cli_corrupted_plan_row(thunderops_cli):
    store = Store()
    make_deployment(store)
    db = sqlite3.connect(store.path)
    db.execute("UPDATE plans SET json = '{\"model\": 1}' WHERE deployment = 'chat1'")
    db.commit()
    db.close()
    res = run_cli(thunderops_cli, "chat1", "--format", "json")
    assert res.returncode == 2 and res.stdout == ""
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "malformed plan" in lines[0]


# ------------------------------------------------------------------------------------------ properties

NODE = st.tuples(st.integers(0, 600), st.one_of(st.none(), st.integers(1, 600)),  # launch minute, minutes up
                 st.integers(1, 9999), st.sampled_from(["aws", "gcp", "lambda"]), st.booleans(),  # cents/h
                 st.sampled_from(["a", "b", "zz"]))  # plan instance (zz: in no plan)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(nodes=st.lists(NODE, min_size=1, max_size=6), since=st.one_of(st.none(), st.integers(0, 700)))
def test_spend_is_exact_and_every_breakdown_adds_up(tmp_path_factory, nodes, since):
    store = Store(tmp_path_factory.mktemp("p") / "state.db")
    store.create_deployment("prop", model="llama-30b")
    store.add_plan("prop", split_plan([inst("a", "aws", 1.0, True), inst("b", "gcp", 2.0, False)]))
    t0, now = T("00:00"), T("12:00")
    want = Fraction(0)
    lo = t0 + timedelta(minutes=since) if since is not None else None
    for k, (start, up, cents, cloud, spot, iid) in enumerate(nodes):
        a = t0 + timedelta(minutes=start)
        b = a + timedelta(minutes=up) if up is not None else None
        store.record_node_intent("prop", f"n{k}", iid, f"c{k}", cloud=cloud, gpu="A100", gpus=1, spot=spot,
                                 price_per_hour=cents / 100, status="terminated" if b else "ready",
                                 launched_at=a.isoformat(), terminated_at=b.isoformat() if b else None)
        first = min(t0 + timedelta(minutes=s) for s, *_ in nodes)
        w0 = lo or first
        w1 = now if any(u is None for _, u, *_ in nodes) else max(
            t0 + timedelta(minutes=s + u) for s, u, *_ in nodes)
        w1 = max(w1, w0)
        overlap = (min(b or w1, w1) - max(a, w0)).total_seconds()
        want += Fraction(cents, 100) * Fraction(max(0, int(overlap)), 3600)
    r = rp.deployment_report(store, "prop", since=lo, now=now)
    spend = r.total("spend")
    assert abs(Fraction(spend) - want) < Fraction(1, 10**18)
    micro = Decimal("0.000001")
    for table in ("nodes", "phases", "clouds"):
        assert sum(r.tables[table]["cost_usd"], Decimal(0)).quantize(micro) == spend.quantize(micro), table
    spot = r.total("spend on spot") + r.total("spend on on-demand")
    assert spot.quantize(micro) == spend.quantize(micro)
