"""Engines spanning nodes run on a Ray cluster of their own (thunderops.serve.ray_cluster): which groups get
one and on which ports, the node task's engine line, the scheduler keeping such groups on one network, and a
real cluster formed by `thunderops serve ray-engine` on the head and the node agent's join on a worker."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from test_agent import TOKEN, free_port
from test_serve_plans import node

from thunderops.plan import Group, Plan, Route, Stage
from thunderops.provision import Ports
from thunderops.provision.tasks import engine_launches, engine_task
from thunderops.serve.ray_cluster import RAY_BLOCK, ray_clusters, start_argv


def spanning_plan() -> Plan:
    """g0: a 3-stage pipeline over nodes a (2 GPUs) and b (1 GPU); g1: one GPU of b; g2: a pipeline a+c."""
    inst = [node("a", "A100", 4, "10.0.0.1"), node("b", "A100", 2, "10.0.0.2"), node("c", "A100", 1, "10.0.0.3")]
    groups = [Group("g0", "colocated", [Stage("a", "A100", 1, 11, [0]), Stage("a", "A100", 1, 11, [1]),
                                        Stage("b", "A100", 1, 10, [1])]),
              Group("g1", "colocated", [Stage("b", "A100", 1, 32, [0])]),
              Group("g2", "colocated", [Stage("a", "A100", 1, 16, [2]), Stage("c", "A100", 1, 16, [0])])]
    routes = [Route("g0", "g0", 0.4), Route("g1", "g1", 0.3), Route("g2", "g2", 0.3)]
    return Plan(model="llama3-8b", budget_per_hour=10, cost_per_hour=3, instances=inst, groups=groups,
                routing=routes, inputs={"max_model_len": 4096})


def test_each_spanning_group_gets_its_own_cluster_and_port_block():
    rc = ray_clusters(spanning_plan(), base_port=10000)
    assert set(rc) == {"g0", "g2"}  # g1 sits on one node: no Ray cluster
    assert rc["g0"].head == "a" and rc["g0"].workers == ["b"] and rc["g0"].total_gpus == 3
    assert rc["g0"].gpus_on("a") == (0, 1) and rc["g0"].gpus_on("b") == (1,)
    # node a is in both: each group's block there starts at its lowest GPU id on a, so they never meet
    assert rc["g0"].port == 10000 and rc["g2"].port == 10000 + 2 * RAY_BLOCK
    assert rc["g0"].ports_on("b") == 10000 + RAY_BLOCK and rc["g2"].ports_on("c") == 10000
    # another group's removal (a reschedule) moves no block
    smaller = spanning_plan()
    smaller.groups = [g for g in smaller.groups if g.id != "g0"]
    assert ray_clusters(smaller, base_port=10000)["g2"] == rc["g2"]
    head = start_argv(10000, 2, "10.0.0.1")
    worker = start_argv(10000, 1, "10.0.0.2", head_address="10.0.0.1:10000")
    assert "--head" in head and "--port=10000" in head and not any(a.startswith("--address") for a in head)
    assert "--address=10.0.0.1:10000" in worker and "--head" not in worker
    used = [int(a.split("=")[1]) for a in head + worker if a.split("=")[0].endswith("port") and "=" in a]
    assert all(10000 <= p < 10000 + RAY_BLOCK for p in used)


def test_the_layer_split_follows_the_order_vllm_gives_nodes_their_stages():
    """vLLM's Ray executor ranks the driver's node first, then nodes with fewer of the engine's workers, then
    by IP string: the planned split is handed over in that order, each node keeping its stages' layers."""
    from thunderops.serve.ray_cluster import vllm_layer_partition

    layers = {"h": [20, 20], "big": [12, 12], "small": [16]}  # planned order: h, big, small
    gpus = {"h": 2, "big": 2, "small": 1}
    assert vllm_layer_partition("h", layers, gpus, {"h": "10.0.0.9", "big": "10.0.0.1", "small": "10.0.0.2"}) \
        == [20, 20, 16, 12, 12]  # small has fewer workers: its stage comes right after the head's
    same = {"h": [20], "b": [30], "c": [30]}
    assert vllm_layer_partition("h", same, {"h": 1, "b": 1, "c": 1}, {"h": "10.0.0.9", "b": "10.0.0.20",
                                                                     "c": "10.0.0.3"}) == [20, 30, 30]
    assert vllm_layer_partition("h", {"h": [8], "b": [9], "c": [7]}, {"h": 1, "b": 1, "c": 1},
                                {"h": "10.0.0.9", "b": "10.0.0.20", "c": "10.0.0.3"}) == [8, 9, 7]  # "10.0.0.20" < "10.0.0.3"


def test_the_head_node_wraps_its_engine_and_opens_no_ray_port():
    plan = spanning_plan()
    on_a = {e.name: e for e in engine_launches(plan, "a", Ports())}
    g0 = on_a["engine-g0"].argv
    assert g0[:3] == ["thunderops", "serve", "ray-engine"]
    assert g0[g0.index("--gpus") + 1] == "0,1" and g0[g0.index("--expect-gpus") + 1] == "3"
    assert g0[g0.index("--") + 1:][:2] == ["vllm", "serve"]  # the engine line itself, unchanged
    assert g0[g0.index("--instance") + 1] == "a" and "--layers=a=11,11" in g0 and "--layers=b=10" in g0
    assert "--distributed-executor-backend" in g0
    assert on_a["engine-g2"].argv[on_a["engine-g2"].argv.index("--port") + 1] == str(Ports().ray + 2 * RAY_BLOCK)
    on_b = {e.name: e for e in engine_launches(plan, "b", Ports())}
    assert set(on_b) == {"engine-g1"} and on_b["engine-g1"].argv[:2] == ["vllm", "serve"]
    for inst in plan.instances:  # Ray has no authentication: its ports never open to the internet
        task = engine_task(plan, inst, deployment="d1", node_id="n", cluster="c")
        assert not [p for p in task["resources"]["ports"] if Ports().ray <= p < Ports().ray + 8 * RAY_BLOCK]


def test_scheduler_keeps_a_spanning_replica_within_one_cloud_region():
    from thunderops.perf import PerfModel
    from thunderops.plan import SLO
    from thunderops.scheduler.harness import Harness, canon
    from thunderops.scheduler.inventory import parse_inventory
    from thunderops.workload import get_workload

    inv = parse_inventory({"nodes": [{"name": "x", "gpu": "A100-80GB", "gpus": 1, "region": "r1"},
                                     {"name": "y", "gpu": "A100-80GB", "gpus": 1, "region": "r1"},
                                     {"name": "z", "gpu": "A100-80GB", "gpus": 1, "region": "r2"}]}, "t")
    h = Harness(list(inv.instances), PerfModel("llama-3.1-70b"), get_workload("coding"), SLO(2.0, 0.1, 0.9))
    (x,), (y,), (z,) = h.units_of
    assert h.allowed(canon([((x, y), "colocated")]))
    assert not h.allowed(canon([((x, z), "colocated")]))
    assert h.evaluate(canon([((x, z), "colocated")])).goodput == 0


FAKE_ENGINE = textwrap.dedent("""
    import json, os, sys
    import ray
    ray.init(address=os.environ["RAY_ADDRESS"], logging_level="ERROR", log_to_driver=False)
    out = {"gpus": ray.cluster_resources().get("GPU", 0), "nodes": sum(n["Alive"] for n in ray.nodes()),
           "address": os.environ["RAY_ADDRESS"], "partition": os.environ.get("VLLM_PP_LAYER_PARTITION"),
           "other": os.environ.get("OTHER_ENV")}
    open(sys.argv[1], "w").write(json.dumps(out))
""")


def _free_block(blocks: int) -> int:
    """A first port with `blocks` Ray port blocks free after it."""
    import socket

    for _ in range(50):
        base = free_port()
        if base + blocks * RAY_BLOCK >= 60000:
            continue
        try:
            socks = []
            for p in range(base, base + blocks * RAY_BLOCK):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port block")


@pytest.mark.slow
def test_a_spanning_engine_runs_once_its_worker_node_joined(tmp_path, agents):
    """The head node's `thunderops serve ray-engine` starts a Ray head and holds the engine back until the
    worker's agent has joined (asked by `join_ray_clusters`, as `up` does once the nodes are up); the engine
    then sees the whole group's GPUs on RAY_ADDRESS, and the head ends with it. Real Ray processes, a real
    agent; only the engine is a stand-in (a script reporting what it sees)."""
    from thunderops.agent import token_path
    from thunderops.controller.engines import join_ray_clusters
    from thunderops.provision import Node

    path = token_path("d1")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(TOKEN + "\n")
    os.chmod(path, 0o600)
    worker = agents.start("b", "--gpu", "A100", "--gpus", "2", "--advertise-host", "127.0.0.1",
                          env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
                               "THUNDEROPS_LOG_DIR": str(tmp_path / "worker-logs")})
    base = _free_block(2)
    head_block, worker_block = base, base + RAY_BLOCK  # g0 holds GPUs 0,1 of a and GPU 1 of b
    plan = spanning_plan()
    engine = tmp_path / "engine.py"
    engine.write_text(FAKE_ENGINE)
    report = tmp_path / "seen.json"
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", VLLM_PP_LAYER_PARTITION="not-this", OTHER_ENV="kept")
    head = subprocess.Popen(
        [sys.executable, "-m", "thunderops.serve", "ray-engine", "--port", str(head_block), "--gpus", "0,1",
         "--expect-gpus", "3", "--node-ip", "127.0.0.1", "--timeout", "120", "--log-dir", str(tmp_path / "head"),
         "--instance", "a", "--layers", "a=11,11", "--layers", "b=10",
         "--", sys.executable, str(engine), str(report)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        time.sleep(3)
        assert head.poll() is None and not report.exists()  # waiting for the worker, engine not started
        # `up`'s call, with the head's agent stood in by the worker's (one machine): the join it sends
        nodes = {"a": Node("n-a", "d1", "a", "c-a", "127.0.0.1", "A100", 4, "ready",
                           Ports(agent=worker.port, ray=base)),
                 "b": Node("n-b", "d1", "b", "c-b", "127.0.0.1", "A100", 2, "ready", Ports(agent=worker.port, ray=base))}
        lines = join_ray_clusters("d1", plan, ["g0", "g1"], nodes, timeout_s=30)
        assert lines == [f"g0: b joins the Ray head at 127.0.0.1:{head_block}"]
        again = join_ray_clusters("d1", plan, ["g0"], nodes, timeout_s=30)  # idempotent: the raylet runs on
        assert again == lines
        out, _ = head.communicate(timeout=180)
        assert head.returncode == 0, out.decode(errors="replace")[-2000:]
        seen = json.loads(report.read_text())
        assert seen["gpus"] == 3 and seen["nodes"] == 2 and seen["address"] == f"127.0.0.1:{head_block}"
        # the split as vLLM will rank the nodes (found by their raylets' instance tags), the rest of the
        # engine's environment as given
        assert seen["partition"] == "11,11,10" and seen["other"] == "kept"
        req = urllib.request.Request(worker.url + "/v1/ray", headers={"Authorization": f"Bearer {TOKEN}"})
        status = json.loads(urllib.request.urlopen(req, timeout=5).read())
        assert status["g0"]["running"] and status["g0"]["gpus"] == [1]
        first_pid = status["g0"]["pid"]
        # the engine's supervisor starts it again, with a new Ray head on the same address: the worker's raylet
        # belongs to the cluster that ended, so the same join now restarts it into the new one
        report.unlink()
        # (its own Ray temp dir: on one machine the worker's stale raylet, which names the old head's address,
        # would otherwise make Ray refuse a head on that address; on a real head node it runs elsewhere)
        ray2 = tempfile.mkdtemp(prefix="r2-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
        for attempt in range(3):  # as the supervisor does, a head that fails to start is started again
            head = subprocess.Popen(head.args, env={**env, "RAY_TMPDIR": ray2},
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            time.sleep(3)
            assert not report.exists()
            join_ray_clusters("d1", plan, ["g0"], nodes, timeout_s=30)
            out, _ = head.communicate(timeout=180)
            if head.returncode == 0 or attempt == 2:
                break
            time.sleep(5)
        assert head.returncode == 0, out.decode(errors="replace")[-2000:]
        assert json.loads(report.read_text())["gpus"] == 3
        status = json.loads(urllib.request.urlopen(req, timeout=5).read())
        assert status["g0"]["pid"] != first_pid
    finally:
        if head.poll() is None:
            head.terminate()
            head.wait(60)
    agents.stop_all()  # the agent ends the raylet it started: nothing of Ray is left on this block
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and _listening(worker_block + 2):
        time.sleep(0.5)
    assert not _listening(head_block) and not _listening(worker_block + 2)
    shutil.rmtree(ray2, ignore_errors=True)


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_bad_join_requests_are_refused(agents):
    a = agents.start("w", "--gpu", "A100", "--gpus", "2", env={"PATH": "/nonexistent"})
    for body, needle in [({"group": "g 0", "head": "10.0.0.1:10000", "gpus": [0]}, "group"),
                         ({"group": "g0", "head": "10.0.0.1;rm -rf /:10000", "gpus": [0]}, "head"),
                         ({"group": "g0", "head": "10.0.0.1:99999", "gpus": [0]}, "head"),
                         ({"group": "g0", "head": "10.0.0.1:10000", "gpus": [2]}, "gpus"),
                         ({"group": "g0", "head": "10.0.0.1:10000", "gpus": [0, 0]}, "gpus"),
                         ({"group": "g0", "head": "10.0.0.1:10000", "gpus": ["0"]}, "gpus")]:
        req = urllib.request.Request(a.url + "/v1/ray/join", data=json.dumps(body).encode(), method="POST",
                                     headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=5)
        assert e.value.code == 400 and needle in json.loads(e.value.read())["error"], body



@pytest.mark.parametrize("args,needle", [
    (["--gpus", "x", "--expect-gpus", "2", "--", "echo"], "--gpus must be GPU ids"),
    (["--gpus", "0", "--expect-gpus", "2"], "engine command after --"),
    (["--gpus", "0,1", "--expect-gpus", "1", "--", "echo"], "do not describe a group"),
    (["--gpus", "0", "--expect-gpus", "2", "--layers", "a=1", "--", "echo"], "--layers needs --instance"),
    (["--gpus", "0", "--expect-gpus", "2", "--instance", "a", "--layers", "a=x", "--", "echo"], "INSTANCE=20,12"),
])
def test_ray_engine_bad_input_one_line_exit_2(args, needle, tmp_path):
    """Refused before any Ray process starts: one line, exit 2, and no head left listening."""
    port = free_port()
    r = subprocess.run([sys.executable, "-m", "thunderops.serve", "ray-engine", "--port", str(port),
                        "--log-dir", str(tmp_path), *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not _listening(port) and not list(tmp_path.iterdir())
