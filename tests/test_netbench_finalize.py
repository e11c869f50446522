"""Finalize on measured links: four real agents on 127.0.0.2-5, one emulated slow link, a hand-built
2-prefill x 2-decode plan in a real state store; measure_and_finalize must move KV routing off that link."""

from __future__ import annotations

import json
import subprocess

import pytest
from rich.console import Console

from thunderops.agent import deployment_token
from thunderops.netbench import measure_and_finalize
from thunderops.plan import Group, Instance, Plan, Route, Stage
from thunderops.scheduler import reschedule
from thunderops.state import Store

HOSTS = {"p1": "127.0.0.2", "p2": "127.0.0.3", "d1": "127.0.0.4", "d2": "127.0.0.5"}
SLOW_MBPS = 200


def two_by_two_plan() -> Plan:
    """LLaMA-30B on four 2xA100 nodes: p1, p2 prefill, d1, d2 decode, requests spread evenly, 10 Gbps assumed."""
    insts = [Instance(id=n, cloud="aws", region="us-east-1", zone="us-east-1a", instance_type="p4de-2gpu",
                      gpu="A100-80GB", gpus=2, spot=False, price_per_hour=8.2, network_gbps=10.0,
                      source="test", as_of="2026-11-01", host=h) for n, h in HOSTS.items()]
    groups = [Group(f"g{n}", "prefill" if n.startswith("p") else "decode", [Stage(n, "A100-80GB", 2, 60, [0, 1])])
              for n in HOSTS]
    routing = [Route(p, d, 0.25) for p in ("gp1", "gp2") for d in ("gd1", "gd2")]
    return Plan(model="LLaMA-30B", budget_per_hour=40.0, cost_per_hour=32.8, instances=insts, groups=groups,
                routing=routing,
                inputs={"workload": "conversation", "rate": 1.0, "slo": {"ttft_s": 5.0, "tpot_s": 0.1,
                                                                         "attainment": 0.9}},
                bandwidth_gbps={a: {b: 10.0 for b in HOSTS if b != a} for a in HOSTS})


def share(plan: Plan, a: str, b: str) -> float:
    """Fraction of requests whose KV cache crosses the a<->b link (prefill on one, decode on the other)."""
    where = {g.id: set(g.instances) for g in plan.groups}
    total = 0.0
    for r in plan.routing:
        if r.prefill == r.decode:
            continue
        p, d = where[r.prefill], where[r.decode]
        if (a in p and b in d) or (b in p and a in d):
            total += r.fraction
    return total


@pytest.fixture
def slow_link_deployment(agents, thunderops_home):
    """Deployment fin1: the hand-built plan as v1, four ready nodes whose agents emulate one slow link."""
    plan = two_by_two_plan()
    # What the scheduler does on the assumed 10 Gbps links: the prefill->decode link it leans on most is
    # the one we make slow, so a plan that ignored the measurement would keep sending KV over it.
    nominal, _ = reschedule.finalize(plan, plan.bandwidth_gbps)
    assert any(r.prefill != r.decode for r in nominal.routing), \
        "the scheduler now colocates this plan even on fast links: pick a plan it phase-splits"
    plan.predicted = nominal.predicted
    pairs = [(p, d) for p in ("p1", "p2") for d in ("d1", "d2")]
    slow_p, slow_d = max(pairs, key=lambda pd: share(nominal, *pd))
    assert share(nominal, slow_p, slow_d) >= 0.25

    store = Store()
    store.create_deployment("fin1", provider="local", model=plan.model, budget_per_hour=plan.budget_per_hour)
    store.add_plan("fin1", plan, reason="hand-built 2P x 2D")
    token = deployment_token("fin1")
    for n, host in HOSTS.items():
        extra = ("--peer-mbps", f"{HOSTS[slow_d]}={SLOW_MBPS}") if n == slow_p else ()
        try:
            a = agents.start(n, *extra, token=token, host=host)
        except OSError as e:  # pragma: no cover - loopback aliases are standard on Linux
            pytest.skip(f"cannot bind {host}: {e}")
        store.record_node_intent("fin1", f"fin1-{n}", n, f"fin1-{n}", host=host, agent_port=a.port, status="ready")
    return store, slow_p, slow_d


def check_finalized(store: Store, slow_p: str, slow_d: str, measured_gbps: float, changes: list[str]) -> None:
    assert abs(measured_gbps - SLOW_MBPS / 1000) <= 0.2 * SLOW_MBPS / 1000, measured_gbps
    new = store.latest_plan("fin1")
    assert new.version == 2 and store.plan_versions("fin1") == [1, 2]
    assert share(new, slow_p, slow_d) < 0.05  # KV no longer crosses the slow link
    assert abs(sum(r.fraction for r in new.routing) - 1.0) < 1e-6
    assert new.bandwidth_gbps[slow_p][slow_d] == pytest.approx(measured_gbps, rel=0.01)
    assert [e.kind for e in store.events("fin1")] == ["netbench", "finalize"]
    fin = store.events("fin1", kind="finalize")[0]
    assert fin.payload["before"] == 1 and fin.payload["after"] == 2 and fin.payload["changes"] == changes
    link = (f"{slow_p} -> {slow_d}", f"{slow_d} -> {slow_p}")
    assert any(any(x in c for x in link) and "measured" in c for c in changes), changes


def test_finalize_moves_kv_routing_off_the_measured_slow_link(slow_link_deployment):
    store, slow_p, slow_d = slow_link_deployment
    console = Console(record=True, width=160)
    out = measure_and_finalize("fin1", store=store, console=console, duration_s=0.5, streams=4, tool="builtin",
                               nccl=False, finalize_options={"time_limit": 5.0})
    slow = out.result.pair(slow_p, slow_d)
    assert slow.known
    assert all(p.known and p.gbps > 3 * SLOW_MBPS / 1000 for p in out.result.pairs if p is not slow)
    assert (out.before_version, out.after_version) == (1, 2)
    check_finalized(store, slow_p, slow_d, slow.gbps, out.changes)
    text = console.export_text()  # what changed and why, for people
    assert "measured" in text and "plan v1 -> v2" in text and out.png and out.png.exists()


def test_cli_netbench_finalize(slow_link_deployment, thunderops_cli):
    store, slow_p, slow_d = slow_link_deployment
    r = subprocess.run([thunderops_cli, "netbench", "fin1", "--finalize", "--duration", "0.5", "--tool", "builtin",
                        "--no-nccl", "--json"], capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert (out["before_version"], out["after_version"]) == (1, 2)
    check_finalized(store, slow_p, slow_d, out["netbench"]["bandwidth_gbps"][slow_p][slow_d], out["changes"])
