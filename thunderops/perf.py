"""Performance model: roofline step times with calibrated efficiencies, memory and KV capacity, and
per-replica capacities (requests/s) under an SLO.

Every operator of a decoder layer is costed as max(FLOPs / (peak x eff_compute), bytes / (HBM bw x eff_memory))
on the GPU that runs it; TP adds two ring all-reduces per layer, PP an activation hop between stages, and each
step a fixed overhead. Efficiencies come from datasheet defaults or a calibration file measured on real GPUs
(`catalogs/calibration/<GPU>.json`, written by `thunderops calibrate`).

Units: seconds, bytes, FLOPs. GPU bandwidths are GB/s as datasheets give them; network links are Gbit/s.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field, fields, replace
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from thunderops.errors import PlanError
from thunderops.plan import SLO, Group, Plan
from thunderops.specs import GpuSpec, ModelSpec, catalog_dir, get_gpu, get_model, norm
from thunderops.workload import Workload

if TYPE_CHECKING:
    from collections.abc import Sequence

PHASES = ("prefill", "decode", "colocated")
# Gbit/s of a node whose network speed nothing gives (no measured or planned figure, no NIC in the catalog): the
# scheduler's topology plans with it and a hand-made plan without a matrix is read with it, so both agree.
DEFAULT_NETWORK_GBPS = 10.0
SAME_NODE_PP_GBPS = float("inf")
LAYER_CACHE_MAX = 200_000  # memoised (GPU, TP, link, work) layer times, about 40 MB when full


class DoesNotFitError(PlanError):
    """A model replica's weights (plus a minimum KV cache) do not fit in its GPUs' memory."""


class ParallelismError(PlanError):
    """A TP degree that does not divide the attention heads, or an impossible layer split."""


# ---------------------------------------------------------------------------------------------- layouts


@dataclass(frozen=True)
class StageLayout:
    """One pipeline stage: `tp` GPUs of one type holding `layers` consecutive layers."""

    gpu: GpuSpec
    tp: int
    layers: int


@dataclass(frozen=True)
class Layout:
    """One replica: pipeline stages in order, the slowest inter-stage link (Gbit/s) and an optional
    override of the intra-node TP link (GB/s bidirectional; default: the GPU spec's)."""

    stages: tuple[StageLayout, ...]
    pp_link_gbps: float = float("inf")
    tp_link_gbps: float | None = None

    @property
    def pp(self) -> int:
        return len(self.stages)

    @property
    def gpus(self) -> int:
        return sum(s.tp for s in self.stages)

    @property
    def layers(self) -> int:
        return sum(s.layers for s in self.stages)

    @classmethod
    def single(cls, gpu: str | GpuSpec, tp: int, layers: int) -> Layout:
        """A one-stage layout (no pipeline)."""
        return cls((StageLayout(get_gpu(gpu), tp, layers),))


# ---------------------------------------------------------------------------------------------- calibration


@dataclass(frozen=True)
class Calibration:
    """Achieved fractions of datasheet peaks on one GPU type, and fixed costs.

    compute_eff: large GEMMs vs dense bf16 peak; attn_eff: prefill attention (flash) vs peak;
    memory_eff: streaming reads (weights, KV) vs HBM bandwidth; comm_eff: all-reduce bus bandwidth vs one
    direction of the intra-node link; gemm_m_half: GEMM rows at which compute efficiency is half its peak
    (small-batch GEMMs run below peak even when compute-bound); attn_len_half: prompt length at which
    attention efficiency is half its peak; kernel_latency_s: fixed cost of every kernel (ramp-up and tail);
    kv_read_eff: decode attention's KV reads vs HBM bandwidth; roofline_p: sharpness of the roofline, an
    operator taking (t_compute^p + t_memory^p)^(1/p) (p -> inf is the plain max);
    elementwise_scale: multiplier on the modelled elementwise traffic (norms, rotary, activation: fused
    differently by each engine); step_overhead_s: fixed cost per engine step (scheduling, sampling, launches);
    layer_overhead_s: per layer per step (what kernel latencies leave unexplained)."""

    gpu: str = "generic"
    compute_eff: float = 0.70
    attn_eff: float = 0.45
    memory_eff: float = 0.80
    comm_eff: float = 0.75
    comm_latency_s: float = 10e-6
    gemm_m_half: float = 32.0
    attn_len_half: float = 256.0
    kernel_latency_s: float = 5e-6
    kv_read_eff: float = 0.75
    roofline_p: float = 8.0
    elementwise_scale: float = 1.0
    step_overhead_s: float = 0.3e-3
    layer_overhead_s: float = 0.0
    source: str = "datasheet defaults (thunderops.perf.Calibration)"

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict) -> Calibration:
        known = {f.name for f in fields(cls)}
        try:
            cal = cls(**{k: (v if k in ("gpu", "source") else float(v)) for k, v in d.items() if k in known})
        except (TypeError, ValueError) as e:
            raise PlanError(f"bad calibration value ({e}); re-run `thunderops calibrate`") from None
        for name in ("compute_eff", "attn_eff", "memory_eff", "comm_eff"):
            if not 0 < getattr(cal, name) <= 1.5:
                raise PlanError(f"calibration {name}={getattr(cal, name)} is out of range (0, 1.5]")
        return cal


def calibration_dir() -> Path:
    return catalog_dir() / "calibration"


def load_calibration_file(path: str | Path) -> tuple[Calibration, dict]:
    """Read a calibration JSON file: returns the Calibration and the whole document (with measurements)."""
    try:
        doc = json.loads(Path(path).read_text())
    except OSError as e:
        raise PlanError(f"{path}: cannot read calibration file ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise PlanError(f"{path}: calibration file is not valid JSON ({e}); re-run `thunderops calibrate`") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("calibration"), dict):
        raise PlanError(f"{path}: expected an object with a 'calibration' key; re-run `thunderops calibrate`")
    return Calibration.from_dict(doc["calibration"]), doc


@cache
def default_calibration(gpu_name: str) -> Calibration:
    """The shipped calibration for a GPU type (`catalogs/calibration/<GPU>.json`), else datasheet defaults."""
    d = calibration_dir()
    if d.is_dir():
        for p in sorted(d.glob("*.json")):
            if norm(p.stem) == norm(gpu_name):
                return load_calibration_file(p)[0]
    return Calibration(gpu=gpu_name)


# ---------------------------------------------------------------------------------------------- operator costs


@dataclass(frozen=True)
class Op:
    """One operator: FLOPs, bytes moved to/from HBM, and which efficiency applies ('gemm', 'attn', 'mem',
    'elem'); `rows` is the GEMM M dimension or, for attention, the mean prompt length."""

    name: str
    flops: float
    bytes: float
    kind: str
    rows: float = 0.0


def layer_ops(
    m: ModelSpec,
    tp: int,
    tokens: float,
    attn_pairs: float = 0.0,
    kv_read_tokens: float = 0.0,
    attn_query_tokens: float = 0.0,
) -> list[Op]:
    """Operators of one decoder layer on one of `tp` GPUs.

    tokens: rows through the GEMMs (prefill tokens + decode sequences); attn_pairs: causal (query, key) pairs
    of prefill attention, sum of L(L+1)/2 over prompts; kv_read_tokens: cached tokens read by decode
    attention; attn_query_tokens: decode queries (one per sequence)."""
    d = m.dtype_bytes
    h, hd = m.hidden, m.head_dim
    q_heads = m.heads / tp
    kv_heads = max(1.0, m.kv_heads / tp)  # KV heads are replicated when tp > kv_heads
    qkv_out = (q_heads + 2 * kv_heads) * hd
    inter = m.intermediate / tp
    T = float(tokens)
    ops = [
        Op("qkv", 2 * T * h * qkv_out, d * (h * qkv_out + T * h + T * qkv_out), "gemm", T),
        Op("o_proj", 2 * T * q_heads * hd * h, d * (q_heads * hd * h + T * q_heads * hd + T * h), "gemm", T),
    ]
    if m.experts > 1:
        k, e = m.experts_per_token, m.experts
        touched = e * (1.0 - (1.0 - k / e) ** T) if T > 0 else 0.0  # expected experts hit by T tokens
        rows = T * k / max(touched, 1.0)
        ops.append(Op("router", 2 * T * h * e, d * (h * e + T * h), "gemm", T))
        ops.append(Op("experts", 2 * T * k * 3 * h * inter,
                      d * (touched * 3 * h * inter + T * k * (2 * h + 3 * inter)), "gemm", rows))
    else:
        ops.append(Op("gate_up", 2 * T * h * 2 * inter, d * (h * 2 * inter + T * h + T * 2 * inter), "gemm", T))
        ops.append(Op("down", 2 * T * inter * h, d * (inter * h + T * inter + T * h), "gemm", T))
    if attn_pairs > 0:
        # QK^T and PV over the causal half: 2 GEMMs x 2 FLOPs per MAC x pairs x head_dim per query head
        mean_len = 2 * attn_pairs / max(T, 1.0)
        ops.append(Op("attn_prefill", 4 * attn_pairs * q_heads * hd, 0.0, "attn", mean_len))
    if kv_read_tokens > 0 or attn_query_tokens > 0:
        kv_bytes = kv_read_tokens * 2 * kv_heads * hd * d
        ops.append(Op("attn_decode", 4 * kv_read_tokens * q_heads * hd,
                      kv_bytes + attn_query_tokens * 2 * q_heads * hd * d, "kv"))
    # norms, residual adds, rotary, activation and the KV-cache write: memory-bound elementwise traffic
    elem = T * (10 * h + 3 * inter + 2 * (q_heads + kv_heads) * hd + 2 * kv_heads * hd)
    ops.append(Op("elementwise", 0.0, d * elem, "elem"))
    return ops


def lm_head_ops(m: ModelSpec, tp: int, rows: float) -> list[Op]:
    """Final norm and LM head for `rows` sequences (vLLM computes logits for the last token only)."""
    d, h, v = m.dtype_bytes, m.hidden, m.vocab / tp
    return [Op("lm_head", 2 * rows * h * v, d * (h * v + rows * h) + 4 * rows * v, "gemm", rows)]


def op_time(op: Op, gpu: GpuSpec, cal: Calibration) -> float:
    """Roofline time of one operator on one GPU."""
    peak = gpu.bf16_tflops * 1e12
    if op.kind == "gemm":
        ramp = op.rows / (op.rows + cal.gemm_m_half) if op.rows > 0 else 1.0
        comp = op.flops / (peak * cal.compute_eff * max(ramp, 1e-3))
    elif op.kind == "attn":
        ramp = op.rows / (op.rows + cal.attn_len_half) if op.rows > 0 else 1.0
        comp = op.flops / (peak * cal.attn_eff * max(ramp, 1e-3))
    else:
        comp = op.flops / (peak * cal.compute_eff)
    nbytes = op.bytes * (cal.elementwise_scale if op.kind == "elem" else 1.0)
    mem = nbytes / (gpu.memory_gbps * 1e9 * (cal.kv_read_eff if op.kind == "kv" else cal.memory_eff))
    hi, lo = (comp, mem) if comp >= mem else (mem, comp)
    if lo > 0 and cal.roofline_p < 60:  # smooth roofline: both limits cost where they are close
        hi *= (1.0 + (lo / hi) ** cal.roofline_p) ** (1.0 / cal.roofline_p)
    return hi + (cal.kernel_latency_s if op.flops or op.bytes else 0.0)


def layer_compute_time(m: ModelSpec, gpu: GpuSpec, tp: int, work: Work, cal: Calibration) -> float:
    """One decoder layer on one of `tp` GPUs, without communication: what `thunderops calibrate` measures."""
    ops = layer_ops(m, tp, work.tokens, work.attn_pairs, work.kv_read_tokens, work.decode_seqs)
    return sum(op_time(op, gpu, cal) for op in ops) + cal.layer_overhead_s


def allreduce_time(nbytes: float, tp: int, link_gbps_bidir: float, cal: Calibration) -> float:
    """Ring all-reduce of `nbytes` across `tp` GPUs: 2(tp-1)/tp x bytes over one link direction, plus a fixed
    latency per call (small all-reduces are one-shot kernels in vLLM and NCCL's LL protocol)."""
    if tp <= 1 or nbytes <= 0:
        return 0.0
    bw = link_gbps_bidir / 2 * 1e9 * cal.comm_eff
    return 2 * (tp - 1) / tp * nbytes / bw + cal.comm_latency_s


def link_time(nbytes: float, gbit_s: float, latency_s: float = 20e-6) -> float:
    """Time to send `nbytes` over a network link of `gbit_s` Gbit/s."""
    if math.isinf(gbit_s):
        return 0.0
    return nbytes / (gbit_s * 1e9 / 8) + latency_s


@dataclass(frozen=True)
class Work:
    """What one engine step computes: GEMM rows, prefill attention pairs, decode KV reads, logits rows."""

    tokens: float = 0.0
    attn_pairs: float = 0.0
    kv_read_tokens: float = 0.0
    decode_seqs: float = 0.0
    logit_rows: float = 0.0

    def scaled(self, f: float) -> Work:
        return Work(self.tokens * f, self.attn_pairs * f, self.kv_read_tokens * f, self.decode_seqs * f,
                    self.logit_rows * f)


def prefill_work(prompt_lens: Sequence[int] | np.ndarray) -> Work:
    p = np.asarray(prompt_lens, dtype=float)
    return Work(tokens=float(p.sum()), attn_pairs=float((p * (p + 1) / 2).sum()), logit_rows=float(len(p)))


def decode_work(batch: float, total_context: float) -> Work:
    return Work(tokens=batch, kv_read_tokens=total_context, decode_seqs=batch, logit_rows=batch)


def usable_memory_bytes(gpu: GpuSpec) -> float:
    """Device memory the model may plan with: the datasheet figure read as decimal GB. Conservative: an H100
    80GB reports 79.2 GiB (85.0e9 B) to CUDA, but "24GB" GDDR cards such as the A10 or L4 report only
    22.5 GiB (24.1e9 B), so GB is the reading that never over-promises memory."""
    return gpu.memory_gb * 1e9


_GIB = 1024**3


def vllm_batch_defaults(gpu: GpuSpec) -> tuple[int, int]:
    """vLLM 0.33.0's default (max_num_batched_tokens, max_num_seqs) for its OpenAI API server on this GPU
    (`vllm.engine.arg_utils.EngineArgs.get_batch_defaults`): device memory >= 160 GiB: 16384 / 1024; >= 70 GiB
    and not an A100 (by name; more tokens per step cost A100s throughput, vLLM PR #17885): 8192 / 1024; else
    2048 / 256. vLLM compares what CUDA reports; we read the datasheet's memory_gb as decimal GB (as
    usable_memory_bytes does), which never exceeds what CUDA reports for HBM parts (an H100 "80GB" reports
    79.2 GiB, we read 74.5; H200 139.8 vs 131.3; B200 ~178 vs 167.6) and matches GDDR parts (an L4 "24GB"
    reports 22.5 GiB), so every catalog GPU lands in vLLM's tier. (vLLM also keeps the GB10 on the small tier;
    it is not in our catalog.)"""
    mem = gpu.memory_gb * 1e9
    if mem >= 160 * _GIB:
        return 16384, 1024
    if mem >= 70 * _GIB and "a100" not in norm(gpu.name):
        return 8192, 1024
    return 2048, 256


# ---------------------------------------------------------------------------------------------- the model


@dataclass
class _Stats:
    """Workload statistics the capacity formulas need (from the length quantiles)."""

    mean_prompt: float
    mean_output: float
    prompt_grid: np.ndarray = field(repr=False)
    output_grid: np.ndarray = field(repr=False)


class PerfModel:
    """Step times, memory and capacities of one model on any layout of GPUs.

    `calibration` maps GPU names to Calibration; missing GPUs fall back to the shipped calibration file or
    datasheet defaults. `mem_util` is vLLM's --gpu-memory-utilization; `max_batch_tokens` and `max_num_seqs`
    are vLLM's --max-num-batched-tokens (tokens per step) and --max-num-seqs (sequences per batch): None means
    vLLM's default for the replica's GPUs (see `batch_limits`), an int overrides it on every GPU."""

    def __init__(
        self,
        model: ModelSpec | str,
        calibration: dict[str, Calibration] | None = None,
        mem_util: float = 0.9,
        max_batch_tokens: int | None = None,
        max_num_seqs: int | None = None,
        min_kv_tokens: int = 2048,
    ) -> None:
        self.model = get_model(model)
        if not 0 < mem_util <= 1:
            raise PlanError(f"memory utilization must be in (0, 1], got {mem_util}")
        for name, v in (("max_batch_tokens", max_batch_tokens), ("max_num_seqs", max_num_seqs)):
            if v is not None and (not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1):
                raise PlanError(f"{name} must be a positive integer or None (vLLM's default), got {v!r}")
        if max_batch_tokens is not None and max_num_seqs is not None and max_batch_tokens < max_num_seqs:
            raise PlanError(f"max_batch_tokens ({max_batch_tokens}) must be at least max_num_seqs ({max_num_seqs}): "
                            "vLLM refuses an engine whose token budget cannot hold one token per sequence")
        self.mem_util = mem_util
        self.max_batch_tokens = max_batch_tokens
        self.max_num_seqs = max_num_seqs
        self.min_kv_tokens = min_kv_tokens
        self._cal = {norm(k): v for k, v in (calibration or {}).items()}
        self._cap_cache: dict = {}
        self._service_cache: dict = {}
        self._layer_cache: dict = {}
        self._cal_of: dict[str, Calibration] = {}  # by GPU name, as looked up
        self._stats_cache: dict = {}
        self._limits_cache: dict = {}

    # -- calibration and checks

    def calibration_for(self, gpu: GpuSpec) -> Calibration:
        cal = self._cal_of.get(gpu.name)
        if cal is None:
            cal = self._cal_of[gpu.name] = self._cal.get(norm(gpu.name)) or default_calibration(gpu.name)
        return cal

    def check_tp(self, tp: int) -> None:
        m = self.model
        if tp < 1 or m.heads % tp:
            raise ParallelismError(
                f"TP degree {tp} does not divide {m.name}'s {m.heads} attention heads; "
                f"use one of {[t for t in (1, 2, 4, 8, 16) if m.heads % t == 0]}")

    def check_layout(self, layout: Layout) -> None:
        if not layout.stages:
            raise ParallelismError("a layout needs at least one pipeline stage")
        for s in layout.stages:
            self.check_tp(s.tp)
            if s.layers < 1:
                raise ParallelismError(f"every pipeline stage needs at least one layer, got {s.layers}")
        if layout.layers != self.model.layers:
            raise ParallelismError(
                f"layer split {[s.layers for s in layout.stages]} sums to {layout.layers}, "
                f"but {self.model.name} has {self.model.layers} layers")

    # -- engine batch limits

    def batch_limits(self, gpus: Layout | Sequence[GpuSpec | str] | GpuSpec | str) -> tuple[int, int]:
        """(max_num_batched_tokens, max_num_seqs) of one engine running on `gpus` (a Layout or its GPUs):
        the explicit values given to the model, else vLLM's defaults (`vllm_batch_defaults`) of the group's
        smallest tier, i.e. its smallest-memory GPU with A100s counted small. Engine commands pass these to
        every stage, so all stages agree and the smallest GPU (the tightest on activation memory) decides.
        A defaulted value is kept consistent with an explicit other one (tokens >= seqs, as vLLM requires)."""
        if isinstance(gpus, Layout):
            specs: tuple[GpuSpec, ...] = tuple(s.gpu for s in gpus.stages)
        elif isinstance(gpus, (GpuSpec, str)):
            specs = (get_gpu(gpus),)
        else:
            specs = tuple(get_gpu(g) for g in gpus)
        key = specs
        hit = self._limits_cache.get(key)
        if hit is not None:
            return hit
        if not specs:
            raise PlanError("batch limits need at least one GPU")
        tokens, seqs = min(vllm_batch_defaults(g) for g in specs)  # tiers order both values alike
        if self.max_batch_tokens is not None:
            tokens = self.max_batch_tokens
            seqs = self.max_num_seqs if self.max_num_seqs is not None else min(seqs, tokens)
        elif self.max_num_seqs is not None:
            seqs = self.max_num_seqs
            tokens = max(tokens, seqs)
        self._limits_cache[key] = (tokens, seqs)
        return tokens, seqs

    # -- memory

    def stage_weight_bytes(self, layout: Layout, i: int) -> float:
        """Weight bytes on one GPU of stage i (embedding on the first stage, LM head on the last)."""
        m, s = self.model, layout.stages[i]
        w = s.layers * m.params_per_layer * m.dtype_bytes
        emb = m.vocab * m.hidden * m.dtype_bytes
        if i == 0:
            w += emb
        if i == len(layout.stages) - 1:
            w += emb + m.hidden * m.dtype_bytes
        return w / s.tp

    def activation_reserve_bytes(self, tp: int, gpus: Layout | Sequence[GpuSpec | str] | GpuSpec | str) -> float:
        """Peak activations of a profiling forward pass at the token budget of an engine on `gpus` (vLLM
        profiles one; see `batch_limits`), logits of its sequence budget in fp32, and a fixed 1.5 GB for CUDA
        context, graphs and NCCL buffers, on one of `tp` GPUs."""
        m = self.model
        T, seqs = self.batch_limits(gpus)
        act = T * (4 * m.hidden + 3 * m.intermediate * max(1, m.experts_per_token) / tp) * m.dtype_bytes
        logits = seqs * m.vocab / tp * 4
        return act + logits + 1.5e9

    def kv_bytes_per_token_stage(self, layout: Layout, i: int) -> float:
        m, s = self.model, layout.stages[i]
        kv_heads = max(1.0, m.kv_heads / s.tp)
        return s.layers * 2 * kv_heads * m.head_dim * m.dtype_bytes

    def kv_capacity_tokens(self, layout: Layout) -> int:
        """Tokens of KV cache the replica holds: min over stages of free memory / KV bytes per token on a GPU
        (vLLM: (total x util - weights - peak activations) / (KV bytes per token per GPU)). 0 if none."""
        self.check_layout(layout)
        cap = math.inf
        for i, s in enumerate(layout.stages):
            free = usable_memory_bytes(s.gpu) * self.mem_util - self.stage_weight_bytes(layout, i) \
                - self.activation_reserve_bytes(s.tp, layout)
            cap = min(cap, max(0.0, free) / self.kv_bytes_per_token_stage(layout, i))
        return int(cap)

    def fits(self, layout: Layout) -> bool:
        """Weights, activations and at least `min_kv_tokens` of KV fit on every stage."""
        try:
            return self.kv_capacity_tokens(layout) >= self.min_kv_tokens
        except ParallelismError:
            return False

    def require_fit(self, layout: Layout, what: str = "layout") -> None:
        self.check_layout(layout)
        if not self.fits(layout):
            desc = " + ".join(f"{s.tp}x{s.gpu.name}[{s.layers}L]" for s in layout.stages)
            raise DoesNotFitError(
                f"{what} {desc} cannot hold {self.model.name} ({self.model.weight_bytes / 1e9:.0f} GB of weights) "
                f"plus {self.min_kv_tokens} KV tokens at memory utilization {self.mem_util}; "
                "add GPUs (higher TP or more pipeline stages) or use GPUs with more memory")

    # -- step times

    def stage_time(self, layout: Layout, i: int, work: Work) -> float:
        """Time for stage i to run its layers over `work` (compute + TP all-reduces; no overhead)."""
        s = layout.stages[i]
        link = layout.tp_link_gbps if layout.tp_link_gbps is not None else s.gpu.intra_link_gbps
        per_layer, head = self._layer_and_head_time(s.gpu, s.tp, link, work)
        return s.layers * per_layer + (head if i == len(layout.stages) - 1 else 0.0)

    def _layer_and_head_time(self, gpu: GpuSpec, tp: int, link: float, work: Work) -> tuple[float, float]:
        """One layer's time (compute + its two TP all-reduces) and the LM head's, on one of `tp` GPUs. Memoised:
        the search times the same few (GPU, TP, work) over and over, as stages of many layouts (one
        Llama-3.1-70B planning made 302,095 such calls over 6,458 distinct keys)."""
        key = (gpu, tp, link, work)
        hit = self._layer_cache.get(key)
        if hit is not None:
            return hit
        m, cal = self.model, self.calibration_for(gpu)
        per_layer = layer_compute_time(m, gpu, tp, work, cal)
        per_layer += 2 * allreduce_time(work.tokens * m.hidden * m.dtype_bytes, tp, link, cal)
        head = 0.0
        if work.logit_rows > 0:
            head = sum(op_time(op, gpu, cal) for op in lm_head_ops(m, tp, work.logit_rows))
            head += allreduce_time(work.logit_rows * m.vocab * 2, tp, link, cal) / 2  # all-gather of logits
        if len(self._layer_cache) >= LAYER_CACHE_MAX:  # decode bisections make many distinct works: stay bounded
            self._layer_cache.clear()
        self._layer_cache[key] = (per_layer, head)
        return per_layer, head

    def hop_time(self, layout: Layout, tokens: float) -> float:
        """Activation hop between two consecutive stages."""
        return link_time(tokens * self.model.hidden * self.model.dtype_bytes, layout.pp_link_gbps)

    def step_overhead(self, layout: Layout) -> float:
        return max(self.calibration_for(s.gpu).step_overhead_s for s in layout.stages)

    def pass_time(self, layout: Layout, work: Work) -> float:
        """Latency of one forward pass of `work` through all stages (no pipelining of this work)."""
        t = sum(self.stage_time(layout, i, work) for i in range(layout.pp))
        return t + (layout.pp - 1) * self.hop_time(layout, work.tokens) + self.step_overhead(layout)

    def interval_time(self, layout: Layout, work: Work) -> float:
        """Time between consecutive passes of `work` when the pipeline is full: the slowest stage sets it."""
        t = max(self.stage_time(layout, i, work) for i in range(layout.pp))
        if layout.pp > 1:
            t = max(t, self.hop_time(layout, work.tokens))
        return t + self.step_overhead(layout)

    def prefill_time(self, layout: Layout, prompt_lens: Sequence[int] | np.ndarray) -> float:
        """Latency (s) of one prefill batch of these prompts through the whole replica."""
        self.check_layout(layout)
        return self.pass_time(layout, prefill_work(prompt_lens))

    def decode_step_time(self, layout: Layout, batch: int, total_context: int) -> float:
        """Time (s) between two tokens of a sequence in a decode batch of `batch` sequences holding
        `total_context` cached tokens. With PP the batch runs as `pp` micro-batches, one per stage at a time,
        so a sequence waits `pp` slowest-stage intervals per token."""
        self.check_layout(layout)
        if batch <= 0:
            return 0.0
        pp = layout.pp
        if pp == 1:
            return self.pass_time(layout, decode_work(batch, total_context))
        micro = decode_work(batch, total_context).scaled(1.0 / pp)
        return pp * self.interval_time(layout, micro)

    def mixed_step_time(self, layout: Layout, prefill: Work, batch: float, total_context: float) -> float:
        """One chunked-prefill step (vLLM's default): decode sequences plus a chunk of prefill tokens."""
        d = decode_work(batch, total_context)
        w = Work(prefill.tokens + d.tokens, prefill.attn_pairs, d.kv_read_tokens, d.decode_seqs,
                 d.logit_rows + prefill.logit_rows)
        if layout.pp == 1:
            return self.pass_time(layout, w)
        return layout.pp * self.interval_time(layout, w.scaled(1.0 / layout.pp))

    def kv_transfer_time(self, prompt_tokens: int, gbps: float, compression: float = 1.0) -> float:
        """Time to move one request's KV cache (all layers) over a `gbps` Gbit/s link; `compression` is the
        ratio of sent to raw bytes (0.25 for 4-bit)."""
        if gbps <= 0:
            raise PlanError(f"link bandwidth must be positive Gbit/s, got {gbps}")
        if not 0 < compression <= 1:
            raise PlanError(f"KV compression ratio must be in (0, 1], got {compression}")
        nbytes = prompt_tokens * self.model.kv_bytes_per_token * compression
        return link_time(nbytes, gbps)

    # -- layer split

    def split_layers(self, stages: list[tuple[GpuSpec, int]], phase: str = "colocated",
                     pp_link_gbps: float = float("inf")) -> Layout | None:
        """Layers over pipeline stages [(gpu, tp), ...] in proportion to stage speed, within each stage's
        memory: greedy assignment of each layer to the stage whose finish time grows least (optimal for
        identical layers with linear costs). None if the model does not fit."""
        if phase not in PHASES:
            raise PlanError(f"phase must be one of {', '.join(PHASES)}, got {phase!r}")
        if not stages:
            return None
        m = self.model
        stages = [(get_gpu(g), int(tp)) for g, tp in stages]
        for _, tp in stages:
            self.check_tp(tp)
        if len(stages) > m.layers:
            return None
        # time of one layer per stage under a representative load of the phase
        pre, dec = prefill_work([2048]), decode_work(64, 64 * 1024)
        gpus = [g for g, _ in stages]  # the engine's limits: every stage runs with the same flags
        per_layer, cap = [], []
        for idx, (gpu, tp) in enumerate(stages):
            probe = Layout((StageLayout(gpu, tp, 1),))
            t = 0.0
            if phase in ("prefill", "colocated"):
                t += self.stage_time(probe, 0, Work(pre.tokens, pre.attn_pairs))
            if phase in ("decode", "colocated"):
                t += self.stage_time(probe, 0, Work(dec.tokens, 0, dec.kv_read_tokens, dec.decode_seqs))
            per_layer.append(t)
            # most layers this stage can hold with min_kv_tokens of KV
            emb = m.vocab * m.hidden * m.dtype_bytes * ((idx == 0) + (idx == len(stages) - 1)) / tp
            free = usable_memory_bytes(gpu) * self.mem_util - self.activation_reserve_bytes(tp, gpus) - emb
            kv_layer = 2 * max(1.0, m.kv_heads / tp) * m.head_dim * m.dtype_bytes * self.min_kv_tokens
            cap.append(int(max(0.0, free) // (m.params_per_layer * m.dtype_bytes / tp + kv_layer)))
        if any(c < 1 for c in cap) or sum(cap) < m.layers:
            return None
        counts = [1] * len(stages)
        for _ in range(m.layers - len(stages)):
            best, best_t = -1, math.inf
            for j in range(len(stages)):
                if counts[j] < cap[j] and (counts[j] + 1) * per_layer[j] < best_t:
                    best, best_t = j, (counts[j] + 1) * per_layer[j]
            counts[best] += 1
        layout = Layout(tuple(StageLayout(g, tp, n) for (g, tp), n in zip(stages, counts, strict=True)),
                        pp_link_gbps=pp_link_gbps if len(stages) > 1 else float("inf"))
        return layout if self.fits(layout) else None

    # -- capacity

    def _stats(self, workload: Workload) -> _Stats:
        key = (workload.prompt_quantiles, workload.output_quantiles)
        st = self._stats_cache.get(key)
        if st is None:
            grid = np.interp((np.arange(40) + 0.5) * 2.5, np.arange(101), workload.prompt_quantiles)  # midpoints
            out = np.interp((np.arange(40) + 0.5) * 2.5, np.arange(101), workload.output_quantiles)
            st = _Stats(workload.mean_prompt, workload.mean_output, np.maximum(1.0, grid), np.maximum(1.0, out))
            self._stats_cache[key] = st
        return st

    def capacity(self, layout: Layout, phase: str, workload: Workload, slo: SLO, arrival_scv: float = 1.0,
                 kv_s_per_token: float = 0.0) -> float:
        """Requests/s one replica sustains in `phase` while meeting the SLO (0.0 when it cannot at any rate).
        `arrival_scv`: squared coefficient of variation of the gaps between the replica's arrivals (1: Poisson,
        one replica taking the whole stream; the router's round robin over k replicas spaces them: about 1/k).
        `kv_s_per_token`: seconds per prompt token that a prefill replica's KV takes to reach its decode replica
        (link and its load), added to each prompt's TTFT in proportion to its length.

        prefill: M/G/1 queue of prompts, TTFT = wait + prefill latency (+ its KV transfer) at the attainment quantile;
        decode: continuous batching, Little's law N = rate x output x TPOT, bounded by TPOT, KV and max_num_seqs;
        colocated: chunked-prefill steps carrying both, decode slowed by the prefill tokens in each step."""
        if phase not in PHASES:
            raise PlanError(f"phase must be one of {', '.join(PHASES)}, got {phase!r}")
        if phase == "decode":
            arrival_scv = 1.0  # decode capacity is Little's law on the batch: no queue of arrivals in it
        if phase != "prefill":
            kv_s_per_token = 0.0  # only a prefill replica's answer waits for its KV to reach another replica
        key = (layout, phase, workload.prompt_quantiles, workload.output_quantiles, slo, arrival_scv, kv_s_per_token)
        hit = self._cap_cache.get(key)
        if hit is not None:
            return hit
        self.check_layout(layout)
        # requests longer than the KV cache holds are never served: the deployment's one --max-model-len is at
        # most this replica's KV capacity (`serve.vllm.max_model_len`), prefill replicas' too. They count
        # against the attainment, so the rest must meet the SLO more often (none left to miss: no rate serves it).
        fits = self.fits(layout)
        unfit = workload.share_longer_than(self.kv_capacity_tokens(layout)) if fits else 0.0
        if not fits or (unfit > 0 and unfit >= 1.0 - slo.attainment):
            value = 0.0
        else:
            if unfit > 0:
                slo = replace(slo, attainment=slo.attainment / (1.0 - unfit))
            if phase == "prefill":
                value = self._prefill_capacity(layout, workload, slo, arrival_scv, kv_s_per_token)
            elif phase == "decode":
                value = self._decode_capacity(layout, workload, slo)
            else:
                value = self._colocated_capacity(layout, workload, slo, arrival_scv)
        self._cap_cache[key] = value
        return value

    def _prefill_service(self, layout: Layout, workload: Workload) -> tuple[float, float, float, np.ndarray]:
        """Per-prompt service interval mean and second moment, and latencies over the prompt grid."""
        key = (layout, workload.prompt_quantiles, workload.output_quantiles)
        hit = self._service_cache.get(key)
        if hit is None:
            works = [prefill_work([p]) for p in self._stats(workload).prompt_grid]
            interval = np.array([self.interval_time(layout, w) for w in works])
            latency = np.array([self.pass_time(layout, w) for w in works])
            latency.flags.writeable = False  # shared by every capacity of this layout
            hit = float(interval.mean()), float((interval**2).mean()), float(latency.max()), latency
            self._service_cache[key] = hit
        return hit

    def _prefill_capacity(self, layout: Layout, workload: Workload, slo: SLO, arrival_scv: float = 1.0,
                          kv_s_per_token: float = 0.0) -> float:
        es, es2, _, latency = self._prefill_service(layout, workload)
        # a prompt's first token comes once its KV has reached the decode replica: a shorter prompt's transfer is
        # shorter; prompts above the attainment quantile (the share the target lets miss) are charged its transfer
        if kv_s_per_token > 0:
            q = workload.percentile("prompt", slo.attainment * 100)
            latency = latency + kv_s_per_token * np.minimum(self._stats(workload).prompt_grid, q)
        miss = 1.0 - slo.attainment
        if float(np.mean(latency > slo.ttft_s)) > miss:
            return 0.0
        per_mate = self._batch_mate_latency(layout, workload)
        mean = self._stats(workload).mean_prompt
        room = max(0, int(self.batch_limits(layout)[0] // max(mean, 1.0)) - 1)  # mates a token budget holds

        def ok(lam: float) -> bool:
            rho = lam * es
            extra = batch_mates(rho, room) * per_mate
            return rho < 1 and mg1_miss_probability(lam, es, es2, latency + extra, slo.ttft_s, arrival_scv) <= miss

        return _max_rate(ok, 1.0 / es)

    def _batch_mate_latency(self, layout: Layout, workload: Workload) -> float:
        """What one more mean prompt in a prompt's batch adds to its latency beyond the interval the queue
        already counts. A batch leaves a `pp`-stage pipeline only after all of it has passed every stage, so a
        batch-mate costs about pp - 1 extra intervals (0 without PP)."""
        if layout.pp == 1:
            return 0.0
        mean = max(1, int(round(self._stats(workload).mean_prompt)))
        one = prefill_work([mean])
        return self.pass_time(layout, one) - self.interval_time(layout, one)

    def _decode_tpot(self, layout: Layout, n: float, ctx: float) -> float:
        return self.decode_step_time(layout, max(1, int(math.ceil(n))), int(n * ctx))

    def _decode_capacity(self, layout: Layout, workload: Workload, slo: SLO) -> float:
        st = self._stats(workload)
        ctx = st.mean_prompt + st.mean_output / 2  # mean context over a sequence's decode lifetime
        kv_seqs = self.kv_capacity_tokens(layout) / (st.mean_prompt + st.mean_output)
        n_max = min(float(self.batch_limits(layout)[1]) * layout.pp, kv_seqs)
        if n_max < 1 or self._decode_tpot(layout, 1, ctx) > slo.tpot_s:
            return 0.0
        lo, hi = 1.0, n_max
        if self._decode_tpot(layout, hi, ctx) > slo.tpot_s:
            for _ in range(30):
                mid = (lo + hi) / 2
                if self._decode_tpot(layout, mid, ctx) <= slo.tpot_s:
                    lo = mid
                else:
                    hi = mid
            n = lo
        else:
            n = hi
        return n / (st.mean_output * self._decode_tpot(layout, n, ctx))

    def _colocated_capacity(self, layout: Layout, workload: Workload, slo: SLO, arrival_scv: float = 1.0) -> float:
        """vLLM's chunked prefill: a waiting prompt rides in 'mixed' steps with the running sequences, in
        chunks of up to (budget - N) tokens; other steps are pure decode. A prompt of P tokens costs
        t_mix(P) (its mixed steps); per second that is lam*E[t_mix] of mixed time in lam*E[chunks] steps, the
        rest pure decode steps of t_d: TPOT = 1 / (m + (1 - lam*E[t_mix]) / t_d). Prompts queue as M/G/1
        with service t_mix (no coalescing of prompts into one step: conservative under load)."""
        st = self._stats(workload)
        ctx = st.mean_prompt + st.mean_output / 2
        kv_tokens = self.kv_capacity_tokens(layout)
        grid = st.prompt_grid[2::4]  # 10 prompt-length deciles
        miss = 1.0 - slo.attainment
        budget, max_seqs = self.batch_limits(layout)

        def exact(n: float) -> tuple[np.ndarray, np.ndarray]:
            room = max(1.0, budget - n)
            chunks = np.maximum(1.0, np.ceil(grid / room))
            # the average chunk: later chunks attend to the earlier ones, so the prompt's attention pairs are
            # p(p+1)/2 however it is cut (not k chunk-sized prompts' worth)
            times = np.array([k * self.mixed_step_time(layout, prefill_work([p]).scaled(1.0 / k), n, n * ctx)
                              for p, k in zip(grid, chunks, strict=True)])
            return times, chunks

        # tabulate over the decode batch once; the fixed point and the rate search then interpolate
        n_top = max(1.0, min(max_seqs * layout.pp, budget - 1.0))
        ns = np.unique(np.concatenate([[0.0], np.geomspace(1.0, n_top, 8)]))
        tab = np.array([exact(n)[0] for n in ns])
        tab_d = np.array([self._decode_tpot(layout, max(n, 1.0), ctx) for n in ns])

        def t_mix(n: float) -> tuple[np.ndarray, np.ndarray]:
            j = int(np.clip(np.searchsorted(ns, n), 1, len(ns) - 1))
            w = (n - ns[j - 1]) / (ns[j] - ns[j - 1])
            chunks = np.maximum(1.0, np.ceil(grid / max(1.0, budget - n)))
            return tab[j - 1] * (1 - w) + tab[j] * w, chunks

        def state(lam: float) -> tuple[float, np.ndarray, float, float] | None:
            """Fixed point: (mean TPOT, per-prompt mixed time over the grid, share of mixed steps, pure step)."""
            tau = self._decode_tpot(layout, 1, ctx)
            times, share, t_d = np.zeros_like(grid), 0.0, tau
            for _ in range(30):
                n = lam * st.mean_output * tau
                if n > max_seqs * layout.pp or n >= budget:
                    return None
                times, chunks = t_mix(n)
                busy = lam * float(times.mean())
                if busy >= 1:
                    return None
                t_d = float(np.interp(n, ns, tab_d))
                mixed, pure = lam * float(chunks.mean()), (1 - busy) / t_d
                new = 1.0 / (mixed + pure)
                share = mixed / (mixed + pure)
                done = abs(new - tau) < 1e-4 * tau
                tau = new
                if done:
                    break
                if tau > 10 * slo.tpot_s:
                    return None
            return tau, times, share, t_d

        def ok(lam: float) -> bool:
            r = state(lam)
            if r is None:
                return False
            tau, times, share, t_d = r
            n = lam * st.mean_output * tau
            if tau > slo.tpot_s or n * (st.mean_prompt + st.mean_output) > kv_tokens:
                return False
            es, es2 = float(times.mean()), float((times**2).mean())
            if lam * es >= 1:
                return False
            # a request's TPOT averages its own steps: the prompts that arrive while it decodes each add their
            # mixed steps' extra time over pure steps; few output tokens and a long prompt among them miss
            extra = np.maximum(times - np.ceil(grid / max(1.0, budget - n)) * t_d, 0.0)
            tpot_miss = tpot_miss_probability(st.output_grid[::2] - 1, lam, t_d, extra, slo.tpot_s, arrival_scv)
            return mg1_miss_probability(lam, es, es2, times, slo.ttft_s, arrival_scv) + tpot_miss <= miss

        # ceiling: prompts alone keep the replica busy (their mixed steps at an empty batch; a pipeline works on
        # pp microbatches at once, so this is about one stage's share, not the whole pass)
        return _max_rate(ok, 1.0 / max(float(tab[0].mean()), 1e-9))


_CRN = np.random.default_rng(20261125)  # common random numbers: the same draws for every rate (monotone search)
_SAMPLES, _KMAX = 256, 40
_U_BUSY = _CRN.random(_SAMPLES)
_E_WAIT = _CRN.exponential(1.0, _SAMPLES)
_U_COUNT = _CRN.random(_SAMPLES)
_U_PICK = _CRN.random((_SAMPLES, _KMAX))
_Z = _CRN.standard_normal(_SAMPLES)
# Calibrated on the simulator (bench/bench_capacity.py grid): the simulator coalesces queued prompts into shared
# chunked-prefill steps, so the backlog a request starts behind is about half the per-prompt M/G/1 figure.
_BACKLOG_SCALE = 0.5


def tpot_miss_probability(steps: np.ndarray, lam: float, t_pure: float, extra: np.ndarray, target: float,
                          arrival_scv: float = 1.0) -> float:
    """Share of colocated (chunked-prefill) requests whose own TPOT, the mean of their `steps` decode steps,
    exceeds `target`.

    Pure decode steps take `t_pure`; each prompt processed while a request decodes adds `extra` seconds (its
    mixed steps' time over pure ones; prompts sampled from the grid). A request starts behind the prompts
    already queued (M/G/1 backlog of that extra work: busy with probability rho = lam x E[extra], then
    exponential with the Pollaczek-Khinchine mean), and the prompts arriving during its window (Poisson, rate
    `lam`, window lengthened by their own work: / (1 - rho)) add theirs: a compound Poisson sum, drawn with
    fixed random numbers (exact counts up to 40 prompts, a normal approximation beyond). Requests that start in
    a busy period see mostly mixed steps: a step-averaged TPOT misses this. With `arrival_scv` < 1 (the router
    spaces the replica's arrivals) the backlog takes Kingman's correction and the count keeps its mean while
    its spread shrinks to that share (variance mu x arrival_scv): fewer prompts bunch up in one request's
    window. Eight colocated Llama-3.1-70B H200 replicas, `coding` at 2 s / 100 ms: 30.6 req/s with Poisson
    counts, 35.1 spaced, 40.9 simulated; `conversation` moves under 1 %."""
    steps = np.maximum(np.rint(np.asarray(steps, dtype=float)), 0.0)
    extra = np.asarray(extra, dtype=float)
    if t_pure > target:
        return 1.0
    m1, m2 = float(extra.mean()), float((extra**2).mean())
    rho = lam * m1
    if rho >= 1:
        return 1.0
    if lam <= 0 or m1 <= 0:
        return 0.0
    backlog = np.where(_U_BUSY < rho, _E_WAIT * _BACKLOG_SCALE * lam * m2 / (2 * (1 - rho)) / rho
                       * arrival_scv_factor(arrival_scv, m1, m2), 0.0)
    slack = steps[:, None] * (target - t_pure) - backlog[None, :]  # (k, samples): what new arrivals may add
    mu = np.maximum(lam * (steps[:, None] * t_pure + backlog[None, :]) / (1 - rho), 1e-300)
    # Poisson counts by inverse CDF, term by term (stops once every draw is placed; spacing shrinks them below)
    big = mu > _KMAX / 2  # many prompts: a normal approximation instead
    u = np.broadcast_to(_U_COUNT[None, :], mu.shape)
    term = np.exp(-np.where(big, 0.0, mu))
    cdf = term.copy()
    counts = (u > cdf).astype(np.int64)
    for j in range(1, _KMAX):
        if not counts.any() or not (counts == j).any():
            break
        term *= np.where(big, 0.0, mu) / j
        cdf += term
        counts += u > cdf
    if arrival_scv < 1:  # spaced arrivals: the count keeps its mean, its spread shrinks to arrival_scv's share
        counts = np.clip(np.rint(mu + np.sqrt(arrival_scv) * (counts - mu)), 0, _KMAX).astype(np.int64)
    sums = np.concatenate([np.zeros((_SAMPLES, 1)),
                           np.cumsum(extra[(_U_PICK * len(extra)).astype(np.int64)], axis=1)], axis=1)
    x = np.take_along_axis(sums, counts.T, axis=1).T
    # compound sum: variance E[N] Var(extra) + Var(N) E[extra]^2, Var(N) = mu x arrival_scv
    x = np.where(big, mu * m1 + np.sqrt(mu * (m2 - m1 * m1 * (1 - min(arrival_scv, 1.0)))) * _Z[None, :], x)
    miss = np.where(steps >= 1, (x > slack).mean(axis=1), 0.0)
    return float(miss.mean())


def batch_mates(rho: float, room: int) -> float:
    """Mean number of other prompts in a prompt's prefill batch at utilisation `rho`: the prompts queued with
    it, taken as an M/M/1 queue's length (P(L >= k) = rho^k), truncated at the `room` the token budget leaves:
    sum of rho^k for k = 1..room. Without the truncation (rho / (1 - rho)) a relaxed TTFT, where replicas run
    near saturation, was rated 0.7x of the simulator; with rho alone a tight one 1.6x over it."""
    if rho <= 0 or room <= 0:
        return 0.0
    if rho >= 1:
        return float(room)
    return rho * (1 - rho**room) / (1 - rho)


def arrival_scv_factor(arrival_scv: float, es: float, es2: float) -> float:
    """Kingman's G/G/1 correction to an M/G/1 mean wait: (ca^2 + cs^2) / (1 + cs^2), ca^2 the arrival gaps'
    squared coefficient of variation (1: Poisson), cs^2 the service times'."""
    if arrival_scv >= 1 or es <= 0:
        return 1.0
    cs2 = max(es2 / (es * es) - 1.0, 0.0)
    return (arrival_scv + cs2) / (1.0 + cs2)


def mg1_miss_probability(lam: float, es: float, es2: float, latency: np.ndarray, target: float,
                         arrival_scv: float = 1.0) -> float:
    """P(wait + latency > target) in an M/G/1 queue, the wait taken as 0 with probability 1 - rho and else
    exponential with the Pollaczek-Khinchine mean; `latency` samples the requests' own service latencies.
    With `arrival_scv` < 1 (arrivals spaced more evenly than Poisson, as the router's round robin spaces them
    at each of several replicas) the mean wait takes Kingman's G/G/1 correction."""
    rho = lam * es
    if rho >= 1:
        return 1.0
    if rho <= 0:
        return float(np.mean(latency > target))
    cond_mean = lam * es2 / (2 * (1 - rho)) / rho * arrival_scv_factor(arrival_scv, es, es2)
    slack = target - latency
    p = np.where(slack < 0, 1.0, rho * np.exp(-np.maximum(slack, 0.0) / cond_mean))
    return float(p.mean())


def _max_rate(ok, hi: float) -> float:
    """Largest rate in (0, hi) for which ok(rate) holds, by bisection (ok is monotone: true then false)."""
    if not ok(hi * 1e-4):
        return 0.0
    lo = hi * 1e-4
    for _ in range(40):
        mid = (lo + hi) / 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
        if hi - lo < 3e-3 * lo:
            break
    return lo


# ---------------------------------------------------------------------------------------------- plans


def pair_gbps(plan: Plan, a: str, b: str) -> float:
    """Network bandwidth (Gbit/s) between two instances of a plan: measured/plan figure, else the slower
    NIC of the two, else DEFAULT_NETWORK_GBPS; inf on the same instance (NVLink/PCIe handled by the GPU)."""
    if a == b:
        return SAME_NODE_PP_GBPS
    bw = plan.bandwidth_gbps.get(a, {}).get(b) or plan.bandwidth_gbps.get(b, {}).get(a)
    if bw:
        return float(bw)
    nics = []
    for i in (a, b):
        try:
            nics.append(plan.instance(i).network_gbps)
        except KeyError:
            pass
    nics = [n for n in nics if n]
    return float(min(nics)) if nics else DEFAULT_NETWORK_GBPS


def shared_nic_gbps(own: float | None, links: Iterable[float], unknown: float) -> float:
    """The rule for a node's network (Gbit/s each way), which all its links to other nodes share: its NIC figure
    (`unknown` where none is given), raised to its fastest link to another node (a measured link cannot beat
    the NIC it crosses). The scheduler (`Topology.nic_gbps`) and the simulator (`nic_gbps`) both apply it."""
    return max(own or unknown, *links)


def nic_gbps(plan: Plan, inst: str) -> float:
    """An instance's shared network (`shared_nic_gbps`) from the plan. No default for a NIC the plan does not
    give: its links' figures (the scheduler's matrix, defaults included) already stand for it."""
    own = next((i.network_gbps for i in plan.instances if i.id == inst), None)
    return shared_nic_gbps(own, (pair_gbps(plan, inst, other.id) for other in plan.instances if other.id != inst),
                           unknown=0.0)


def layout_of(plan: Plan, group: Group, model: PerfModel | None = None) -> Layout:
    """The Layout of one plan group (links from plan.bandwidth_gbps or the instances' network_gbps)."""
    if not group.stages:
        raise ParallelismError(f"group {group.id} has no pipeline stages")
    stages = tuple(StageLayout(get_gpu(s.gpu), int(s.tp), int(s.layers)) for s in group.stages)
    links = [pair_gbps(plan, a.instance, b.instance) for a, b in zip(group.stages, group.stages[1:], strict=False)]
    layout = Layout(stages, pp_link_gbps=min(links) if links else float("inf"))
    if model is not None:
        model.check_layout(layout)
    return layout


__all__ = [
    "Calibration", "DoesNotFitError", "Layout", "ParallelismError", "PerfModel", "StageLayout", "Work",
    "layout_of", "layer_ops", "lm_head_ops", "prefill_work", "decode_work", "mg1_miss_probability",
]
