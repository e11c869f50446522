"""The local provider on a real multi-node Ray cluster on 127.0.0.1: nodes carry their declared GPU types,
real Ray tasks land on the node of their plan instance, a dead node is seen in about 2 s, and `down` ends
exactly the Ray processes it started, also after `up` was killed with SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from thunderops.errors import ProvisionError, StateError
from thunderops.plan import Group, Plan, Stage
from thunderops.provision.local import LocalProvider, gpu_resource, node_resource, ray_connect, stop_pids
from thunderops.scheduler.inventory import parse_inventory
from thunderops.state import Store

pytestmark = pytest.mark.slow

INVENTORY = {"nodes": [{"name": "a100box", "gpu": "A100", "gpus": 2, "price_per_hour": 0},
                       {"name": "l4box", "gpu": "L4", "gpus": 1, "price_per_hour": 0.5}]}


def inventory_plan(inv=INVENTORY) -> Plan:
    insts = parse_inventory(inv, "test").instances
    groups = [Group(id=f"g{k}", phase="colocated", stages=[Stage(i.id, i.gpu, i.gpus, 32)])
              for k, i in enumerate(insts)]
    cost = sum(i.price_per_hour for i in insts)
    return Plan(model="llama-2-7b", budget_per_hour=cost + 1, cost_per_hour=cost, instances=insts, groups=groups,
                routing=[])


def start(store: Store, dep: str, plan: Plan) -> None:
    store.create_deployment(dep, provider="local", model=plan.model)
    store.add_plan(dep, plan)


def _all_pids(store: Store, dep: str) -> list[int]:
    return sorted({p for r in store.nodes(dep) for p in [*r.meta["pids"], *r.meta["head_pids"]]})


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_emulated_nodes_run_real_ray_work_and_a_dead_node_is_seen_in_about_2s():
    import ray

    p = LocalProvider(emulate=True)
    plan = inventory_plan()
    start(p.store, "loc1", plan)
    try:
        result = p.up("loc1", plan)
        assert result.ok and [n.instance_id for n in result.nodes] == ["a100box", "l4box"]
        assert {n.host for n in result.nodes} == {"127.0.0.1"}
        assert len({n.ports.engine for n in result.nodes}) == 2  # one host: distinct ports per node
        ray_connect(p.ray_address("loc1"))

        @ray.remote(num_cpus=0)
        def where() -> str:
            return ray.get_runtime_context().get_node_id()

        for node in result.nodes:
            inst = plan.instance(node.instance_id)
            res = {node_resource(inst.id): 0.1, gpu_resource(inst.gpu): float(inst.gpus)}
            assert ray.get(where.options(resources=res).remote(), timeout=60) == node.cluster_name
        assert {n.status for n in p.status("loc1")} == {"ready"}

        # a replacement (the controller's sub-plan) joins the same Ray cluster; no plan version is stored
        extra = inventory_plan({"nodes": [{"name": "spare", "gpu": "L4", "gpus": 1}]})
        extra.version = 1
        added = p.up("loc1", extra).nodes[0]
        assert ray.get(where.options(resources={node_resource("spare"): 0.1}).remote(), timeout=60) == \
            added.cluster_name
        assert p.store.plan_versions("loc1") == [1] and len(p.store.nodes("loc1")) == 3

        # down_node lets one node go (how the controller drops a lost or replaced node): its Ray processes
        # end, the Ray cluster loses it, the others keep running; a second call does nothing
        spare_pids = p.store.node(added.id).meta["pids"]
        assert p.down_node(added.id).terminated == [added.cluster_name]
        assert spare_pids and not any(_running(pid) for pid in spare_pids)
        assert p.store.node(added.id).status == "terminated" and p.store.node(added.id).terminated_at
        assert p.down_node(added.id).terminated == []
        t0 = time.monotonic()
        while time.monotonic() - t0 < 20 and any(n["NodeID"] == added.cluster_name and n["Alive"] for n in ray.nodes()):
            time.sleep(0.2)
        assert not any(n["NodeID"] == added.cluster_name and n["Alive"] for n in ray.nodes())

        victim = p.store.node(result.nodes[1].id)
        raylet = victim.meta["pids"][0]
        os.kill(raylet, signal.SIGSTOP)  # hung, not exited: only the health checks can tell
        t0 = time.monotonic()
        while time.monotonic() - t0 < 20:
            states = {n.instance_id: n.status for n in p.status("loc1")}
            if states["l4box"] == "dead":
                break
            time.sleep(0.1)
        detected = time.monotonic() - t0
        os.kill(raylet, signal.SIGKILL)
        assert states == {"a100box": "ready", "l4box": "dead", "spare": "terminated"}
        assert detected < 5.0, f"dead node seen after {detected:.1f} s"
        print(f"dead node detected after {detected:.2f} s")
    finally:
        pids = _all_pids(p.store, "loc1") if p.store.has_deployment("loc1") and p.store.nodes("loc1") else []
        p.down("loc1")
    assert pids and not any(_running(pid) for pid in pids)
    assert {r.status for r in p.store.nodes("loc1")} == {"terminated"}


_UP_THEN_HANG = textwrap.dedent("""
    import sys, time
    from tests.test_provision_local import inventory_plan, start
    from thunderops.provision.local import LocalProvider
    p = LocalProvider(emulate=True)
    plan = inventory_plan()
    start(p.store, "loc2", plan)
    p.up("loc2", plan)
    print("UP", flush=True)
    time.sleep(300)
""")


def test_down_ends_the_ray_processes_of_an_up_that_was_killed(thunderops_home):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, "-c", _UP_THEN_HANG], cwd=root, stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, THUNDEROPS_HOME=str(thunderops_home)))
    try:
        assert proc.stdout.readline().strip() == "UP"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    store = Store()
    pids = _all_pids(store, "loc2")
    assert pids and {r.status for r in store.nodes("loc2")} == {"ready"}  # what the store last heard
    # Ray's processes share the fate of the process that started them, so the nodes died with `up`;
    # status asks Ray, not the store, and says so
    deadline = time.monotonic() + 60
    while {n.status for n in LocalProvider(store).status("loc2")} != {"dead"} and time.monotonic() < deadline:
        time.sleep(0.5)
    assert {n.status for n in LocalProvider(store).status("loc2")} == {"dead"}
    result = LocalProvider(store).down("loc2")
    assert len(result.terminated) == 2
    assert not any(_running(pid) for pid in pids)
    assert store.deployment("loc2").status == "down"
    assert LocalProvider(store).down("loc2").terminated == []  # idempotent
    downs = [e.message for e in store.events("loc2", "down")]
    assert downs[-2:] == ["stopped 2 local node(s)", "down again: no local node was running"]  # says what it did
    with pytest.raises(StateError):
        LocalProvider(store).down("nope")


def test_attach_to_a_ray_cluster_started_on_the_hosts():
    import tempfile

    from ray.cluster_utils import Cluster

    temp_dir = tempfile.mkdtemp(prefix="to-ray-test-")
    os.makedirs(os.path.join(temp_dir, "ray"))
    os.environ["RAY_TMPDIR"] = temp_dir
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "node_ip_address": "127.0.0.1",
                                                            "include_dashboard": False,
                                                            "temp_dir": os.path.join(temp_dir, "ray")})
    pids = []
    try:
        plan = inventory_plan()
        for inst in plan.instances[:1]:  # only the first host has joined so far
            rn = cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1",
                                  resources={node_resource(inst.id): 1, gpu_resource(inst.gpu): inst.gpus})
            pids += [p.process.pid for infos in rn.all_processes.values() for p in infos]
        pids += [p.process.pid for infos in cluster.head_node.all_processes.values() for p in infos]
        p = LocalProvider(address=cluster.address)
        start(p.store, "att1", plan)
        with pytest.raises(ProvisionError, match=r"l4box.*ray start --address=.*thunderops_node_l4box"):
            p.up("att1", plan)
        assert p.store.deployment("att1").status == "failed"
        one = inventory_plan({"nodes": INVENTORY["nodes"][:1]})
        p.store.create_deployment("att2", provider="local")
        result = p.up("att2", one)
        assert result.ok and result.nodes[0].host == "127.0.0.1"
        p.down("att2")
        assert all(_running(pid) for pid in pids)  # attached machines are yours: down leaves them running
    finally:
        import ray

        ray.shutdown()
        cluster.shutdown()
        stop_pids(pids)
