"""Network benchmark between real agent processes on 127.0.0.x: emulated slow links measured within 20 %,
the round schedule, and every failure (wrong token, unreachable, killed or frozen agent) -> unknown, no hang."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time

import pytest
from conftest import system_tool  # tests/ is on sys.path under pytest
from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console
from test_agent import TOKEN, free_port

from thunderops.agent import deployment_token
from thunderops.errors import NetbenchError, StateError
from thunderops.netbench import (
    AgentCallError,
    AgentEndpoint,
    NetbenchResult,
    agent_get,
    endpoints_for_deployment,
    measure,
    parse_hosts,
    render_table,
    round_robin_rounds,
    save_heatmap,
)
from thunderops.plan import Instance, Plan
from thunderops.state import Store

QUICK = dict(duration_s=0.5, streams=4, tool="builtin", nccl=False)


# ---------------------------------------------------------------- the schedule


@given(st.integers(min_value=0, max_value=64))
def test_rounds_cover_every_pair_once_with_disjoint_pairs(n):
    rounds = round_robin_rounds(n)
    pairs = [p for r in rounds for p in r]
    assert sorted(pairs) == [(i, j) for i in range(n) for j in range(i + 1, n)]  # each pair exactly once
    for r in rounds:
        nodes = [x for p in r for x in p]
        assert len(nodes) == len(set(nodes))  # no node twice in a round
    assert len(rounds) == (0 if n < 2 else n - 1 if n % 2 == 0 else n)
    if n >= 2:
        # every round is as full as it can be: n/2 pairs (even n) or (n-1)/2 with one node sitting out
        assert all(len(r) == n // 2 for r in rounds)


# ---------------------------------------------------------------- rate-limited links


def _within(measured: float | None, limit_gbps: float, tol: float = 0.2) -> bool:
    return measured is not None and abs(measured - limit_gbps) <= tol * limit_gbps


def test_paced_nodes_are_measured_within_20_percent(agents):
    fast = agents.start("fast")
    slow = agents.start("slow", "--link-mbps", "200")
    mid = agents.start("mid", "--link-mbps", "800")
    r = measure([fast.endpoint(), slow.endpoint(), mid.endpoint()], **QUICK)
    assert not r.unknown, r.message()
    assert _within(r.pair("fast", "slow").gbps, 0.2), r.pair("fast", "slow")
    assert _within(r.pair("fast", "mid").gbps, 0.8), r.pair("fast", "mid")
    assert _within(r.pair("slow", "mid").gbps, 0.2), r.pair("slow", "mid")  # the slower NIC of the two
    assert all(p.rtt_ms is not None and 0 < p.rtt_ms < 50 for p in r.pairs)
    m = r.bandwidth_gbps()
    assert m["slow"]["fast"] == m["fast"]["slow"]  # one measurement, both directions
    assert len(r.rounds) == 3 and all(len(x) == 1 for x in r.rounds)


def test_one_slow_link_between_otherwise_fast_nodes(agents):
    # Three "hosts" on distinct loopback addresses; only the x<->y link is slow, in whichever direction
    # the schedule sends (x paces its sends to y and its reads from y).
    try:
        x = agents.start("x", "--peer-mbps", "127.0.0.3=300", host="127.0.0.2")
    except OSError as e:  # pragma: no cover - loopback aliases are standard on Linux
        pytest.skip(f"cannot bind 127.0.0.2: {e}")
    y = agents.start("y", host="127.0.0.3")
    z = agents.start("z", host="127.0.0.4")
    for order in ([x, y, z], [y, x, z]):  # x sends to y, then y sends to x
        r = measure([a.endpoint() for a in order], **QUICK)
        assert not r.unknown, r.message()
        assert _within(r.pair("x", "y").gbps, 0.3), r.pair("x", "y")
        assert r.pair("x", "z").gbps > 3 * 0.3 and r.pair("y", "z").gbps > 3 * 0.3


def test_iperf3_where_both_nodes_have_it_builtin_where_a_link_is_emulated(agents):
    system_tool(("iperf3",), "iperf3")
    a, b = agents.start("a"), agents.start("b")
    c = agents.start("c", "--link-mbps", "300")
    r = measure([a.endpoint(), b.endpoint(), c.endpoint()], duration_s=1, streams=2, nccl=False)  # tool=auto
    assert not r.unknown, r.message()
    ab = r.pair("a", "b")
    assert ab.tool == "iperf3" and ab.gbps > 1 and ab.rtt_ms is not None  # rtt through the builtin echo
    assert r.pair("a", "c").tool == "builtin" and _within(r.pair("a", "c").gbps, 0.3)


def test_agent_get_for_pollers(agents):
    a = agents.start("a")
    assert agent_get(a.endpoint(), "/v1/preemption")["notice"] is False
    with pytest.raises(AgentCallError, match="401"):
        agent_get(a.endpoint("bad"), "/v1/health")


# ---------------------------------------------------------------- failures: unknown, clear, no hang


def test_wrong_token_and_unreachable_agents_leave_pairs_unknown(agents, tmp_path):
    a, b = agents.start("a"), agents.start("b")
    w = agents.start("w", token="another-deployments-token")
    gone = AgentEndpoint("gone", "127.0.0.1", free_port(), TOKEN)
    t0 = time.monotonic()
    r = measure([a.endpoint(), b.endpoint(), w.endpoint(TOKEN), gone], **QUICK)
    assert time.monotonic() - t0 < 30
    assert r.pair("a", "b").known
    for other in ("a", "b", "gone"):
        assert not r.pair("w", other).known
    assert "rejected the token (401)" in r.pair("w", "a").error
    assert "unreachable" in r.pair("gone", "a").error and "connection refused" in r.pair("gone", "b").error
    assert len(r.pairs) == 6 and len(r.unknown) == 5
    msg = r.message()
    assert msg.startswith("measured 1 of 6 node pairs") and "401" in msg and "unreachable" in msg
    assert "w" not in r.bandwidth_gbps() and "gone" not in r.bandwidth_gbps()
    # shown and saved: '?' for unknown, a real PNG
    console = Console(record=True, width=200)
    console.print(render_table(r))
    text = console.export_text()
    assert "?" in text and f"{r.pair('a', 'b').gbps:.2f}" in text
    png = save_heatmap(r, tmp_path / "out" / "heat.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    # the result survives a JSON round trip (it is stored in events)
    back = NetbenchResult.from_dict(json.loads(json.dumps(r.to_dict())))
    assert back.bandwidth_gbps() == r.bandwidth_gbps() and back.message() == r.message()


@pytest.mark.parametrize("victim", ["sender", "receiver"])
def test_agent_killed_mid_measurement(agents, victim):
    a, b = agents.start("a"), agents.start("b")
    target = a if victim == "sender" else b  # pair (a, b): a sends, b receives
    threading.Timer(1.0, lambda: os.kill(target.proc.pid, signal.SIGKILL)).start()
    t0 = time.monotonic()
    r = measure([a.endpoint(), b.endpoint()], duration_s=4, streams=2, tool="builtin", nccl=False)
    assert time.monotonic() - t0 < 15
    p = r.pair("a", "b")
    assert not p.known and p.error
    assert target.name in p.error or "reset" in p.error or "went away" in p.error, p.error


def test_frozen_agent_times_out(agents):
    a, b = agents.start("a"), agents.start("b")
    threading.Timer(0.5, lambda: os.kill(b.proc.pid, signal.SIGSTOP)).start()  # alive but silent
    t0 = time.monotonic()
    r = measure([a.endpoint(), b.endpoint()], duration_s=2, streams=2, tool="builtin", nccl=False,
                pair_timeout_s=4)
    assert time.monotonic() - t0 < 12
    assert not r.pair("a", "b").known and "timed out" in r.pair("a", "b").error
    os.kill(b.proc.pid, signal.SIGCONT)


# ---------------------------------------------------------------- input checks


def test_parse_hosts():
    eps = parse_hosts("10.0.0.5:9000, gpu2=10.0.0.6:9001,10.0.0.7", "t")
    assert [(e.name, e.host, e.port) for e in eps] == [
        ("10.0.0.5:9000", "10.0.0.5", 9000), ("gpu2", "10.0.0.6", 9001), ("10.0.0.7:8790", "10.0.0.7", 8790)]
    for bad in ("10.0.0.5:http,10.0.0.6:1", "10.0.0.5:0,a:1", "10.0.0.5:1", ""):
        with pytest.raises(NetbenchError):
            parse_hosts(bad, "t")
    with pytest.raises(NetbenchError, match="unique"):
        measure([AgentEndpoint("a", "h", 1, "t"), AgentEndpoint("a", "h", 2, "t")])


# ---------------------------------------------------------------- the CLI, ad hoc and on a deployment


def _cli(exe: str, *args: str, token: str | None = TOKEN, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ}
    if token:
        env["THUNDEROPS_AGENT_TOKEN"] = token
    return subprocess.run([exe, *args], env=env, capture_output=True, text=True, timeout=timeout)


def test_cli_ad_hoc_hosts(agents, thunderops_cli, tmp_path):
    a, b = agents.start("a"), agents.start("b", "--link-mbps", "400")
    png = tmp_path / "m.png"
    r = _cli(thunderops_cli, "netbench", "--hosts", f"a=127.0.0.1:{a.port},b=127.0.0.1:{b.port}",
             "--duration", "0.5", "--no-nccl", "--png", str(png), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert _within(out["bandwidth_gbps"]["a"]["b"], 0.4)
    assert png.exists() and out["plan_version"] is None
    r = _cli(thunderops_cli, "netbench", "--hosts", f"a=127.0.0.1:{a.port},b=127.0.0.1:{free_port()}",
             "--duration", "0.3", "--no-nccl")
    assert r.returncode == 1 and "unreachable" in r.stdout and "Traceback" not in r.stderr
    r = _cli(thunderops_cli, "netbench")
    assert r.returncode == 2 and "DEPLOYMENT or --hosts" in r.stderr


def test_cli_ad_hoc_hosts_over_tls_with_the_pinned_certificate(agents, thunderops_cli, thunderops_home, tmp_path):
    from thunderops.agent import deployment_tls

    pair = deployment_tls("adhoc")
    a, b = agents.start("a", tls=pair), agents.start("b", tls=pair)
    cert = tmp_path / "agents.pem"
    cert.write_text(pair[0])
    hosts = f"a=127.0.0.1:{a.port},b=127.0.0.1:{b.port}"
    r = _cli(thunderops_cli, "netbench", "--hosts", hosts, "--tls-cert", str(cert), "--duration", "0.3",
             "--no-nccl", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["bandwidth_gbps"]["a"]["b"] > 0
    r = _cli(thunderops_cli, "netbench", "--hosts", hosts, "--duration", "0.3", "--no-nccl")  # no cert: plain HTTP
    assert r.returncode == 1 and "Traceback" not in r.stderr


def _deployment(store: Store, dep: str, ports: dict[str, int]) -> Plan:
    insts = [Instance(id=i, cloud="aws", region="us-east-1", zone="us-east-1a", instance_type="g5.xlarge",
                      gpu="A10G", gpus=1, spot=False, price_per_hour=1.0, network_gbps=10.0) for i in ports]
    plan = Plan(model="llama-2-7b", budget_per_hour=10.0, cost_per_hour=float(len(insts)), instances=insts,
                groups=[], routing=[], bandwidth_gbps={"i1": {"i2": 10.0}, "i2": {"i1": 10.0}})
    store.create_deployment(dep, provider="local", model=plan.model, budget_per_hour=10.0)
    store.add_plan(dep, plan, reason="test")
    for i, port in ports.items():
        store.record_node_intent(dep, f"{dep}-{i}", i, f"{dep}-{i}", host="127.0.0.1", agent_port=port,
                                 status="ready")
    return plan


def test_cli_on_a_deployment_stores_a_new_plan_version(agents, thunderops_cli, thunderops_home):
    store = Store()
    token = deployment_token("dep1")
    a, b = agents.start("a", token=token), agents.start("b", "--link-mbps", "300", token=token)
    _deployment(store, "dep1", {"i1": a.port, "i2": b.port})
    r = _cli(thunderops_cli, "netbench", "dep1", "--duration", "0.5", "--no-nccl", token=None)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "stored as plan version 2" in r.stdout
    assert store.plan_versions("dep1") == [1, 2]
    bw = store.latest_plan("dep1").bandwidth_gbps
    assert _within(bw["i1"]["i2"], 0.3) and bw["i2"]["i1"] == bw["i1"]["i2"]
    ev = store.events("dep1", kind="netbench")
    assert len(ev) == 1 and ev[0].payload["after"] == 2 and "measured 1 of 1" in ev[0].message
    assert list((thunderops_home / "netbench").glob("dep1-*.png"))


def test_deployment_without_enough_nodes_or_token(thunderops_home, thunderops_cli):
    store = Store()
    _deployment(store, "dep2", {"i1": 1})
    with pytest.raises(NetbenchError, match="1 ready node"):
        endpoints_for_deployment("dep2", store)
    store.record_node_intent("dep2", "dep2-i2", "i2", "dep2-i2", host="127.0.0.1", agent_port=2, status="ready")
    with pytest.raises(NetbenchError, match="no agent token"):
        endpoints_for_deployment("dep2", store)
    with pytest.raises(StateError):
        endpoints_for_deployment("nosuch", store)
    r = _cli(thunderops_cli, "netbench", "nosuch")
    assert r.returncode == 2 and "unknown deployment" in r.stderr and "Traceback" not in r.stderr
