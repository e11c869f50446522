"""The local provider: machines you already have, joined in a Ray cluster, behind the same interface as SkyPilot.

Every node of a deployment is a Ray node carrying two custom resources: `thunderops_node_<instance>` (so work
can be pinned to that plan instance) and `thunderops_gpu_<GPU type>` (its declared GPUs). Two ways in:

- start nodes here (`LocalProvider()`, or `emulate=True` for trials and tests): a head and one Ray node per
  plan instance on 127.0.0.1, each with its declared GPU type (`ray.cluster_utils.Cluster`; with
  `emulate=False` the node also gets the GPUs as Ray `num_gpus`). The serving step fills them with engines
  or engine emulators. Replacement nodes join the same cluster: from this process through its `Cluster`,
  from another one (the background controller of `thunderops up`) at the address the nodes' records hold.
- attach to a Ray cluster you started on your hosts (`address=HOST:PORT`): each inventory node runs
  `ray start --address=... --resources='{"thunderops_node_<name>": 1, "thunderops_gpu_<GPU>": N}'`;
  `up` checks that every plan instance is there (and prints the command for the ones that are not).

Ray's GCS health checks are tuned so that a dead node is seen in about 2 s (`HEALTH`).
Process ids of the Ray processes we start are recorded in the store, so `down` from another process (or
after `up` was killed) ends exactly those processes and nothing else.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from rich.console import Console

from thunderops.errors import ProvisionError
from thunderops.plan import Plan
from thunderops.provision import (
    AGENT_PORT,
    ENGINE_PORT,
    KV_PORT,
    DownResult,
    Node,
    Ports,
    Provider,
    ProvisionResult,
    stored_version,
)
from thunderops.provision.tasks import slug
from thunderops.specs import get_gpu
from thunderops.state import Store, now_utc

# A node missing 3 health checks 400 ms apart (each timing out after 400 ms) is declared dead: ~2 s.
HEALTH = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 400, "health_check_timeout_ms": 400,
          "health_check_failure_threshold": 3}
LOOPBACK = ("127.0.0.1", "localhost", "::1")
_TEMP_PREFIX = "/to-ray-"  # each deployment's Ray temp dir: /tmp/to-ray-<deployment>-<random>
_RAY_PROCESS_WORDS = ("raylet", "gcs_server", "ray", "dashboard", "log_monitor", "monitor.py")


def node_resource(instance_id: str) -> str:
    return f"thunderops_node_{slug(instance_id, 40)}"


def gpu_resource(gpu: str) -> str:
    return f"thunderops_gpu_{get_gpu(gpu).name}"


GCS_WAIT_ENV = "RAY_gcs_server_port_wait_time_s"  # Ray's own knob: attempts (about 1 s apart) to reach a GCS


def ray_connect(address: str) -> None:
    """Connect this process to the Ray cluster at `address` as a driver. Ray turns a loopback address into
    the machine's IP unless told it is not running a multi-host cluster; for 127.0.0.1 we tell it so."""
    import ray
    from ray._private import ray_constants

    host = address.rsplit(":", 1)[0]
    if ray.is_initialized():
        if ray.get_runtime_context().gcs_address == address:
            return
        ray.shutdown()  # connected to another cluster: switch
    if host in LOOPBACK:
        ray_constants.ENABLE_RAY_CLUSTER = False  # read at call time by ray._private.services
    # A GCS that dies between our reachability check and the connection (a cluster going down with the
    # process that started it) would be retried for up to 120 attempts of several seconds each: give it 3.
    ours = GCS_WAIT_ENV not in os.environ
    if ours:
        os.environ[GCS_WAIT_ENV] = "3"
    try:
        ray.init(address=address, namespace="thunderops", ignore_reinit_error=True,
                 _node_ip_address=host if host in LOOPBACK else None,
                 log_to_driver=False, logging_level="WARNING", configure_logging=False)
    finally:
        if ours:
            os.environ.pop(GCS_WAIT_ENV, None)



def gcs_reachable(address: str, timeout_s: float = 2.0) -> bool:
    """Whether the cluster's GCS accepts connections (ray.init would retry a dead one for minutes)."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


def ray_alive(address: str) -> dict[str, bool]:
    """Ray's own view: node id (hex) -> alive, for the cluster at `address` ({} when it is gone)."""
    import ray

    if not gcs_reachable(address):
        return {}
    ray_connect(address)
    return {n["NodeID"]: bool(n["Alive"]) for n in ray.nodes()}


_FD_LOCK = threading.Lock()


@contextmanager
def _children_output_to(path: str) -> Iterator[None]:
    """Ray's node processes inherit our stdout/stderr and write their logs there; point both at a log file
    while they are spawned, so `thunderops up --json` prints JSON only."""
    with _FD_LOCK, open(path, "ab") as log:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = [os.dup(1), os.dup(2)]
        try:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


@dataclass
class _Started:
    """A Ray cluster this process started for one deployment."""

    cluster: Any
    temp_dir: str


@dataclass
class _HostCluster:
    """Where a deployment's nodes join: its Ray cluster's address, head processes, temp dir, and whether its
    nodes only declare their GPUs (emulated engines)."""

    address: str
    head_pids: list[int]
    temp_dir: str
    emulate: bool


def _node_resources(inst: Any, emulate: bool) -> dict[str, Any]:
    """A plan instance's Ray node resources: its pin and GPU type, and its GPUs as Ray GPUs unless emulated."""
    gpus = int(inst.gpus)
    return {"num_gpus": 0 if emulate else gpus,
            "resources": {node_resource(inst.id): 1.0, gpu_resource(inst.gpu): float(gpus)}}


def _pids(ray_node: Any) -> list[int]:
    return sorted({p.process.pid for infos in ray_node.all_processes.values() for p in infos if p.process})


def _is_ray_process(pid: int) -> bool:
    """Guard against pid reuse: only end a recorded pid that is still a Ray process."""
    try:
        cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return any(w in cmd for w in _RAY_PROCESS_WORDS)


def _open_files(pid: int) -> list[str]:
    """What process `pid` has open (`/proc/<pid>/fd` targets; a deleted file ends in " (deleted)")."""
    fd_dir = f"/proc/{pid}/fd"
    out = []
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return out
    for fd in fds:
        try:
            out.append(os.readlink(os.path.join(fd_dir, fd)))
        except OSError:
            continue
    return out


def _log_files(ray_node: Any, temp_dir: str) -> list[str]:
    """The node's own log files (`logs/raylet.<n>.out` and `.err` of its session, which Ray numbers per node):
    its agents inherit them and keep them open, which marks them once their raylet is gone."""
    under = os.path.join(temp_dir, "")
    return sorted({t for p in ray_node.all_processes.get("raylet", []) for t in _open_files(p.process.pid)
                   if t.startswith(under) and os.path.basename(t).startswith("raylet.")})


def _processes() -> dict[int, int]:
    """Every process on this machine: pid -> parent pid."""
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    out[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    return out


def _ray_leftovers(pids: list[int], holding: list[str]) -> set[int]:
    """Ray's own processes that `pids` leave behind: their children (a raylet's dashboard and runtime-env
    agents, its workers), and any that hold a file under one of `holding` open, which finds them once their
    raylet died first (a node lost with SIGKILL orphans its agents, which then run on)."""
    procs = _processes()
    children: dict[int, list[int]] = {}
    for pid, ppid in procs.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = set(), list(pids)
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    prefixes = tuple(h for h in holding if _TEMP_PREFIX in h)  # only files of a Ray temp dir of ours
    if prefixes:
        out |= {pid for pid in procs if any(f.startswith(prefixes) for f in _open_files(pid))}
    mine, p = set(), os.getpid()
    while p > 1 and p not in mine:  # never this process or those above it
        mine.add(p)
        p = procs.get(p, 0)
    return {p for p in out - mine if _is_ray_worker(p)}


def _is_ray_worker(pid: int) -> bool:
    """A process Ray started (agents and workers name themselves ray::...; its daemons by their binary), not a
    program that merely talks to Ray (a driver such as `thunderops up` also has session files open)."""
    try:
        argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
    except OSError:
        return False
    return argv[0].startswith(b"ray::") or os.path.basename(argv[0]) in (b"raylet", b"gcs_server")


def stop_pids(pids: list[int], timeout_s: float = 5.0, holding: list[str] | None = None) -> list[int]:
    """SIGTERM then SIGKILL the recorded Ray processes still running and what they leave behind (see
    `_ray_leftovers`; `holding`: paths whose open files mark the node's processes); returns the recorded
    ones that were running."""
    running = [p for p in pids if _is_ray_process(p)]
    targets = sorted(set(running) | _ray_leftovers(running, list(holding or [])))
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in targets:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and any(_alive(p) for p in targets):
            time.sleep(0.1)
        if not any(_alive(p) for p in targets):
            break
    return running


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)  # reap our own children
        return done == 0
    except ChildProcessError:
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().split(")")[-1].split()[0] != "Z"
        except OSError:
            return False


class LocalProvider(Provider):
    name = "local"

    def __init__(self, store: Store | None = None, *, emulate: bool = False, address: str | None = None,
                 console: Console | None = None, health: dict[str, int] | None = None,
                 start_timeout_s: float = 120.0) -> None:
        self.store = store or Store()
        self.emulate = emulate
        self.address = address
        self.console = console
        self.health = dict(HEALTH if health is None else health)
        self.start_timeout_s = start_timeout_s
        self._started: dict[str, _Started] = {}
        self._lock = threading.Lock()

    # -- up ---------------------------------------------------------------------------------------------
    def up(self, deployment: str, plan: Plan, *, keep_partial: bool = False) -> ProvisionResult:
        store = self.store
        if not plan.instances:
            raise ProvisionError("the plan has no instances; nothing to bring up")
        version = stored_version(store, deployment, plan)
        with self._lock:
            growing = deployment in self._started
        host = None if growing or self.address else self._host_cluster(deployment)
        growing = growing or host is not None
        if not growing:
            store.set_deployment_status(deployment, "provisioning")
        store.add_event(deployment, "provision-start", f"local provider, {len(plan.instances)} node(s)",
                        {"plan_version": version, "emulate": self.emulate, "address": self.address})
        try:
            if self.address:
                nodes = self._attach(deployment, plan)
            elif host is not None:
                nodes = self._join_nodes(deployment, plan, host)
            elif growing:
                nodes = self._add_nodes(deployment, plan)
            else:
                nodes = self._start(deployment, plan)
        except BaseException as e:
            store.add_event(deployment, "provision-failed", str(e).splitlines()[0] if str(e) else type(e).__name__)
            if growing:
                raise  # the deployment's running nodes stay; only this addition failed
            if not keep_partial:
                self.down(deployment)
            store.set_deployment_status(deployment, "failed")
            raise
        final = Plan.from_dict(plan.to_dict())
        for inst in final.instances:
            inst.host = next(n.host for n in nodes if n.instance_id == inst.id)
        store.set_deployment_status(deployment, "up")
        store.add_event(deployment, "provision-done", f"{len(nodes)} Ray node(s) up",
                        {"plan_version": version, "address": self.ray_address(deployment)})
        return ProvisionResult(deployment, final, version, nodes, ok=True)

    def _start(self, deployment: str, plan: Plan) -> list[Node]:
        """A Ray head and one Ray node per plan instance on this machine."""
        from ray.cluster_utils import Cluster

        remote = [i.id for i in plan.instances if i.host and i.host not in LOOPBACK]
        if remote:
            raise ProvisionError(f"instances {', '.join(remote)} are on other hosts: start Ray there and pass "
                                 "--ray-address (see docs/provision.md), or plan for this machine only")
        # Ray's socket paths must stay short (AF_UNIX limit), so its temp dir lives directly under /tmp.
        temp_dir = tempfile.mkdtemp(prefix=f"{_TEMP_PREFIX[1:]}{deployment}-")
        os.makedirs(os.path.join(temp_dir, "ray"))
        os.environ["RAY_TMPDIR"] = temp_dir  # Ray writes its current-cluster file under $RAY_TMPDIR/ray
        head_args = {"num_cpus": 0, "num_gpus": 0, "node_ip_address": "127.0.0.1", "include_dashboard": False,
                     "temp_dir": os.path.join(temp_dir, "ray"), "_system_config": self.health}
        with _children_output_to(os.path.join(temp_dir, "ray-output.log")):
            cluster = Cluster(initialize_head=True, head_node_args=head_args)
        with self._lock:
            self._started[deployment] = _Started(cluster, temp_dir)
        return self._add_nodes(deployment, plan)

    def _add_nodes(self, deployment: str, plan: Plan) -> list[Node]:
        """One Ray node per plan instance, added to the cluster this process started for the deployment."""
        with self._lock:
            started = self._started[deployment]
        cluster = started.cluster
        if threading.current_thread() is not threading.main_thread():
            cluster._shutdown_at_exit = False  # Ray installs signal handlers only from the main thread
        ray_nodes = []
        with _children_output_to(os.path.join(started.temp_dir, "ray-output.log")):
            for inst in plan.instances:
                ray_nodes.append(cluster.add_node(wait=False, num_cpus=1, node_ip_address="127.0.0.1",
                                                  **_node_resources(inst, self.emulate)))
        cluster.wait_for_nodes(timeout=self.start_timeout_s)
        host = _HostCluster(cluster.address, _pids(cluster.head_node), started.temp_dir, self.emulate)
        return self._record(deployment, plan, ray_nodes, host)

    def _host_cluster(self, deployment: str) -> _HostCluster | None:
        """The Ray cluster another process (the `thunderops up` holding a local deployment) started for
        `deployment`, as its live nodes record it; None when it has none. Its head being gone is an error:
        nothing is left to add nodes to."""
        owned = [r for r in self.store.nodes(deployment) if r.meta.get("owned") and r.meta.get("address")]
        if not owned:
            return None
        meta = owned[-1].meta  # the latest node: its cluster is the one still running, if any
        heads = [int(p) for p in meta.get("head_pids", [])]
        address = str(meta["address"])
        if not (any(_is_ray_process(p) and _alive(p) for p in heads) and gcs_reachable(address)):
            raise ProvisionError(f"the Ray cluster of deployment {deployment} (head at {address}) is gone, so no "
                                 f"node can join it; `thunderops down {deployment}` and `thunderops up` again")
        return _HostCluster(address, heads, str(meta.get("temp_dir") or tempfile.gettempdir()),
                            bool(meta.get("emulate")))

    def _join_nodes(self, deployment: str, plan: Plan, host: _HostCluster) -> list[Node]:
        """One Ray node per plan instance, joined to `host`, a cluster another process started (how a
        background controller brings replacements in). Each is what `ray start --address` starts, made the way
        Ray's cluster_utils adds a node, so that its process ids are known; it outlives this process, and
        `down` ends it by those ids."""
        from ray._private.node import Node as RayNode
        from ray._private.parameter import RayParams

        ray_nodes: list[Any] = []
        try:
            with _children_output_to(os.path.join(host.temp_dir, "ray-output.log")):
                for inst in plan.instances:
                    params = RayParams(gcs_address=host.address, node_ip_address="127.0.0.1", num_cpus=1,
                                       object_store_memory=150 * 1024 * 1024, min_worker_port=0, max_worker_port=0,
                                       include_log_monitor=False, node_manager_port=0,
                                       **_node_resources(inst, host.emulate))
                    params.dashboard_agent_listen_port = None  # let it pick one: the head's agent has the default
                    ray_nodes.append(RayNode(params, head=False, shutdown_at_exit=False, spawn_reaper=False))
            want = {rn.node_id for rn in ray_nodes}
            deadline = time.monotonic() + self.start_timeout_s
            while not want <= {n for n, up in ray_alive(host.address).items() if up}:
                if time.monotonic() > deadline:
                    raise ProvisionError(f"{len(want)} Ray node(s) did not join {host.address} within "
                                         f"{self.start_timeout_s:g} s; see {host.temp_dir}/ray-output.log")
                time.sleep(0.2)
        except BaseException:  # nothing half-joined keeps running unrecorded
            stop_pids([p for rn in ray_nodes for p in _pids(rn)])
            raise
        return self._record(deployment, plan, ray_nodes, host)

    def _record(self, deployment: str, plan: Plan, ray_nodes: list[Any], host: _HostCluster) -> list[Node]:
        """Record each new Ray node (in plan order) as the deployment's node for its plan instance."""
        nodes = []
        base = len(self.store.nodes(deployment))
        for k, (inst, rn) in enumerate(zip(plan.instances, ray_nodes, strict=True)):
            n = base + k
            ports = Ports(ENGINE_PORT + 20 * n, KV_PORT + 20 * n, AGENT_PORT + 4 * n)  # one host: no clashes
            node_id = self._new_node_id(deployment, inst.id)
            self.store.record_node_intent(
                deployment, node_id, inst.id, rn.node_id, cloud="local", region="local", zone="",
                instance_type=inst.instance_type, gpu=inst.gpu, gpus=inst.gpus, spot=False,
                price_per_hour=inst.price_per_hour, host="127.0.0.1", status="ready", launched_at=now_utc(),
                engine_port=ports.engine, kv_port=ports.kv, agent_port=ports.agent,
                meta={"ray_node_id": rn.node_id, "address": host.address, "pids": _pids(rn),
                      "logs": _log_files(rn, host.temp_dir), "head_pids": host.head_pids,
                      "temp_dir": host.temp_dir, "emulate": host.emulate, "owned": True})
            nodes.append(Node.from_record(self.store.node(node_id)))
        return nodes

    def _new_node_id(self, deployment: str, instance_id: str) -> str:
        taken = {r.id for r in self.store.nodes(deployment)}
        base = f"local-{deployment}-{slug(instance_id)}"
        k = 1
        while (node_id := base if k == 1 else f"{base}-{k}") in taken:
            k += 1
        return node_id

    def _attach(self, deployment: str, plan: Plan) -> list[Node]:
        """Match every plan instance to a live node of the Ray cluster at `self.address`."""
        import ray

        try:
            ray_connect(self.address)
        except Exception as e:  # Ray raises ConnectionError, RuntimeError, TimeoutError...
            raise ProvisionError(f"cannot reach the Ray cluster at {self.address} ({type(e).__name__}); "
                                 "start it with `ray start --head` and pass its address") from None
        live = [n for n in ray.nodes() if n["Alive"]]
        missing, nodes = [], []
        for inst in plan.instances:
            want = node_resource(inst.id)
            match = next((n for n in live if n["Resources"].get(want)), None)
            if match is None:
                missing.append(f"on {inst.host or inst.id}: ray start --address={self.address} "
                               f"--resources='{json.dumps({want: 1, gpu_resource(inst.gpu): inst.gpus})}'")
                continue
            have = match["Resources"].get(gpu_resource(inst.gpu), 0)
            if have < inst.gpus:
                raise ProvisionError(f"Ray node for {inst.id} declares {have:g} {inst.gpu} GPUs, the plan needs "
                                     f"{inst.gpus}; restart it with --resources for {gpu_resource(inst.gpu)}")
            node_id = self._new_node_id(deployment, inst.id)
            self.store.record_node_intent(
                deployment, node_id, inst.id, match["NodeID"], cloud="local", region="local",
                instance_type=inst.instance_type, gpu=inst.gpu, gpus=inst.gpus, spot=False,
                price_per_hour=inst.price_per_hour, host=match["NodeManagerAddress"], status="ready",
                launched_at=now_utc(), meta={"ray_node_id": match["NodeID"], "address": self.address, "owned": False})
            nodes.append(Node.from_record(self.store.node(node_id)))
        if missing:
            raise ProvisionError("plan instances missing from the Ray cluster; run " + " ; ".join(missing))
        return nodes

    # -- status / down ----------------------------------------------------------------------------------
    def ray_address(self, deployment: str) -> str | None:
        with self._lock:
            started = self._started.get(deployment)
        if started is not None:
            return started.cluster.address
        for r in self.store.nodes(deployment):
            if r.meta.get("address"):
                return str(r.meta["address"])
        return self.address

    def status(self, deployment: str) -> list[Node]:
        """The deployment's nodes; a live one whose Ray node is gone shows as `dead`."""
        recs = self.store.nodes(deployment)
        live = [r for r in recs if r.live]
        address = self.ray_address(deployment)
        alive: dict[str, bool] = {}
        heads = {p for r in live if r.meta.get("owned") for p in r.meta.get("head_pids", [])}
        if heads and not any(_is_ray_process(p) and _alive(p) for p in heads):
            address = None  # the head we started is gone, and its cluster with it: no need to ask Ray
        if live and address:
            try:
                alive = ray_alive(address)
            except Exception:  # the whole cluster is gone: every node is dead
                alive = {}
        out = []
        for r in recs:
            node = Node.from_record(r)
            if r.live and not alive.get(str(r.meta.get("ray_node_id") or r.cluster_name), False):
                node.status = "dead"
            out.append(node)
        return out

    def down_node(self, node_id: str) -> DownResult:
        """Stop one node: its Ray node leaves the cluster and its recorded processes end. A node of a cluster
        you attached to (`--ray-address`) keeps running; only its record ends."""
        rec = self.store.node(node_id)
        result = DownResult(rec.deployment)
        removed, pids = False, []
        if rec.meta.get("owned"):  # whatever the record says: the controller records a lost node first
            with self._lock:
                started = self._started.get(rec.deployment)
            if started is not None:
                want = {rec.cluster_name, str(rec.meta.get("ray_node_id"))}
                for rn in [n for n in list(started.cluster.worker_nodes) if {n.node_id, n.unique_id} & want]:
                    try:
                        started.cluster.remove_node(rn, allow_graceful=False)
                        removed = True
                    except Exception:
                        if rn in started.cluster.worker_nodes:
                            raise  # else someone removed it meanwhile: gone either way
            pids = stop_pids([int(p) for p in rec.meta.get("pids", [])],  # never the head's
                             holding=[str(f) for f in rec.meta.get("logs", [])])
        if not (removed or pids or rec.live):
            return result  # nothing left of it
        self.store.update_node(node_id, status="terminated" if rec.live else rec.status,
                               terminated_at=rec.terminated_at or now_utc())
        self.store.add_event(rec.deployment, "node-down", f"stopped local node {rec.instance_id}",
                             {"node": node_id, "pids": pids})
        result.terminated.append(rec.cluster_name)
        return result

    def down(self, deployment: str | None) -> DownResult:
        store = self.store
        if deployment is None:
            deps = [d.id for d in store.deployments() if d.provider == self.name]
        else:
            store.deployment(deployment)  # unknown -> one-line error
            deps = [deployment]
        result = DownResult(deployment)
        for dep in deps:
            recs = store.nodes(dep)
            with self._lock:
                started = self._started.pop(dep, None)
            if started is not None:
                try:
                    import ray

                    if ray.is_initialized():
                        ray.shutdown()
                    started.cluster.shutdown()
                except Exception as e:  # fall through to killing the recorded pids
                    result.failed[dep] = f"{type(e).__name__}: {e}"
            owned = [r for r in recs if r.meta.get("owned")]
            pids = sorted({p for r in owned for p in [*r.meta.get("pids", []), *r.meta.get("head_pids", [])]})
            temp_dirs = sorted({str(r.meta["temp_dir"]) for r in owned if r.meta.get("temp_dir")})
            stop_pids(pids, holding=[os.path.join(t, "") for t in temp_dirs])
            for temp_dir in temp_dirs:
                if str(temp_dir).startswith(tempfile.gettempdir()):
                    shutil.rmtree(temp_dir, ignore_errors=True)
            live = [r for r in recs if r.live]
            for r in live:
                store.update_node(r.id, status="terminated", terminated_at=now_utc())
                result.terminated.append(r.cluster_name)
            store.add_event(dep, "down", f"stopped {len(live)} local node(s)" if live else
                            "down again: no local node was running", {"pids": pids})
            store.set_deployment_status(dep, "down")
        return result
