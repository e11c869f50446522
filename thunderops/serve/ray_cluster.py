"""Ray clusters for engines that span several nodes (a pipeline whose stages sit on more than one instance).

vLLM runs such an engine with its Ray executor on a Ray cluster holding every stage's GPUs (vLLM's multi-node
recipe: a Ray head on one node waits until the others have joined, then `vllm serve` starts there). Each
spanning group gets a cluster of its own, so engines sharing a node never share one:

- its head is the group's first instance, where its engine runs (`EngineCommand.instance`);
- on each of its nodes its raylet takes one block of RAY_BLOCK ports (GCS on the head, node manager, object
  manager, agents, worker ports) starting at `Ports.ray + i * RAY_BLOCK`, i the group's lowest GPU id on that
  node: groups sharing a node hold different GPUs there, so their blocks never meet, and no other group's
  reschedule or replacement moves a block (nothing to remember);
- its raylet on a node sees only the group's GPUs there (CUDA_VISIBLE_DEVICES when it starts).

On the head node `thunderops serve ray-engine` (the engine line of the node's task) starts the head, waits for
the group's GPUs and runs the engine with RAY_ADDRESS; on the other nodes the node agent starts a worker on
`POST /v1/ray/join` (`thunderops.agent`), which `NodeEngines` sends once every node is up and the head's
address is known. Ray has no authentication, so these ports are never opened to the internet: the nodes of a
group talk over their private network, which is why the scheduler keeps a group within one cloud region.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from thunderops.errors import UserError
from thunderops.plan import Plan
from thunderops.provision import RAY_PORT  # first port of the first spanning group's block (`Ports.ray`)

RAY_BLOCK = 64  # ports per cluster: +0 GCS (head), +1 Ray client, +2..+7 node daemons, +16..+63 workers
WORKER_PORTS = (16, RAY_BLOCK - 1)


class RayClusterError(UserError):
    """A spanning engine's Ray cluster could not be formed (worded for people)."""


@dataclass(frozen=True)
class RayCluster:
    """The Ray cluster of one spanning group: `gpus` maps each of its instances (head first) to the GPU ids of
    the group on it, in stage order."""

    group: str
    base_port: int  # `Ports.ray`: blocks start here
    gpus: tuple[tuple[str, tuple[int, ...]], ...]

    def ports_on(self, instance_id: str) -> int:
        """First port of this cluster's block on one of its nodes."""
        return self.base_port + min(self.gpus_on(instance_id)) * RAY_BLOCK

    @property
    def port(self) -> int:
        """The head's GCS port (the cluster's address is HEAD_IP:port)."""
        return self.ports_on(self.head)

    @property
    def head(self) -> str:
        return self.gpus[0][0]

    @property
    def total_gpus(self) -> int:
        return sum(len(ids) for _, ids in self.gpus)

    def gpus_on(self, instance_id: str) -> tuple[int, ...]:
        for inst, ids in self.gpus:
            if inst == instance_id:
                return ids
        raise KeyError(instance_id)

    @property
    def workers(self) -> list[str]:
        return [inst for inst, _ in self.gpus[1:]]


def ray_clusters(plan: Plan, base_port: int = RAY_PORT) -> dict[str, RayCluster]:
    """group id -> its Ray cluster, for the plan's groups whose stages sit on more than one instance."""
    out: dict[str, RayCluster] = {}
    for g in plan.groups:
        per: dict[str, list[int]] = {}
        for s in g.stages:
            have = per.setdefault(s.instance, [])
            have.extend(s.gpu_ids or range(len(have), len(have) + s.tp))
        if len(per) > 1:
            out[g.id] = RayCluster(g.id, base_port, tuple((inst, tuple(ids)) for inst, ids in per.items()))
    return out


def ray_executable() -> str:
    """The `ray` command of this Python's environment (beside the interpreter), else the one on PATH."""
    beside = Path(sys.executable).parent / "ray"
    return str(beside) if beside.exists() else (shutil.which("ray") or "ray")


def node_ip() -> str:
    """This machine's address on its default route (what Ray itself picks), 127.0.0.1 where there is none."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.254.254.254", 1))  # no packet is sent: this only picks the outgoing interface
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


def instance_resource(instance_id: str) -> str:
    """The custom Ray resource that tells which plan instance a raylet runs on (Ray's names: [A-Za-z0-9_])."""
    return "thunderops_instance_" + hashlib.sha1(instance_id.encode()).hexdigest()[:12]


def start_argv(port: int, gpus: int, ip: str, *, head_address: str | None = None,
               instance: str | None = None) -> list[str]:
    """`ray start --block` for one node of a cluster whose block starts at `port`: the head when
    `head_address` is None, else a worker joining it. `gpus` GPUs are declared (the raylet's
    CUDA_VISIBLE_DEVICES says which); `instance` tags the raylet with its plan instance."""
    res = ["--resources=" + json.dumps({instance_resource(instance): 1})] if instance else []
    argv = [ray_executable(), "start", "--block", "--disable-usage-stats", f"--node-ip-address={ip}", *res,
            f"--num-gpus={gpus}", f"--node-manager-port={port + 2}", f"--object-manager-port={port + 3}",
            f"--dashboard-agent-grpc-port={port + 4}", f"--dashboard-agent-listen-port={port + 5}",
            f"--metrics-export-port={port + 6}", f"--runtime-env-agent-port={port + 7}",
            f"--min-worker-port={port + WORKER_PORTS[0]}", f"--max-worker-port={port + WORKER_PORTS[1]}"]
    if head_address is None:
        argv += ["--head", f"--port={port}", f"--ray-client-server-port={port + 1}", "--include-dashboard=false"]
    else:
        argv += [f"--address={head_address}"]
    return argv


def start_node(argv: Sequence[str], gpu_ids: Sequence[int], log_path: str | Path) -> subprocess.Popen:
    """Start one `ray start --block` in its own process group, seeing only `gpu_ids`. On SIGTERM it stops at
    once: Ray's graceful drain (30 s by default, for Ray Serve) has nothing to drain here and would hold the
    port block, so a head restarted by its engine's supervisor could not start."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=",".join(str(i) for i in gpu_ids), RAY_USAGE_STATS_ENABLED="0",
               RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")
    log = open(log_path, "ab")  # noqa: SIM115 - handed to the child, closed below
    try:
        return subprocess.Popen(list(argv), env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    finally:
        log.close()


def stop_node(proc: subprocess.Popen, timeout_s: float = 10.0) -> None:
    """End a `ray start --block` and every daemon it started (its process group)."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _probe(address: str, expression: str) -> tuple[Any, str]:
    """Evaluate `expression` (Python, with `ray` connected to the cluster at `address`) in a child process, so
    this one never holds a Ray connection: (its value through JSON, or None when it could not be had; stderr)."""
    code = ("import json,ray,sys; ray.init(address=sys.argv[1], logging_level='ERROR', log_to_driver=False); "
            f"print(json.dumps({expression}))")
    try:
        out = subprocess.run([sys.executable, "-c", code, address], capture_output=True, text=True, timeout=60,
                             env=dict(os.environ, RAY_USAGE_STATS_ENABLED="0"))
    except subprocess.TimeoutExpired:
        return None, "timed out after 60 s"
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        return None, out.stderr.strip()[-300:]
    try:
        return json.loads(lines[-1]), ""
    except json.JSONDecodeError:
        return None, f"unexpected output {lines[-1][:200]!r}"


def cluster_gpus(address: str) -> float:
    """GPUs the Ray cluster at `address` holds now (0 when it cannot be reached)."""
    value, _ = _probe(address, "ray.cluster_resources().get('GPU', 0)")
    return float(value) if isinstance(value, int | float) else 0.0


def wait_for_gpus(address: str, gpus: int, timeout_s: float, head: subprocess.Popen | None = None,
                  poll_s: float = 2.0) -> None:
    """Block until the cluster holds `gpus` GPUs (every node of the group has joined)."""
    deadline = time.monotonic() + timeout_s
    have = 0.0
    while True:
        if head is not None and head.poll() is not None:
            raise RayClusterError(f"the Ray head at {address} exited (code {head.returncode}); see its log")
        have = cluster_gpus(address)
        if have >= gpus:
            return
        if time.monotonic() > deadline:
            raise RayClusterError(f"the Ray cluster at {address} holds {have:g} of the {gpus} GPUs its engine "
                                  f"needs after {timeout_s:g} s: a node of the group did not join (is every node "
                                  "up, and do they reach each other on their private addresses?)")
        time.sleep(poll_s)


def cluster_nodes(address: str) -> list[tuple[str, list[str]]]:
    """(IP, custom resource names) of each live node of the Ray cluster at `address`."""
    value, err = _probe(address, "[[n['NodeManagerAddress'], sorted(n['Resources'])] for n in ray.nodes() if n['Alive']]")
    if value is None:
        raise RayClusterError(f"cannot list the nodes of the Ray cluster at {address}: {err}")
    return [(ip, names) for ip, names in value]


def has_node(address: str, instance_id: str) -> bool | None:
    """Whether the Ray cluster at `address` has a live node tagged with `instance_id` (its raylet's instance
    resource); None when the cluster cannot be reached."""
    try:
        nodes = cluster_nodes(address)
    except RayClusterError:
        return None
    return any(instance_resource(instance_id) in names for _, names in nodes)


def vllm_layer_partition(head: str, layers: Mapping[str, Sequence[int]], gpus: Mapping[str, int],
                         ips: Mapping[str, str]) -> list[int]:
    """VLLM_PP_LAYER_PARTITION in the order vLLM's Ray executor gives the nodes their pipeline stages: the
    driver's (head's) node first, then nodes with fewer of the engine's workers (GPUs), then by IP string
    (vLLM's `sort_by_driver_then_worker_ip`); each node's stages keep their planned order. `layers`: each
    instance's stage layer counts, `gpus`: its GPUs in the group, `ips`: its Ray node address."""
    rest = sorted((i for i in layers if i != head), key=lambda i: (gpus[i], ips[i]))
    return [n for inst in [head, *rest] for n in layers[inst]]


def ordered_partition(address: str, head: str, layers: Mapping[str, Sequence[int]], tp: int) -> list[int]:
    """The planned split (each instance's stage layers) re-ordered for vLLM, from the live cluster's node
    addresses (each raylet carries its instance's `instance_resource`); `tp` GPUs per stage."""
    ips: dict[str, str] = {}
    for node_addr, names in cluster_nodes(address):
        for inst in layers:
            if instance_resource(inst) in names:
                ips[inst] = node_addr
    missing = [inst for inst in layers if inst not in ips]
    if missing:
        raise RayClusterError(f"the Ray cluster at {address} has no node of instance(s) {', '.join(missing)}")
    return vllm_layer_partition(head, layers, {i: len(v) * tp for i, v in layers.items()}, ips)


def run_head_engine(engine_argv: Sequence[str], *, port: int, gpu_ids: Sequence[int], expect_gpus: int,
                    ip: str | None = None, timeout_s: float = 1800.0, log_dir: str | Path = ".",
                    extra_env: Mapping[str, str] | None = None, instance: str | None = None,
                    layers: Mapping[str, Sequence[int]] | None = None) -> int:
    """On the head node of a spanning group: start the Ray head, wait for the group's GPUs, run the engine on
    the cluster (RAY_ADDRESS, VLLM_HOST_IP) and end the head when the engine ends. Returns the engine's code.
    With `instance` (this node's) and `layers` (every instance's stage layers, as planned), the layer split
    follows the order in which vLLM hands the nodes their stages (`vllm_layer_partition`)."""
    ip = ip or node_ip()
    address = f"{ip}:{port}"
    head = start_node(start_argv(port, len(gpu_ids), ip, instance=instance), gpu_ids,
                      Path(log_dir) / f"ray-head-{port}.log")
    engine: subprocess.Popen | None = None

    def stop(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, stop)
    try:
        wait_for_gpus(address, expect_gpus, timeout_s, head)
        env = dict(os.environ, **(extra_env or {}), RAY_ADDRESS=address, VLLM_HOST_IP=ip)
        if instance is not None and layers and len(layers) > 1:
            tp = expect_gpus // max(sum(len(v) for v in layers.values()), 1)  # one TP degree per engine (vLLM)
            split = ordered_partition(address, instance, layers, tp)
            env["VLLM_PP_LAYER_PARTITION"] = ",".join(str(n) for n in split)
        env.pop("CUDA_VISIBLE_DEVICES", None)  # the Ray workers get theirs from the cluster
        engine = subprocess.Popen(list(engine_argv), env=env)
        while engine.poll() is None:
            if head.poll() is not None:  # the cluster is gone: the engine cannot serve
                engine.terminate()
                engine.wait(30)
                return 1
            time.sleep(1.0)
        return engine.returncode
    except KeyboardInterrupt:
        if engine is not None and engine.poll() is None:
            engine.terminate()
            try:
                engine.wait(30)
            except subprocess.TimeoutExpired:
                engine.kill()
        return 143
    finally:
        signal.signal(signal.SIGTERM, old)
        stop_node(head)
