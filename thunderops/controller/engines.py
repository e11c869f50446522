"""Engine launchers: how replacement engines start (NodeEngines on real nodes; LocalEmulators and RayEmulators,
the GPU double) and wait_engines. `_EngineActor` is a Ray actor class: Ray workers import it from this module."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx

from thunderops.plan import Plan


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
        from thunderops.agent import client_tls, deployment_tls

        join_ray_clusters(deployment, plan, groups, nodes, timeout_s=min(self.timeout_s, 300.0))
        pair = deployment_tls(deployment, create=False)  # with one, the engines serve HTTPS with it
        urls = {}
        for gid in groups:
            g = plan.group(gid)
            head = g.stages[0].instance
            node = nodes[head]
            k = [x.id for x in plan.groups if x.stages[0].instance == head].index(gid)
            urls[gid] = f"{'https' if pair else 'http'}://{node.host}:{node.ports.engine + k}"
        wait_engines(urls, self.timeout_s, verify=client_tls(pair[0]) if pair else None)
        return urls


def join_ray_clusters(deployment: str, plan: Plan, groups: list[str], nodes: Mapping[str, Any],
                      timeout_s: float = 300.0) -> list[str]:
    """For each of `groups` whose engine spans nodes: ask the agents of its other nodes to join the Ray head
    on its first node (`thunderops.serve.ray_cluster`; node addresses are known only once all are up). An
    agent that does not answer yet (its node still starting) is asked again until `timeout_s`. Returns one
    line per join."""
    import asyncio

    import aiohttp

    from thunderops.agent import client_tls, deployment_tls, deployment_token
    from thunderops.errors import ProvisionError
    from thunderops.netbench import AgentCallError, AgentEndpoint, call_agent
    from thunderops.serve.ray_cluster import ray_clusters

    if not nodes:
        return []
    base = next(iter(nodes.values())).ports.ray
    todo = [rc for gid, rc in ray_clusters(plan, base).items() if gid in groups]
    if not todo:
        return []
    token = deployment_token(deployment, create=False)
    pair = deployment_tls(deployment, create=False)
    tls = client_tls(pair[0]) if pair else None

    def endpoint(inst: str) -> AgentEndpoint:
        node = nodes.get(inst)
        if node is None or not node.host:
            raise ProvisionError(f"instance {inst} of a spanning engine has no ready node; see `thunderops status`")
        return AgentEndpoint(inst, node.host, node.ports.agent, token, tls)

    async def call(http: aiohttp.ClientSession, inst: str, method: str, path: str, **kw: Any) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return await call_agent(http, endpoint(inst), method, path, **kw)
            except AgentCallError as e:
                if time.monotonic() > deadline or "unreachable" not in str(e):
                    raise ProvisionError(f"joining the Ray cluster of a spanning engine: {e}") from None
                await asyncio.sleep(2.0)

    async def go() -> list[str]:
        done = []
        async with aiohttp.ClientSession() as http:
            for rc in todo:
                health = await call(http, rc.head, "GET", "/v1/health")
                head = f"{health.get('node_ip') or nodes[rc.head].host}:{rc.port}"
                for inst in rc.workers:
                    # up to a minute: an agent whose worker already runs asks the head whether it still knows it
                    await call(http, inst, "POST", "/v1/ray/join", json=_join_body(rc, inst, head), timeout_s=90.0)
                    done.append(f"{rc.group}: {inst} joins the Ray head at {head}")
        return done

    return asyncio.run(go())


def _join_body(rc: Any, inst: str, head: str) -> dict[str, Any]:
    """The agent's join request for instance `inst` of spanning group `rc`, with its own port block."""
    return {"group": rc.group, "head": head, "gpus": list(rc.gpus_on(inst)), "ports": rc.ports_on(inst),
            "instance": inst}


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
            name = f"engine-{deployment}-{gid}"
            _free_actor_name(ray, name)
            actor = actor_cls.options(resources={node_resource(g.stages[0].instance): 0.01},
                                      name=name, lifetime="detached").remote()
            self.actors[gid] = actor
            refs[gid] = actor.start.remote(plan.model, g.stages[0].gpu, g.tp, g.pp, self.speedup, mml,
                                           self.engine_key, self.host)
        urls = {}
        try:
            for gid, ref in refs.items():
                urls[gid], self.pids[gid] = ray.get(ref, timeout=self.timeout_s)
            wait_engines(urls, self.timeout_s)
        except Exception:  # a retry starts afresh: no half-started engine keeps its name or its node's port
            for gid in refs:
                _kill_quietly(ray, self.actors.pop(gid, None))
            raise
        return urls

    def stop(self) -> None:
        import ray

        for actor in self.actors.values():
            _kill_quietly(ray, actor)
        self.actors.clear()


def _kill_quietly(ray: Any, actor: Any) -> None:
    if actor is not None:
        try:
            ray.kill(actor)
        except Exception:  # already dead with its node
            pass


def _free_actor_name(ray: Any, name: str, timeout_s: float = 10.0) -> None:
    """End a detached engine actor left under `name` by an earlier start that failed (e.g. timed out on a busy
    machine): a retry would otherwise fail with ActorAlreadyExistsError until it is gone."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            old = ray.get_actor(name)
        except ValueError:  # no such actor: the name is free
            return
        _kill_quietly(ray, old)
        if time.monotonic() > deadline:
            return  # creating the actor then says what is wrong
        time.sleep(0.1)


def wait_engines(urls: Mapping[str, str], timeout_s: float, verify: Any = None) -> None:
    """Until every engine answers /health (`verify`: the SSL context trusting HTTPS engines)."""
    deadline = time.monotonic() + timeout_s
    pending = dict(urls)
    with httpx.Client(timeout=1.0, verify=verify if verify is not None else True) as http:
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
