"""The controller: keeps a running deployment serving through lost nodes, preemption notices and workload shifts.

One loop (`Controller.run`, `thunderops watch DEPLOYMENT`; `thunderops up` starts it in the background with
`start_background`) looks, every `interval_s`, at:
- engine health: each router replica's `/health` (a refused connection counts at once; a timeout after
  `fail_threshold` probes in a row);
- the provider's node status (Ray node liveness for `local`, SkyPilot's cluster list for clouds);
- the node agents' preemption notices (AWS spot interruption / GCP preempted flag, `GET /v1/preemption`);
- the router's usage records (prompt/output lengths, request rate) and the spend against `max_spend` ($).

On a lost or doomed node it drops that node's replicas from the router at once, runs the scheduler's
lightweight reschedule (groups and layouts kept, phases and routing re-decided), stores the new plan version,
pushes its routing table and records a `reschedule` event (before/after versions, predicted goodput). Then,
in the background, it reprovisions the same GPUs within the $/h budget (avoiding a preempted zone for a while,
on-demand once spot keeps failing), starts engines on them, measures links where agents answer, and folds the
lost groups back in on the new nodes (same layouts; phases and routing re-decided). A workload shift (mean
prompt or output length moving by more than `shift_threshold`) re-decides phases and routing likewise.

Every decision is an event in the state store (`thunderops events DEPLOYMENT`). The controller keeps no state
of its own that matters: killed and restarted, it reads the latest plan, the router's table and the events
(pending reprovisions, avoided zones, spot failures) and carries on; decisions are keyed by plan version and
instance ids, so none is taken twice.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import httpx
import numpy as np

from thunderops.errors import PlanError, UserError
from thunderops.plan import Group, Instance, Plan, Route, Stage
from thunderops.state import Store, default_home, now_utc, parse_ts

log = logging.getLogger(__name__)

# Provider node statuses that mean the machine is gone (or going) and its replicas with it.
GONE_STATUSES = {"missing", "dead", "failed", "preempted", "terminated", "terminating"}


class ControllerError(UserError):
    """The controller cannot watch this deployment (no router address or key, unknown deployment)."""


@dataclass
class ControllerConfig:
    """Knobs of the watch loop. Times in seconds, money in $ (max_spend) and $/h (the plan's budget)."""

    interval_s: float = 0.5
    probe_timeout_s: float = 1.0
    # A refused connection means the engine process is gone: dead at once. Probes that time out (a frozen or
    # unreachable node, or just a busy machine) count only once they have failed in a row for this long.
    fail_after_s: float = 2.5
    provider_interval_s: float = 1.0
    notice_interval_s: float = 2.0
    usage_interval_s: float = 5.0
    max_spend: float | None = None  # $ over the deployment's life; None = no limit
    spend_horizon_s: float = 120.0  # act this long before the limit would be reached at the current $/h
    reprovision: bool = True
    reprovision_backoff_s: float = 30.0
    restart_grace_s: float = 3.0  # wait before restarting engines on a node the provider still calls alive
    max_reprovision_attempts: int = 5
    avoid_zone_s: float = 1800.0  # keep away from a zone this long after a preemption there
    spot_failures_for_on_demand: int = 2  # spot losses/failures of one GPU type before replacing on demand
    shift_threshold: float = 0.3  # relative change of mean prompt/output length that re-decides phases
    shift_min_requests: int = 200
    shift_window: int = 2000  # usage records looked at
    netbench_duration_s: float = 1.0
    engine_timeout_s: float = 120.0


# ------------------------------------------------------------------------------------------ router access


def _router_file(deployment: str) -> Path:
    return default_home() / "tokens" / f"{deployment}.router.json"


def save_router(deployment: str, url: str, admin_key: str, engines: Mapping[str, Any] | None = None) -> Path:
    """Remember where a deployment's router listens and its admin key ($THUNDEROPS_HOME/tokens, mode 0600),
    so `thunderops watch` and a restarted controller find it. `thunderops up` calls this after serving starts.
    `engines` says how replacement engines start (see `launcher_from`): {"kind": "node"} (the node's own
    setup, the default), {"kind": "ray-emulators", "address", "engine_key", "speedup"} or
    {"kind": "local-emulators", "engine_key", "speedup", "owner_pid"} (emulators end with the owner process)."""
    path = _router_file(deployment)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"url": url.rstrip("/").removesuffix("/v1"), "admin_key": admin_key,
                   "engines": dict(engines or {"kind": "node"})}, f)
    tmp.replace(path)
    return path


def _saved(deployment: str) -> dict[str, Any]:
    path = _router_file(deployment)
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except (OSError, json.JSONDecodeError):
        return {}


def launcher_from(deployment: str, timeout_s: float = 1800.0) -> EngineLauncher:
    """The engine launcher `save_router` recorded for the deployment (NodeEngines when none was)."""
    cfg = _saved(deployment).get("engines") or {}
    kind = cfg.get("kind", "node")
    if kind == "ray-emulators":
        return RayEmulators(cfg["address"], engine_key=cfg.get("engine_key"), speedup=float(cfg.get("speedup", 1.0)))
    if kind == "local-emulators":
        return LocalEmulators(engine_key=cfg.get("engine_key"), speedup=float(cfg.get("speedup", 1.0)),
                              owner_pid=cfg.get("owner_pid"))
    return NodeEngines(timeout_s)


def load_router(deployment: str, url: str | None = None, admin_key: str | None = None) -> tuple[str, str]:
    """The router's base URL and admin key: arguments first, then THUNDEROPS_ADMIN_KEY / THUNDEROPS_API_KEY,
    then what `save_router` wrote."""
    saved = _saved(deployment)
    url = url or saved.get("url")
    key = admin_key or os.environ.get("THUNDEROPS_ADMIN_KEY") or saved.get("admin_key") or os.environ.get(
        "THUNDEROPS_API_KEY")
    if not url:
        raise ControllerError(f"no router address for deployment {deployment!r}: pass --router URL "
                              "(it is saved when `thunderops up` starts serving)")
    if not key:
        raise ControllerError("no router admin key: set THUNDEROPS_ADMIN_KEY (or THUNDEROPS_API_KEY)")
    return url.rstrip("/").removesuffix("/v1"), key


class RouterAdmin:
    """The router's admin API: the routing table in use, swapping it, usage records."""

    def __init__(self, url: str, admin_key: str, timeout_s: float = 2.0) -> None:
        self.url = url.rstrip("/")
        self.http = httpx.Client(timeout=timeout_s, headers={"Authorization": f"Bearer {admin_key}"})

    def table(self):  # -> thunderops.serve.router.RoutingTable
        from thunderops.serve.router import RoutingTable

        r = self.http.get(self.url + "/admin/routing")
        r.raise_for_status()
        return RoutingTable.from_dict(r.json())

    def push(self, table) -> None:
        r = self.http.post(self.url + "/admin/routing", content=json.dumps(table.to_dict()))
        r.raise_for_status()

    def usage(self, records: int) -> dict[str, Any]:
        r = self.http.get(self.url + "/admin/usage", params={"records": records})
        r.raise_for_status()
        return r.json()

    def close(self) -> None:
        self.http.close()


# ------------------------------------------------------------------------------------------ engines


class EngineLauncher(Protocol):
    """Starts the engines of some plan groups on provisioned nodes; returns group id -> base URL once each
    answers /health."""

    def start(self, deployment: str, plan: Plan, groups: list[str], nodes: Mapping[str, Any]) -> dict[str, str]: ...


@dataclass
class NodeEngines:
    """The default launcher: the node's own setup (the SkyPilot task) starts its engines; the k-th group on an
    instance listens on engine_port + k. This waits for each to answer /health."""

    timeout_s: float = 1800.0

    def start(self, deployment: str, plan: Plan, groups: list[str], nodes: Mapping[str, Any]) -> dict[str, str]:
        urls = {}
        for gid in groups:
            g = plan.group(gid)
            head = g.stages[0].instance
            node = nodes[head]
            k = [x.id for x in plan.groups if x.stages[0].instance == head].index(gid)
            urls[gid] = f"http://{node.host}:{node.ports.engine + k}"
        wait_engines(urls, self.timeout_s)
        return urls


@dataclass
class LocalEmulators:
    """Engines as emulator processes on this machine (the GPU double), one per group. They run in vLLM's
    `kv_both` role (prefill, decode or both), so a reschedule can flip a group's phase without a restart.
    The router must hold the same `engine_key` (THUNDEROPS_ENGINE_KEY)."""

    engine_key: str | None = None
    host: str = "127.0.0.1"
    speedup: float = 1.0
    workdir: str | None = None
    timeout_s: float = 60.0
    owner_pid: int | None = None  # the emulators end when this process does (see `serve emulator --exit-with-pid`)
    pids: dict[str, int] = field(default_factory=dict)
    urls: dict[str, str] = field(default_factory=dict)

    def start(self, deployment: str, plan: Plan, groups: list[str], nodes: Mapping[str, Any]) -> dict[str, str]:
        import tempfile

        from thunderops.serve import _spawn, free_port, serve_module_argv, wait_healthy
        from thunderops.serve.vllm import max_model_len

        wd = Path(self.workdir or tempfile.mkdtemp(prefix="thunderops-engines-"))
        wd.mkdir(parents=True, exist_ok=True)
        urls = {}
        for gid in groups:
            g = plan.group(gid)
            port = free_port(self.host)
            argv = serve_module_argv("emulator", "--role", "both", "--model", plan.model, "--gpu", g.stages[0].gpu,
                                     "--tp", str(g.tp), "--pp", str(g.pp), "--host", self.host, "--port", str(port),
                                     "--speedup", str(self.speedup), "--max-model-len", str(max_model_len(plan)),
                                     *(["--exit-with-pid", str(self.owner_pid)] if self.owner_pid else []))
            log_path = wd / f"engine-{gid}.log"
            env = {"THUNDEROPS_ENGINE_KEY": self.engine_key} if self.engine_key else {}
            self.pids[gid] = _spawn(argv, env, log_path)
            urls[gid] = f"http://{self.host}:{port}"
        for gid, url in urls.items():
            wait_healthy(url, self.pids[gid], self.timeout_s, str(wd / f"engine-{gid}.log"))
        self.urls.update(urls)
        return urls

    def stop(self) -> None:
        from thunderops.serve import stop_pids

        stop_pids(list(self.pids.values()))
        self.pids.clear()


class _EngineActor:
    """A Ray actor running one engine emulator in its own process on its pinned node (see RayEmulators)."""

    def start(self, model: str, gpu: str, tp: int, pp: int, speedup: float, max_model_len: int,
              engine_key: str | None, host: str) -> tuple[str, int]:
        import asyncio

        from aiohttp import web

        from thunderops.perf import PerfModel
        from thunderops.serve import free_port
        from thunderops.serve.emulator import Emulator, EmulatorConfig, perf_timing

        port = free_port(host)
        seqs = PerfModel(model).batch_limits([gpu])[1] * pp  # the engine's own limit, as the planner's
        cfg = EmulatorConfig(model=model, served_names=[model], role="both", max_model_len=max_model_len, host=host,
                             port=port, api_key=engine_key, tp=tp, speedup=speedup, max_num_seqs=seqs)
        app = Emulator(cfg, perf_timing(model, gpu, tp, pp)).app()
        ready = threading.Event()

        def serve() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            runner = web.AppRunner(app, access_log=None)
            loop.run_until_complete(runner.setup())
            loop.run_until_complete(web.TCPSite(runner, host, port).start())
            ready.set()
            loop.run_forever()

        threading.Thread(target=serve, name="emulator", daemon=True).start()
        ready.wait(30)
        return f"http://{host}:{port}", os.getpid()


@dataclass
class RayEmulators:
    """Engines as emulators inside Ray actors pinned to their plan instance's Ray node (the local provider's
    `thunderops_node_<instance>` resource), so a lost Ray node takes its engines with it, as a lost machine
    would. Role `both` (vLLM's kv_both), so phases can flip without a restart."""

    address: str
    engine_key: str | None = None
    speedup: float = 1.0
    host: str = "127.0.0.1"
    timeout_s: float = 30.0
    actors: dict[str, Any] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)

    def start(self, deployment: str, plan: Plan, groups: list[str], nodes: Mapping[str, Any]) -> dict[str, str]:
        import ray

        from thunderops.provision.local import node_resource, ray_connect
        from thunderops.serve.vllm import max_model_len

        ray_connect(self.address)
        actor_cls = ray.remote(num_cpus=0, max_restarts=0)(_EngineActor)
        mml = max_model_len(plan)
        refs = {}
        for gid in groups:
            g = plan.group(gid)
            actor = actor_cls.options(resources={node_resource(g.stages[0].instance): 0.01},
                                      name=f"engine-{deployment}-{gid}", lifetime="detached").remote()
            self.actors[gid] = actor
            refs[gid] = actor.start.remote(plan.model, g.stages[0].gpu, g.tp, g.pp, self.speedup, mml,
                                           self.engine_key, self.host)
        urls = {}
        for gid, ref in refs.items():
            urls[gid], self.pids[gid] = ray.get(ref, timeout=self.timeout_s)
        wait_engines(urls, self.timeout_s)
        return urls

    def stop(self) -> None:
        import ray

        for actor in self.actors.values():
            try:
                ray.kill(actor)
            except Exception:  # already dead with its node
                pass
        self.actors.clear()


def wait_engines(urls: Mapping[str, str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    pending = dict(urls)
    with httpx.Client(timeout=1.0) as http:
        while pending:
            for gid, url in list(pending.items()):
                try:
                    if http.get(url + "/health").status_code == 200:
                        pending.pop(gid)
                except httpx.HTTPError:
                    pass
            if pending and time.monotonic() > deadline:
                raise TimeoutError(f"engine(s) {', '.join(sorted(pending))} not healthy after {timeout_s:g} s")
            if pending:
                time.sleep(0.1)


# ------------------------------------------------------------------------------------------ plan surgery


FALLBACK_FRACTION = 1e-6


def with_fallbacks(table):  # RoutingTable -> RoutingTable
    """`table` plus a last-resort route for each replica to serve requests alone (prefill and decode on one
    engine, as vLLM's kv_both engines can). Its tiny weight never matters while a planned pair is healthy;
    when every planned pair through a live replica is gone (a prefill replica dies, leaving only decode), the
    router still has somewhere to send requests until the reschedule lands."""
    from thunderops.serve.router import RoutingTable

    have = {(r.prefill, r.decode) for r in table.routes}
    extra = tuple(Route(rid, rid, FALLBACK_FRACTION) for rid in table.replicas if (rid, rid) not in have)
    return RoutingTable(table.replicas, table.routes + extra, table.version)


def _routes_of(table) -> set[tuple[str, str, str, float]]:
    return {(r.prefill, r.decode, table.replicas[r.prefill].url, round(r.fraction, 6)) for r in table.routes}


def _gpu_ids(stage: Stage) -> list[int]:
    return list(stage.gpu_ids or range(stage.tp))


def next_instance_id(lost: str, taken: Iterable[str]) -> str:
    """A fresh id for the replacement of `lost`: a3 -> a3r1 -> a3r2 (never one in `taken`)."""
    base = re.sub(r"r\d+$", "", lost)
    taken = set(taken)
    k = 1
    while f"{base}r{k}" in taken:
        k += 1
    return f"{base}r{k}"


def fold_in(plan: Plan, groups: list[Group], replacements: Mapping[str, Instance],
            keep_ids: bool = False) -> tuple[Plan, list[str]]:
    """`plan` plus `replacements` (lost instance id -> new Instance) and copies of `groups` (from before the loss)
    moved onto them. A group comes back only if every instance it needs is in the plan or replaced and its GPUs
    there are free. Returns the new plan (same version; phases and routing still to decide) and the new group ids."""
    new = copy.deepcopy(plan)
    new.instances += [copy.deepcopy(i) for i in replacements.values()]
    have = {i.id for i in new.instances}
    used = {(s.instance, gid) for g in new.groups for s in g.stages for gid in _gpu_ids(s)}
    taken_ids = {g.id for g in new.groups}
    added = []
    for g in groups:
        stages = [replace(s, instance=replacements[s.instance].id if s.instance in replacements else s.instance,
                          gpu_ids=list(s.gpu_ids)) for s in g.stages]
        if any(s.instance not in have for s in stages):
            continue
        need = {(s.instance, gid) for s in stages for gid in _gpu_ids(s)}
        if need & used:
            continue
        used |= need
        gid = g.id if keep_ids and g.id not in taken_ids else next_instance_id(g.id, taken_ids)
        taken_ids.add(gid)
        new.groups.append(Group(gid, g.phase, stages))
        added.append(gid)
    new.cost_per_hour = round(sum(i.price_per_hour for i in new.instances), 4)
    return new, added


def observed_workload(records: list[dict[str, Any]], name: str = "observed"):
    """A Workload (thunderops.workload) from the router's usage records: length quantiles and request rate."""
    from thunderops.workload import Workload

    ok = [r for r in records if r.get("status") == 200 and r.get("prompt_tokens")]
    if len(ok) < 2:
        return None
    prompt = np.array([r["prompt_tokens"] for r in ok], dtype=float)
    output = np.array([max(1, r["output_tokens"]) for r in ok], dtype=float)
    t = np.array([r["started_at"] for r in ok], dtype=float)
    span = max(float(t.max() - t.min()), 1e-3)
    qs = np.arange(101)
    return Workload(name, rate=max(len(ok) - 1, 1) / span,
                    prompt_quantiles=tuple(float(x) for x in np.percentile(prompt, qs)),
                    output_quantiles=tuple(float(x) for x in np.percentile(output, qs)),
                    source=f"router usage, {len(ok)} requests")


def plan_workload(plan: Plan):
    """The workload a plan was made for (an observed one recorded by a shift decision wins)."""
    from thunderops.workload import Workload, get_workload

    obs = plan.inputs.get("observed_workload")
    if obs:
        return Workload(obs["name"], obs["rate"], tuple(obs["prompt_quantiles"]), tuple(obs["output_quantiles"]),
                        obs.get("source", ""))
    name = plan.inputs.get("workload_source") or plan.inputs.get("workload") or "conversation"
    wl = get_workload(name)
    return wl.with_rate(plan.inputs["rate"]) if plan.inputs.get("rate") else wl


def _workload_dict(wl) -> dict[str, Any]:
    return {"name": wl.name, "rate": wl.rate, "prompt_quantiles": list(wl.prompt_quantiles),
            "output_quantiles": list(wl.output_quantiles), "source": wl.source}


# ------------------------------------------------------------------------------------------ the controller


@dataclass
class Pending:
    """Replicas to bring back (groups as they were before the loss) and the specs of every instance they
    need. When it runs, instances still in the plan are reused (an engine restart) and the others replaced."""

    key: str
    instances: list[Instance]
    groups: list[Group]
    attempts: int = 0
    next_try: float = 0.0


@dataclass
class ControllerStatus:
    deployment: str
    state: str  # watching | degraded | all-lost | reprovisioning | stopped
    plan_version: int
    replicas: list[str]
    dead: list[str]
    pending_reprovision: list[str]
    spend: float  # $ so far
    cost_per_hour: float  # $/h of running nodes
    message: str = ""


class Controller:
    """Watches one deployment and acts on what it sees. `step()` is one look (for tests); `run()` loops."""

    def __init__(self, deployment: str, *, store: Store | None = None, provider: Any = None,
                 router_url: str | None = None, admin_key: str | None = None, launcher: EngineLauncher | None = None,
                 config: ControllerConfig | None = None, offers: Any = None,
                 on_event: Callable[[str, str, dict[str, Any]], None] | None = None) -> None:
        self.deployment = deployment
        self.store = store or Store()
        dep = self.store.deployment(deployment)  # one-line error for an unknown deployment
        self.config = config or ControllerConfig()
        if provider is None and dep.provider:
            from thunderops.provision import get_provider

            provider = get_provider(dep.provider, store=self.store)
        self.provider = provider
        url, key = load_router(deployment, router_url, admin_key)
        self.router = RouterAdmin(url, key, timeout_s=max(2.0, self.config.probe_timeout_s * 4))
        self.launcher: EngineLauncher = launcher or launcher_from(deployment, self.config.engine_timeout_s)
        self._offers = offers
        self.on_event = on_event
        self.urls: dict[str, str] = {}  # group id -> engine URL
        self.fails: dict[str, int] = {}  # group id -> failed probes in a row (shown in events)
        self.first_fail: dict[str, float] = {}  # group id -> wall time of the first failed probe in the row
        self.dead: set[str] = set()  # groups out of the router (engine gone)
        self.doomed: dict[str, dict[str, Any]] = {}  # instance -> preemption notice
        self.provider_alive: set[str] | None = None  # instances the provider last reported ready
        self.pending: dict[str, Pending] = {}
        self.avoid: dict[tuple[str, str], float] = {}  # (cloud, zone) -> avoid until (wall time)
        self.spot_failures: dict[str, int] = {}  # GPU type -> spot losses and failed spot launches
        self.state = "watching"
        self.message = ""
        self._lock = threading.RLock()  # one decision at a time (watch loop and reprovision thread)
        self._stop = threading.Event()
        self._last = {"provider": 0.0, "notice": 0.0, "usage": 0.0}
        self._probe_pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="probe")
        self._worker: threading.Thread | None = None
        self._http = httpx.Client(timeout=self.config.probe_timeout_s)
        self._stopped_for_spend = False
        self._recover()

    # -- events ------------------------------------------------------------------------------------------
    def event(self, kind: str, message: str, payload: Mapping[str, Any] | None = None) -> int:
        payload = dict(payload or {})
        eid = self.store.add_event(self.deployment, kind, message, payload)
        log.info("%s: %s", kind, message)
        if self.on_event:
            try:
                self.on_event(kind, message, payload)
            except Exception:  # a display callback must never stop the controller
                log.exception("on_event failed")
        return eid

    # -- restart -----------------------------------------------------------------------------------------
    def _recover(self) -> None:
        """Rebuild what the loop needs from the store and the router: URLs, pending reprovisions, avoided zones,
        spot failures; and make the router serve the latest plan if a crash came between storing and pushing."""
        events = self.store.events(self.deployment)
        now = time.time()
        done = {e.payload.get("key") for e in events if e.kind in ("reprovisioned", "reprovision-abandoned")}
        for e in events:
            p = e.payload
            if e.kind == "reschedule" and p.get("key") and p.get("reprovision") and p["key"] not in done:
                self.pending[p["key"]] = Pending(p["key"], [Instance(**i) for i in p["reprovision"]["instances"]],
                                                 [Group(g["id"], g["phase"], [Stage(**s) for s in g["stages"]])
                                                  for g in p["reprovision"]["groups"]])
            if e.kind == "reschedule":
                for z in p.get("preempted_zones", []):
                    until = parse_ts(e.ts).timestamp() + self.config.avoid_zone_s
                    if until > now:
                        self.avoid[(z[0], z[1])] = until
                for gpu in p.get("spot_lost", []):
                    self.spot_failures[gpu] = self.spot_failures.get(gpu, 0) + 1
            if e.kind == "reprovision-failed" and p.get("spot_gpu"):
                self.spot_failures[p["spot_gpu"]] = self.spot_failures.get(p["spot_gpu"], 0) + 1
        try:
            table = self.router.table()
        except httpx.HTTPError as e:
            raise ControllerError(f"cannot reach the router at {self.router.url} ({type(e).__name__}); "
                                  "is the deployment serving? (`thunderops status`)") from None
        self.urls = {rid: rep.url for rid, rep in table.replicas.items()}
        known = [k for k in (self.store.events(self.deployment, "controller-start")) if k]
        plan = self.store.latest_plan(self.deployment)
        in_plan = {i.id for i in plan.instances}
        orphans = [r for r in self.store.nodes(self.deployment, live_only=True) if r.instance_id not in in_plan]
        if orphans and self._can_terminate():  # launched by a reprovision that a crash interrupted (or lost, not yet torn down)
            self.event("orphans", f"tearing down {len(orphans)} node(s) outside plan v{plan.version}: "
                       f"{', '.join(r.cluster_name for r in orphans)}", {"nodes": [r.id for r in orphans]})
            self._terminate(orphans, wait=True)
        if plan.groups and all(g.id in self.urls for g in plan.groups) \
                and _routes_of(self.table_for(plan)) != _routes_of(table):
            self._push(plan, "the router was not on the latest plan")
        self.event("controller-start", f"watching plan v{plan.version} ({len(plan.groups)} replicas"
                   f"{', restarted' if known else ''})",
                   {"plan_version": plan.version, "pending": sorted(self.pending), "restart": bool(known)})

    def _can_terminate(self) -> bool:
        return self.provider is not None and (hasattr(self.provider, "down_node") or hasattr(self.provider, "cloud"))

    def _terminate(self, recs: list[Any], wait: bool = False) -> None:
        """Stop paying for nodes we no longer use: the provider's per-node teardown where it has one
        (`down_node(node_id)`, or SkyPilot's cluster down), then record them terminated."""
        if not recs or not self._can_terminate():
            return

        def run() -> None:
            for rec in recs:
                try:
                    if hasattr(self.provider, "down_node"):
                        self.provider.down_node(rec.id)
                    elif hasattr(self.provider, "cloud"):
                        self.provider.cloud.down(rec.cluster_name)
                    else:
                        continue
                    cur = self.store.node(rec.id)
                    if cur.live or not cur.terminated_at:
                        self.store.update_node(rec.id, status="terminated" if cur.status != "preempted" else "preempted",
                                               terminated_at=cur.terminated_at or now_utc())
                except Exception as e:  # keep going; `thunderops down` reconciles what is left
                    log.warning("could not tear down %s: %s", rec.cluster_name, e)

        if wait:
            run()
        else:
            threading.Thread(target=run, name="teardown", daemon=True).start()

    # -- looking -----------------------------------------------------------------------------------------
    def _probe(self, gid: str, url: str) -> bool | None:
        """True healthy, False refused (dead now), None timed out or erred (dead after fail_threshold)."""
        try:
            return self._http.get(url + "/health").status_code == 200 or None
        except httpx.ConnectError:
            return False
        except httpx.HTTPError:
            return None

    def probe_engines(self, plan: Plan) -> set[str]:
        """Groups of the plan whose engine is down now."""
        groups = [g.id for g in plan.groups if g.id in self.urls]
        results = list(self._probe_pool.map(lambda gid: self._probe(gid, self.urls[gid]), groups))
        now = time.time()
        down = set()
        for gid, ok in zip(groups, results, strict=True):
            if ok is True:
                self.fails.pop(gid, None)
                self.first_fail.pop(gid, None)
                continue
            self.fails[gid] = self.fails.get(gid, 0) + 1
            self.first_fail.setdefault(gid, now)
            if ok is False or now - self.first_fail[gid] >= self.config.fail_after_s:
                down.add(gid)
        return down

    def provider_lost(self, plan: Plan) -> dict[str, str]:
        """Plan instances the provider reports gone (instance id -> status)."""
        if self.provider is None:
            return {}
        try:
            nodes = self.provider.status(self.deployment)
        except Exception as e:  # a flaky cloud API must not stop the loop; engine probes still run
            log.warning("provider status failed: %s", e)
            return {}
        ids = {i.id for i in plan.instances}
        latest: dict[str, Any] = {}
        for n in nodes:  # the last record of each instance (relaunches append new ones)
            if n.instance_id in ids:
                latest[n.instance_id] = n
        self.provider_alive = {iid for iid, n in latest.items() if n.status == "ready"}
        return {iid: n.status for iid, n in latest.items() if n.status in GONE_STATUSES}

    def notices(self, plan: Plan) -> dict[str, dict[str, Any]]:
        """Preemption notices from the agents of the plan's ready nodes."""
        try:
            from thunderops.agent import deployment_token

            token = deployment_token(self.deployment, create=False)
        except UserError:
            return {}
        ids = {i.id for i in plan.instances}
        recs = [r for r in self.store.nodes(self.deployment) if r.status == "ready" and r.host and r.instance_id in ids]

        def ask(rec) -> tuple[str, dict[str, Any] | None]:
            try:
                r = self._http.get(f"http://{rec.host}:{rec.agent_port or 8790}/v1/preemption",
                                   headers={"Authorization": f"Bearer {token}"})
                return rec.instance_id, (r.json() if r.status_code == 200 else None)
            except (httpx.HTTPError, ValueError):
                return rec.instance_id, None

        out = {}
        for iid, res in self._probe_pool.map(ask, recs):
            if res and res.get("notice"):
                out[iid] = res
        return out

    # -- one step ----------------------------------------------------------------------------------------
    def step(self) -> None:
        """Look once and act on what is new."""
        with self._lock:
            plan = self.store.latest_plan(self.deployment)
            t_look = time.time()
            down = self.probe_engines(plan)
            now = time.monotonic()
            gone: dict[str, str] = {}
            if now - self._last["provider"] >= self.config.provider_interval_s:
                self._last["provider"] = now
                gone = self.provider_lost(plan)
            if now - self._last["notice"] >= self.config.notice_interval_s:
                self._last["notice"] = now
                for iid, notice in self.notices(plan).items():
                    if iid not in self.doomed:
                        self.doomed[iid] = notice
                        self.event("preemption-notice", f"{iid}: {notice.get('cloud')} notice "
                                   f"({notice.get('action') or 'preempted'})", {"instance": iid, "notice": notice})
            newly = down - self.dead
            if newly:  # out of the router at once, before any planning
                self.dead |= newly
                self._drop(newly, plan)
            lost = self._lost_instances(plan, down, gone)
            dead_in_plan = {g.id for g in plan.groups} & self.dead
            if lost or dead_in_plan:
                self._on_lost(plan, lost, dead_in_plan, t_look)
            elif not plan.groups:
                self.state = "all-lost"
            self._spend_guard(plan)
            if now - self._last["usage"] >= self.config.usage_interval_s:
                self._last["usage"] = now
                self._check_shift(plan)
        self._kick_reprovision()

    def _lost_instances(self, plan: Plan, down: set[str], gone: dict[str, str]) -> dict[str, str]:
        """Instances whose replicas must go: gone per the provider, doomed by a notice, or all of whose
        engines are down (a killed node takes its engines with it)."""
        lost = {iid: f"provider: {st}" for iid, st in gone.items()}
        lost.update({iid: "preemption notice" for iid in self.doomed if iid in {i.id for i in plan.instances}})
        for inst in plan.instances:
            if self.provider_alive is not None and inst.id in self.provider_alive:
                continue  # the node is up: only its engines died (their groups restart on it)
            on = [g.id for g in plan.groups if inst.id in g.instances]
            if on and all(g in down for g in on) and inst.id not in lost:
                lost[inst.id] = "engines down"
        return lost

    def _drop(self, groups: set[str], plan: Plan) -> None:
        t0 = time.perf_counter()
        try:
            table = self.router.table()
            kept = {k: v for k, v in table.replicas.items() if k not in groups}
            pushed = False
            if kept:
                from thunderops.serve.router import RoutingTable

                routes = tuple(r for r in table.routes if r.prefill in kept and r.decode in kept)
                alive = with_fallbacks(RoutingTable(kept, routes or tuple(Route(k, k, 1.0) for k in kept),
                                                    table.version + 1))
                self.router.push(alive)
                pushed = True
        except Exception as e:  # the router still skips replicas it cannot reach; the reschedule follows
            log.warning("could not drop %s from the router: %s", groups, e)
            pushed = False
        first = min(self.first_fail.get(g, time.time()) for g in groups)
        self.event("replicas-dropped", f"{', '.join(sorted(groups))} out of the router", {
            "groups": sorted(groups), "plan_version": plan.version, "pushed": pushed,
            "first_failure_at": first, "detected_at": time.time(), "push_s": round(time.perf_counter() - t0, 4)})

    def _on_lost(self, plan: Plan, lost: dict[str, str], dead: set[str], t_look: float) -> None:
        """Lost instances (to replace) and dead groups (engines to restart): drop, reschedule, record, push."""
        from thunderops.scheduler.reschedule import reschedule

        key = f"v{plan.version}:lost:{','.join(sorted(lost))}:dead:{','.join(sorted(dead))}"
        lost_groups = [g for g in plan.groups if set(g.instances) & set(lost) or g.id in dead]
        dead_groups = {g.id for g in lost_groups}
        newly = dead_groups - self.dead
        if newly:
            self.dead |= newly
            self._drop(newly, plan)
        t0 = time.perf_counter()
        detected = min([self.first_fail.get(g, t_look) for g in dead_groups] or [t_look])
        insts = [plan.instance(i) for i in lost]
        before_goodput = plan.predicted.goodput_rps
        base = copy.deepcopy(plan)  # groups whose engines died on live nodes go too (they come back by restart)
        base.groups = [g for g in plan.groups if g.id not in dead_groups or set(g.instances) & set(lost)]
        base.routing = [r for r in plan.routing if r.prefill not in dead and r.decode not in dead]
        try:
            new = reschedule(base, lost_instances=lost, workload=plan_workload(plan))
            full = False
        except PlanError:
            new = None
            full = True
        decision_s = time.perf_counter() - t0
        restart = sorted(dead_groups - {g.id for g in plan.groups if set(g.instances) & set(lost)})
        what = "; ".join(x for x in (f"lost {', '.join(sorted(lost))}" if lost else "",
                                     f"engines of {', '.join(restart)} died" if restart else "") if x)
        preempted_zones = sorted({(i.cloud, i.zone) for i in insts if i.spot and i.zone
                                  and ("notice" in lost[i.id] or "provider" in lost[i.id])})
        spot_lost = [i.gpu for i in insts if i.spot]
        # what to bring back (with no provider, only engines on live nodes can come back)
        back = lost_groups if self.provider is not None else [g for g in lost_groups if g.id in restart]
        needed = [plan.instance(i) for i in dict.fromkeys(i for g in back for i in g.instances)]
        reprov = ({"instances": [asdict(i) for i in needed], "groups": [asdict(g) for g in back]}
                  if back and self.config.reprovision else None)
        gone_recs = [r for r in self.store.nodes(self.deployment, live_only=True) if r.instance_id in lost]
        with self.store.transaction():
            for rec in gone_recs:
                why = lost[rec.instance_id]
                # the provider saw it go (a spot VM taken back, a dead Ray node) or a notice says it will; a node
                # whose engines died may still be up and billing: `failed` until torn down
                status = ("preempted" if rec.spot else "terminated") if ("notice" in why or "provider" in why) \
                    else "failed"
                self.store.update_node(rec.id, status=status, terminated_at=now_utc(), error=why[:200])
            if new is None:
                # Nothing survives: keep the plan empty of groups so the status is plain, and reprovision all.
                empty = copy.deepcopy(plan)
                empty.instances = [i for i in plan.instances if i.id not in lost]
                empty.groups, empty.routing = [], []
                empty.cost_per_hour = round(sum(i.price_per_hour for i in empty.instances), 4)
                empty.predicted = type(plan.predicted)()
                empty.inputs = {**plan.inputs, "rescheduled": "all-lost", "lost": sorted(lost)}
                after = self.store.add_plan(self.deployment, empty, reason=f"all replicas lost ({what})")
                self.state, self.message = "all-lost", "every replica is lost; reprovisioning"
                self.event("all-lost", f"every replica is lost ({what}); "
                           "requests get 503 until replacements are up", {
                               "key": key, "before": plan.version, "after": after, "lost": lost,
                               "reprovision": reprov, "preempted_zones": preempted_zones, "spot_lost": spot_lost})
                self.event("reschedule", "no survivors: reprovisioning everything", {
                    "key": key, "before": plan.version, "after": after, "lost": lost, "light": False,
                    "decision_s": round(decision_s, 4), "detected_at": detected, "decided_at": time.time(),
                    "predicted": {"goodput_before": before_goodput, "goodput_after": 0.0},
                    "reprovision": reprov, "preempted_zones": preempted_zones, "spot_lost": spot_lost})
            else:
                after = self.store.add_plan(self.deployment, new, reason=f"light reschedule: {what}")
                self.state = "degraded"
                self.event("reschedule", f"{what}: {len(plan.groups)} -> {len(new.groups)} "
                           f"replicas, predicted goodput {before_goodput:.2f} -> {new.predicted.goodput_rps:.2f} req/s "
                           f"(decided in {decision_s * 1000:.0f} ms)", {
                               "key": key, "before": plan.version, "after": after, "lost": lost, "light": not full,
                               "dead_groups": sorted(dead_groups), "restart": restart,
                               "decision_s": round(decision_s, 4), "detected_at": detected, "decided_at": time.time(),
                               "phases": {g.id: g.phase for g in new.groups},
                               "predicted": {"goodput_before": before_goodput,
                                             "goodput_after": new.predicted.goodput_rps,
                                             "tokens_per_s_after": new.predicted.tokens_per_s},
                               "reprovision": reprov, "preempted_zones": preempted_zones, "spot_lost": spot_lost})
        self._terminate(gone_recs)  # a doomed or half-dead machine may still bill: let it go now
        for z in preempted_zones:
            self.avoid[tuple(z)] = time.time() + self.config.avoid_zone_s
        for gpu in spot_lost:
            self.spot_failures[gpu] = self.spot_failures.get(gpu, 0) + 1
        for iid in lost:
            self.doomed.pop(iid, None)
        if new is not None:
            self._push(new, f"plan v{new.version}")
        if reprov:
            # A restart waits a little: the provider may yet report the node itself gone.
            grace = 0.0 if lost else self.config.restart_grace_s
            self.pending[key] = Pending(key, needed, back, next_try=time.monotonic() + grace)

    def _push(self, plan: Plan, why: str) -> None:
        """Route by `plan` (minus replicas known dead)."""
        from thunderops.serve.router import RoutingError

        groups = [g.id for g in plan.groups]
        if not groups:
            return
        try:
            current = self.router.table().version
        except Exception:
            current = plan.version
        try:
            table = self.table_for(plan, version=max(current + 1, plan.version))
            self.router.push(table)
        except (RoutingError, KeyError, httpx.HTTPError) as e:
            self.event("routing-failed", f"could not push routing for {why}: {e}", {"plan_version": plan.version})

    def table_for(self, plan: Plan, version: int | None = None):
        """The routing table that serves `plan` (replicas known dead left out, fallback routes added)."""
        from thunderops.serve.router import RoutingTable

        groups = [g.id for g in plan.groups]
        table = RoutingTable.from_plan(plan, {g: self.urls[g] for g in groups if g in self.urls}, version=version)
        if self.dead & set(groups):
            table = table.without(self.dead & set(groups))
        return with_fallbacks(table)

    # -- spend -------------------------------------------------------------------------------------------
    def _spend_guard(self, plan: Plan) -> None:
        limit = self.config.max_spend
        if limit is None or self._stopped_for_spend:
            return
        spent = self.store.spend(self.deployment)
        rate = self.store.cost_per_hour(self.deployment)
        if spent + rate * self.config.spend_horizon_s / 3600.0 < limit:
            return
        self._stopped_for_spend = True
        self.config.reprovision = False
        self.pending.clear()
        self.state, self.message = "stopped", f"spend {spent:.2f} $ reached the --max-spend {limit:.2f} $"
        self.event("spend-limit", f"spent {spent:.4f} $ of the {limit:.2f} $ limit at {rate:.2f} $/h: tearing "
                   "the deployment down", {"spend": spent, "max_spend": limit, "cost_per_hour": rate})
        if self.provider is not None:
            try:
                self.provider.down(self.deployment)
            except Exception as e:
                self.event("down-failed", f"tearing down failed: {e}; run `thunderops down {self.deployment}`", {})
        self._stop.set()

    def spend_ok(self, extra_per_hour: float) -> bool:
        """Whether adding `extra_per_hour` $/h keeps the deployment within --max-spend over the horizon."""
        limit = self.config.max_spend
        if limit is None:
            return True
        spent = self.store.spend(self.deployment)
        rate = self.store.cost_per_hour(self.deployment) + extra_per_hour
        return spent + rate * self.config.spend_horizon_s / 3600.0 < limit

    # -- workload shift ----------------------------------------------------------------------------------
    def _check_shift(self, plan: Plan) -> None:
        from thunderops.scheduler.reschedule import reschedule

        if not plan.groups:
            return
        try:
            usage = self.router.usage(self.config.shift_window)
        except (httpx.HTTPError, ValueError):
            return
        since = parse_ts(self.store.events(self.deployment, "controller-start")[0].ts).timestamp() \
            if plan.inputs.get("observed_workload") is None else plan.inputs["observed_workload"].get("since", 0)
        recs = [r for r in usage.get("records", []) if r.get("started_at", 0) >= since]
        if len(recs) < self.config.shift_min_requests:
            return
        obs = observed_workload(recs)
        if obs is None:
            return
        cur = plan_workload(plan)
        ratios = {"prompt": obs.mean_prompt / max(cur.mean_prompt, 1e-9),
                  "output": obs.mean_output / max(cur.mean_output, 1e-9)}
        th = self.config.shift_threshold
        if all(1 / (1 + th) <= r <= 1 + th for r in ratios.values()):
            return
        t0 = time.perf_counter()
        try:
            new = reschedule(plan, workload=obs)
        except PlanError as e:
            self.event("workload-shift", f"workload shifted but re-deciding failed: {e}", {"ratios": ratios})
            return
        decision_s = time.perf_counter() - t0
        new.inputs = {**new.inputs, "observed_workload": {**_workload_dict(obs), "since": time.time()},
                      "rescheduled": "workload-shift"}
        with self.store.transaction():
            after = self.store.add_plan(self.deployment, new, reason="workload shift: phases and routing re-decided")
            self.event("workload-shift", f"mean prompt x{ratios['prompt']:.2f}, output x{ratios['output']:.2f} "
                       f"vs the plan: phases and routing re-decided, predicted goodput "
                       f"{plan.predicted.goodput_rps:.2f} -> {new.predicted.goodput_rps:.2f} req/s", {
                           "key": f"v{plan.version}:shift", "before": plan.version, "after": after, "ratios": ratios,
                           "observed": obs.summary(), "decision_s": round(decision_s, 4),
                           "phases": {g.id: g.phase for g in new.groups},
                           "predicted": {"goodput_before": plan.predicted.goodput_rps,
                                         "goodput_after": new.predicted.goodput_rps}})
        self._push(new, f"plan v{new.version}")

    # -- reprovisioning ----------------------------------------------------------------------------------
    def _kick_reprovision(self) -> None:
        if not self.pending or not self.config.reprovision:
            return
        if self._worker is not None and self._worker.is_alive():
            return
        due = [p for p in self.pending.values() if p.next_try <= time.monotonic()]
        if not due:
            return
        self._worker = threading.Thread(target=self._reprovision, args=(due[0],), name="reprovision", daemon=True)
        self._worker.start()

    def offers(self):
        if self._offers is None:
            from thunderops.catalog import load_offers

            self._offers = load_offers()
        return self._offers

    def replacement(self, inst: Instance, new_id: str, headroom: float) -> Instance | None:
        """The offer to replace `inst` with: same GPU type and count, not in an avoided zone, spot only while
        spot has not kept failing for that GPU, cheapest that fits `headroom` $/h. Local nodes come back as is."""
        if getattr(self.provider, "name", "") == "local":
            return replace(inst, id=new_id, host=None) if inst.price_per_hour <= headroom + 1e-9 else None
        from thunderops.provision.skypilot import fallback_candidates

        now = time.time()
        spot_ok = inst.spot and self.spot_failures.get(inst.gpu, 0) < self.config.spot_failures_for_on_demand
        cands = [inst, *fallback_candidates(replace(inst, spot=True) if inst.spot else inst, self.offers())]
        for c in sorted(cands, key=lambda c: c.price_per_hour):
            if c.spot and not spot_ok:
                continue
            if self.avoid.get((c.cloud, c.zone), 0) > now:
                continue
            if c.price_per_hour <= headroom + 1e-9:
                return replace(c, id=new_id, host=None)
        return None

    def _reprovision(self, pend: Pending) -> None:
        t0 = time.perf_counter()
        pend.attempts += 1
        try:
            self._reprovision_once(pend, t0)
        except Exception as e:  # retried with back-off; never a crash loop
            log.exception("reprovision failed")
            spot_gpu = next((i.gpu for i in pend.instances if i.spot), None)
            if spot_gpu:
                self.spot_failures[spot_gpu] = self.spot_failures.get(spot_gpu, 0) + 1
            give_up = pend.attempts >= self.config.max_reprovision_attempts
            with self._lock:
                self.event("reprovision-abandoned" if give_up else "reprovision-failed",
                           f"attempt {pend.attempts}: {type(e).__name__}: {e}"
                           + ("; giving up" if give_up else f"; retrying in {self.config.reprovision_backoff_s:g} s"),
                           {"key": pend.key, "attempt": pend.attempts, "spot_gpu": spot_gpu})
                if give_up:
                    self.pending.pop(pend.key, None)
                else:
                    pend.next_try = time.monotonic() + self.config.reprovision_backoff_s * pend.attempts

    def _reprovision_once(self, pend: Pending, t0: float) -> None:
        with self._lock:
            plan = self.store.latest_plan(self.deployment)
            budget = plan.budget_per_hour or float("inf")
            headroom = budget - self.store.cost_per_hour(self.deployment)
            taken = {n.instance_id for n in self.store.nodes(self.deployment)} | {i.id for i in plan.instances}
            have = {i.id for i in plan.instances}
            specs = {i.id: i for i in pend.instances}
            need = [i for i in dict.fromkeys(s.instance for g in pend.groups for s in g.stages) if i not in have]
            if need and self.provider is None:
                raise RuntimeError(f"{', '.join(need)} lost and no provider to replace them with")
            repl: dict[str, Instance] = {}
            for iid in need:
                new_id = next_instance_id(iid, taken)
                taken.add(new_id)
                r = self.replacement(specs[iid], new_id, headroom - sum(x.price_per_hour for x in repl.values()))
                if r is None:
                    raise RuntimeError(f"no offer for {iid} ({specs[iid].gpus}x{specs[iid].gpu}) fits the "
                                       f"{headroom:.2f} $/h left of the {budget:.2f} $/h budget")
                repl[iid] = r
            extra = sum(i.price_per_hour for i in repl.values())
            if not self.spend_ok(extra):
                raise RuntimeError(f"adding {extra:.2f} $/h would pass --max-spend {self.config.max_spend:.2f} $")
            folded, added = fold_in(plan, pend.groups, repl)
            if not added:
                raise RuntimeError("no lost group fits on the replacements and survivors")
            self.state = "reprovisioning"
            self.event("reprovision-start", f"restarting {', '.join(added)}" + (f"; replacing {', '.join(repl)} with " if repl else "")
                       + ", ".join(f"{r.id} ({r.cloud} {r.zone or r.region} {'spot' if r.spot else 'on-demand'} "
                                   f"{r.price_per_hour:.2f} $/h)" for r in repl.values()),
                       {"key": pend.key, "replacements": {k: asdict(v) for k, v in repl.items()},
                        "groups": added, "headroom_per_hour": headroom})
        # Provision only the new instances (and the groups that run on them) without storing a plan version:
        # the plan that folds them in is stored below once they serve.
        sub = copy.deepcopy(folded)
        sub.instances = list(repl.values())
        new_ids = {i.id for i in sub.instances}
        sub.groups = [g for g in folded.groups if g.id in added and set(g.instances) <= new_ids]
        sub.routing = []
        sub.budget_per_hour = headroom
        sub.cost_per_hour = extra
        nodes = {}
        if sub.instances:
            res = self.provider.up(self.deployment, sub, keep_partial=True)
            if not res.ok:
                raise RuntimeError(f"provisioning failed: {res.message}")
            nodes = {n.instance_id: n for n in res.nodes}
        for inst in folded.instances:
            if inst.id in nodes:
                inst.host = nodes[inst.id].host
        known = self.provider.status(self.deployment) if self.provider is not None else []
        all_nodes = {r.instance_id: r for r in known} | nodes
        urls = self.launcher.start(self.deployment, folded, added, all_nodes)
        measured = self._measure(list(repl.values()))
        if measured:
            from thunderops.netbench import merge_bandwidth

            folded.bandwidth_gbps = merge_bandwidth(folded.bandwidth_gbps, measured)
        from thunderops.scheduler.reschedule import reschedule

        with self._lock:
            self.urls.update(urls)
            latest = self.store.latest_plan(self.deployment)
            if latest.version != plan.version:  # something else happened meanwhile: fold into that plan
                bw = folded.bandwidth_gbps
                folded, _ = fold_in(latest, [folded.group(g) for g in added], {r.id: r for r in repl.values()},
                                    keep_ids=True)
                folded.bandwidth_gbps = bw
            new = reschedule(folded, workload=plan_workload(folded))
            after = self.store.add_plan(self.deployment, new, reason=f"reprovisioned: {', '.join(urls)} back")
            self.dead -= set(urls)
            self.pending.pop(pend.key, None)
            self.state = "degraded" if self.pending else "watching"
            self.message = ""
            self.event("reprovisioned", f"{', '.join(sorted(urls))} serving"
                       + (f" on {', '.join(sorted(new_ids))}" if new_ids else " again") + ": "
                       f"{len(new.groups)} replicas, predicted goodput {latest.predicted.goodput_rps:.2f} -> "
                       f"{new.predicted.goodput_rps:.2f} req/s ({time.perf_counter() - t0:.1f} s)", {
                           "key": pend.key, "before": latest.version, "after": after, "groups": sorted(urls),
                           "instances": sorted(new_ids), "measured_links": bool(measured),
                           "phases": {g.id: g.phase for g in new.groups},
                           "cost_per_hour": new.cost_per_hour, "seconds": round(time.perf_counter() - t0, 3),
                           "predicted": {"goodput_before": latest.predicted.goodput_rps,
                                         "goodput_after": new.predicted.goodput_rps}})
            self._push(new, f"plan v{new.version}")

    def _measure(self, new: list[Instance]) -> dict[str, dict[str, float]]:
        """Links between the new nodes and the others, where their agents answer (best effort)."""
        try:
            from thunderops.netbench import endpoints_for_deployment, measure

            eps = endpoints_for_deployment(self.deployment, self.store)
            if not any(e.name in {i.id for i in new} for e in eps):
                return {}
            return measure(eps, duration_s=self.config.netbench_duration_s).bandwidth_gbps()
        except Exception as e:  # no agents (emulated nodes) or a failed run: keep the planned figures
            log.info("no link measurement for %s: %s", [i.id for i in new], e)
            return {}

    # -- running -----------------------------------------------------------------------------------------
    def status(self) -> ControllerStatus:
        plan = self.store.latest_plan(self.deployment)
        return ControllerStatus(self.deployment, self.state, plan.version, [g.id for g in plan.groups],
                                sorted(self.dead), sorted(self.pending), round(self.store.spend(self.deployment), 6),
                                round(self.store.cost_per_hour(self.deployment), 4), self.message)

    def run(self, duration_s: float | None = None) -> ControllerStatus:
        """Loop until `stop()` (or `duration_s`, or the spend limit). Errors in one step are recorded and the loop
        goes on after a pause, so a flaky dependency never makes a crash loop."""
        end = time.monotonic() + duration_s if duration_s else None
        errors = 0
        while not self._stop.is_set() and (end is None or time.monotonic() < end):
            t = time.monotonic()
            try:
                self.step()
                errors = 0
            except Exception as e:
                errors += 1
                log.exception("controller step failed")
                if errors in (1, 10, 100):
                    try:
                        self.event("controller-error", f"{type(e).__name__}: {e}", {"consecutive": errors})
                    except Exception:
                        pass
                self._stop.wait(min(10.0, self.config.interval_s * errors))
            self._stop.wait(max(0.0, self.config.interval_s - (time.monotonic() - t)))
        if self._worker is not None:
            self._worker.join(timeout=5)
        return self.status()

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        self.stop()
        self._probe_pool.shutdown(wait=False)
        self._http.close()
        self.router.close()


def start_background(deployment: str, *, router_url: str | None = None, admin_key: str | None = None,
                     engines: Mapping[str, Any] | None = None, max_spend: float | None = None,
                     log_path: str | Path | None = None) -> int:
    """Start `thunderops watch DEPLOYMENT` as a detached process (what `thunderops up` calls once serving is
    up; `engines` as for `save_router`). Returns its pid; its log is $THUNDEROPS_HOME/logs/<dep>-controller.log."""
    import subprocess
    import sys

    if router_url and admin_key:
        save_router(deployment, router_url, admin_key, engines)
    log_path = Path(log_path or default_home() / "logs" / f"{deployment}-controller.log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-c", "from thunderops.cli import main; main()", "watch", deployment]
    if max_spend is not None:
        argv += ["--max-spend", str(max_spend)]
    with open(log_path, "ab") as out:
        p = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True)
    return p.pid


def event_rows(store: Store, deployment: str, kind: str | None = None) -> list[dict[str, Any]]:
    """The deployment's events as plain rows (what `thunderops events` prints)."""
    return [{"id": e.id, "ts": e.ts, "kind": e.kind, "message": e.message, "payload": e.payload}
            for e in store.events(deployment, kind)]

