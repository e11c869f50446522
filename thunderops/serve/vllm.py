"""The exact `vllm serve` command line and environment for each plan group.

One deployment pins one model dtype, one attention backend and one KV-cache dtype across all its engines:
NIXL moves raw KV blocks, so both sides of a transfer must lay them out identically even when their GPU
generations differ (vLLM would otherwise pick a backend per GPU).

One deployment also runs one KV connector (`kv_transfer`), chosen when the plan is made and kept by every later
version (recorded as ``inputs["kv_transfer"]``), since running engines cannot change theirs:
``NixlConnector`` (NIXL's pull mode, vLLM's default), ``NixlPushConnector`` where some replica pipelines
(the one NIXL mode that sends from a pipeline; no NIXL mode receives into one, so decode replicas are single
stage), or ``LMCacheConnectorV1`` with its compressing serde where the plan compresses KV for transfer. NIXL
engines run ``kv_role=kv_both``, colocated ones too, so a light reschedule may flip any phase without a
restart; LMCache's PD mode fixes each engine's role (`engine_phases`).
Every engine gets explicit ``--max-num-batched-tokens``/``--max-num-seqs`` from the performance model's
``batch_limits`` for its group (vLLM's own defaults differ by GPU), so the deployment runs what was planned.
Commands are argument lists; ``EngineCommand.shell()`` is for display only.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from thunderops.errors import PlanError
from thunderops.plan import Group, Plan, Route
from thunderops.specs import get_gpu, get_model, norm, served_names

if TYPE_CHECKING:
    from thunderops.perf import PerfModel

NIXL = "NixlConnector"  # pull: the decode engine reads the prefill engine's KV blocks
NIXL_PUSH = "NixlPushConnector"  # push: the prefill engine writes them (same proxy flow, same X-Request-Id)
LMCACHE = "LMCacheConnectorV1"
KV_TRANSFERS = (NIXL, NIXL_PUSH, LMCACHE)
_PRE_AMPERE = ("v100", "t4", "p100", "p40", "p4", "k80", "m60", "titanv")  # no bf16, no FlashAttention 2


# vLLM's CUDA wheels: CUDA 13 is their default build since 2026-04 (vllm-project/vllm#39878), and CUDA 13 has no
# Volta (sm70) support
ENGINE_MIN_SM = 75


def engine_gpu_problem(gpu: str) -> str | None:
    """Why the engines thunderops installs on a node (`pip install vllm`: CUDA builds) cannot run on `gpu`, or
    None when they can."""
    spec = get_gpu(gpu)
    if spec.arch.startswith("gfx"):
        return f"{spec.name} is an AMD GPU and vLLM's pip wheels are CUDA builds (ROCm needs vLLM's ROCm build)"
    if spec.arch.startswith("sm") and int(spec.arch[2:]) < ENGINE_MIN_SM:
        return (f"{spec.name} ({spec.arch}) predates vLLM's CUDA 13 wheels, which need compute capability "
                f"{ENGINE_MIN_SM / 10:g} or newer")
    return None


@dataclass(frozen=True)
class EngineOptions:
    """Deployment-wide engine settings. None means "derive from the plan" (see `engine_commands`)."""

    base_port: int = 8100
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None
    dtype: str | None = None  # bfloat16 unless some GPU lacks it
    attention_backend: str | None = None  # FLASH_ATTN unless some GPU predates Ampere
    kv_cache_dtype: str = "auto"  # "auto" = the pinned model dtype, identical on every engine
    host: str = "0.0.0.0"
    nixl_port_offset: int = 1000  # NIXL side channel at HTTP port + this
    lmcache_serde: str = "cachegen"  # LMCache's compressing serializer
    attention_via_env: bool = False  # vLLM < 0.12 has no --attention-backend: pin with VLLM_ATTENTION_BACKEND
    max_num_batched_tokens: int | None = None  # None: vLLM's default for each group's GPUs (PerfModel.batch_limits)
    max_num_seqs: int | None = None  # likewise
    extra_args: tuple[str, ...] = ()
    ssl_files: tuple[str, str] | None = None  # (certificate, key) files: the engines serve HTTPS (vLLM's --ssl-*)


@dataclass
class EngineCommand:
    """How to start one group's engine: run `argv` with `env` added, on `instance` (its first stage)."""

    group: str
    phase: str
    instance: str
    host: str | None
    port: int
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    connector: str | None = None
    ray: bool = False
    https: bool = False

    @property
    def url(self) -> str:
        return f"{'https' if self.https else 'http'}://{self.host or '127.0.0.1'}:{self.port}"

    def shell(self) -> str:
        """A copy-pasteable rendering (display only; never executed through a shell)."""
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items()))
        return (env + " " if env else "") + shlex.join(self.argv)


def _is_pre_ampere(gpu: str) -> bool:
    return norm(get_gpu(gpu).name).startswith(_PRE_AMPERE)


def pinned_settings(plan: Plan, options: EngineOptions = EngineOptions()) -> dict[str, str]:
    """The dtype, attention backend and KV dtype every engine of this deployment uses."""
    old = any(_is_pre_ampere(s.gpu) for g in plan.groups for s in g.stages)
    return {
        "dtype": options.dtype or ("float16" if old else "bfloat16"),
        "attention_backend": options.attention_backend or ("TRITON_ATTN" if old else "FLASH_ATTN"),
        "kv_cache_dtype": options.kv_cache_dtype,
    }


def max_model_len(plan: Plan, options: EngineOptions = EngineOptions()) -> int:
    """One context length for the whole deployment: the option, else plan.inputs["max_model_len"], else the
    model's own limit capped by the smallest KV capacity of any group (so every engine can start)."""
    if options.max_model_len:
        return int(options.max_model_len)
    if plan.inputs.get("max_model_len"):
        return int(plan.inputs["max_model_len"])
    limit = get_model(plan.model).max_position
    try:
        from thunderops.perf import layout_of

        pm = perf_model(plan, options)
        caps = [pm.kv_capacity_tokens(layout_of(plan, g)) for g in plan.groups]
        if caps and min(caps) > 0:
            limit = min(limit, min(caps))
    except (ImportError, PlanError, KeyError, ValueError):
        pass
    return int(limit)


def perf_model(plan: Plan, options: EngineOptions = EngineOptions()) -> PerfModel:
    """The performance model of the engines these options start (memory utilization, batch limits)."""
    from thunderops.perf import PerfModel

    return PerfModel(plan.model, mem_util=options.gpu_memory_utilization,
                     max_batch_tokens=options.max_num_batched_tokens, max_num_seqs=options.max_num_seqs)


def batch_limits(plan: Plan, group: Group, options: EngineOptions = EngineOptions()) -> tuple[int, int]:
    """(--max-num-batched-tokens, --max-num-seqs) of one group's engine: what the performance model planned
    with (vLLM's defaults for the group's smallest GPU unless the options override them)."""
    return perf_model(plan, options).batch_limits([s.gpu for s in group.stages])


def kv_transfer_for(groups: Iterable[Group], routing: Iterable[Route]) -> str:
    """The KV connector a new deployment of these groups and routes runs: LMCache where some route compresses
    KV, NIXL's push mode where some replica pipelines, else NIXL's pull mode."""
    if any(r.kv_compression < 1 for r in routing):
        return LMCACHE
    return NIXL_PUSH if any(g.pp > 1 for g in groups) else NIXL


def kv_transfer(plan: Plan) -> str:
    """The deployment's KV connector: the one it was planned with (plans from before the choice was recorded:
    derived the same way)."""
    conn = plan.inputs.get("kv_transfer") or kv_transfer_for(plan.groups, plan.routing)
    if conn not in KV_TRANSFERS:
        raise PlanError(f"unknown kv_transfer {conn!r} in the plan's inputs; expected one of {', '.join(KV_TRANSFERS)}")
    if conn == NIXL and any(g.pp > 1 for g in plan.groups):
        raise PlanError("the plan pipelines a replica but records NIXL's pull mode, which cannot send from a "
                        "pipeline; re-create the plan with thunderops plan")
    return conn


def connectors(plan: Plan) -> dict[str, str | None]:
    """KV connector per group: the deployment's (`kv_transfer`) for every group, colocated ones included so a
    reschedule can flip their phase; none for colocated groups of an LMCache deployment (its PD mode needs a
    sender or receiver role)."""
    conn = kv_transfer(plan)
    return {g.id: None if conn == LMCACHE and g.phase == "colocated" else conn for g in plan.groups}


def engine_phases(plan: Plan) -> dict[str, tuple[str, ...]]:
    """The phases each group's running engine can serve without a restart: any phase for a single-stage NIXL
    engine (kv_both), prefill or colocated for a pipelined one (NIXL receives into one stage only), its own
    phase under LMCache (roles are fixed at start)."""
    conns = connectors(plan)
    out = {}
    for g in plan.groups:
        if conns[g.id] in (NIXL, NIXL_PUSH):
            out[g.id] = ("prefill", "decode", "colocated") if g.pp == 1 else ("prefill", "colocated")
        else:
            out[g.id] = (g.phase,)
    return out


def _kv_config(group: Group, connector: str, index: int) -> dict[str, object]:
    if connector in (NIXL, NIXL_PUSH):
        return {"kv_connector": connector, "kv_role": "kv_both"}
    role = "kv_producer" if group.phase == "prefill" else "kv_consumer"
    return {"kv_connector": LMCACHE, "kv_role": role,
            "kv_connector_extra_config": {"discard_partial_chunks": False, "lmcache_rpc_port": f"{role}{index}"}}


def engine_commands(plan: Plan, options: EngineOptions = EngineOptions(), *, executable: str = "vllm") -> list[EngineCommand]:
    """The `vllm serve` command and environment of every group of `plan`, in plan order."""
    model = get_model(plan.model)
    pins = pinned_settings(plan, options)
    mml = max_model_len(plan, options)
    conns = connectors(plan)
    pm = perf_model(plan, options)
    names = served_names(plan.model)  # the names the router accepts
    next_port: dict[str, int] = {}
    out = []
    for index, g in enumerate(plan.groups):
        if not g.stages:
            raise PlanError(f"group {g.id} has no pipeline stages; re-create the plan")
        if sum(g.layer_split) != model.layers or min(g.layer_split) < 1:
            raise PlanError(f"group {g.id} splits {model.name}'s {model.layers} layers as {g.layer_split}: every "
                            f"stage needs at least one and they must add up; re-create the plan with thunderops plan")
        if g.phase == "decode" and g.pp > 1:
            raise PlanError(f"group {g.id} decodes on a {g.pp}-stage pipeline, which vLLM's KV connectors cannot "
                            "receive into; re-create the plan with thunderops plan")
        tps = {s.tp for s in g.stages}
        if len(tps) > 1:
            raise PlanError(f"group {g.id}: vLLM needs the same TP degree in every pipeline stage, got {sorted(tps)}")
        head = g.stages[0].instance
        try:
            host = plan.instance(head).host
        except KeyError:
            raise PlanError(f"group {g.id} uses unknown instance {head!r}") from None
        port = next_port.get(head, options.base_port)
        next_port[head] = port + 1
        tokens, seqs = pm.batch_limits([s.gpu for s in g.stages])
        multi_node = len(g.instances) > 1
        argv = [
            executable, "serve", model.hf_id,
            "--served-model-name", *names,
            "--host", options.host,
            "--port", str(port),
            "--tensor-parallel-size", str(g.tp),
            "--pipeline-parallel-size", str(g.pp),
            "--gpu-memory-utilization", str(options.gpu_memory_utilization),
            "--max-model-len", str(mml),
            "--dtype", pins["dtype"],
            "--kv-cache-dtype", pins["kv_cache_dtype"],
            "--max-num-batched-tokens", str(tokens),
            "--max-num-seqs", str(seqs),
        ]
        env: dict[str, str] = {}
        if options.attention_via_env:
            env["VLLM_ATTENTION_BACKEND"] = pins["attention_backend"]
        else:
            argv += ["--attention-backend", pins["attention_backend"]]
        if multi_node:
            argv += ["--distributed-executor-backend", "ray"]
        if g.pp > 1:
            env["VLLM_PP_LAYER_PARTITION"] = ",".join(str(n) for n in g.layer_split)
        if not multi_node and g.stages[0].gpu_ids:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for s in g.stages for i in s.gpu_ids)
        conn = conns[g.id]
        if conn is not None:
            argv += ["--kv-transfer-config", json.dumps(_kv_config(g, conn, index), separators=(",", ":"))]
            if conn in (NIXL, NIXL_PUSH):
                env["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(port + options.nixl_port_offset)
                if host:
                    env["VLLM_NIXL_SIDE_CHANNEL_HOST"] = host
            else:
                env.update({
                    "LMCACHE_ENABLE_PD": "True",
                    "LMCACHE_PD_ROLE": "sender" if g.phase == "prefill" else "receiver",
                    "LMCACHE_TRANSFER_CHANNEL": "nixl",
                    "LMCACHE_REMOTE_SERDE": options.lmcache_serde,
                    "LMCACHE_CHUNK_SIZE": "256",
                })
        if options.ssl_files:
            argv += ["--ssl-certfile", options.ssl_files[0], "--ssl-keyfile", options.ssl_files[1]]
        argv += list(options.extra_args)
        out.append(EngineCommand(g.id, g.phase, head, host, port, argv, env, conn, multi_node,
                                 https=options.ssl_files is not None))
    return out


def endpoint_urls(commands: list[EngineCommand]) -> dict[str, str]:
    """group id -> base URL of its engine's OpenAI server."""
    return {c.group: c.url for c in commands}
