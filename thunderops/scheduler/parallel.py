"""Lower level, part 1: the parallel configuration of one group (one model replica).

A group is some GPUs of one or more instances. Inside an instance its GPUs run tensor-parallel stages; across
instances (and optionally inside one) the stages form a pipeline, with layers split in proportion to stage speed
within memory (`PerfModel.split_layers`). Each phase gets its own best configuration and capacity (requests/s at
the SLO). Results are memoised by group *composition* (GPU types, GPUs per instance, slowest pipeline link), so
identical groups anywhere in the search cost one evaluation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from thunderops.perf import Layout, PerfModel
from thunderops.plan import SLO
from thunderops.scheduler.topology import intra_node_gbps
from thunderops.specs import GpuSpec, get_gpu
from thunderops.workload import Workload

PHASES = ("prefill", "decode", "colocated")


@dataclass(frozen=True)
class GroupConfig:
    """Best layout of a group for one phase: `tps[i]` is the TP of the stages cut from the group's i-th
    instance (that instance contributes gpus_i / tps[i] stages)."""

    phase: str
    capacity: float  # requests/s at the SLO (0.0: does not fit or cannot meet the SLO)
    layout: Layout | None
    tps: tuple[int, ...]  # one TP for all instances: vLLM runs every pipeline stage at the same TP


def engine_can_serve(stages: int, phase: str) -> bool:
    """Whether a vLLM engine of `stages` pipeline stages can be a replica of `phase`: vLLM's KV connectors
    receive KV into one pipeline stage only (NIXL in either mode refuses a decode engine with
    --pipeline-parallel-size > 1), so a decode replica is one TP stage; prefill and colocated may pipeline
    (a prefill pipeline sends with NIXL's push mode, `serve.vllm.connectors`)."""
    return phase != "decode" or stages == 1


def valid_tps(model_heads: int, max_tp: int) -> list[int]:
    """TP degrees a vLLM engine accepts for this model (they must divide the attention heads)."""
    return [t for t in range(1, max_tp + 1) if model_heads % t == 0 and (t & (t - 1)) == 0]


class ParallelPlanner:
    """Per-phase best configuration of groups, memoised by composition."""

    def __init__(self, perf: PerfModel, workload: Workload, slo: SLO, max_combos: int = 4,
                 kv_ttft_share: float = 0.0) -> None:
        self.perf, self.workload, self.slo = perf, workload, slo
        # prefill replicas leave this share of the TTFT target to the KV transfer that follows them
        self.prefill_slo = SLO(slo.ttft_s * (1 - kv_ttft_share), slo.tpot_s, slo.attainment)
        self.max_combos = max_combos
        self._memo: dict[tuple, dict[str, GroupConfig]] = {}
        self.evaluations = 0

    def group_tps(self, counts: tuple[int, ...]) -> list[int]:
        """TP choices for a whole group whose instances contribute `counts` GPUs, widest first: vLLM needs one
        TP degree in every pipeline stage, so a TP must divide every instance's share (and the heads). Narrower
        TP means more pipeline stages, which serves prefill best (no all-reduce); wider TP serves latency-bound
        decode best."""
        opts = [t for t in valid_tps(self.perf.model.heads, min(counts)) if all(n % t == 0 for n in counts)]
        return sorted(opts, reverse=True)

    def configs(self, parts: tuple[tuple[str, int], ...], pp_link_gbps: float) -> PhaseConfigs:
        """parts: (GPU name, GPUs) per instance, in pipeline order; pp_link_gbps: slowest link between them.
        Returns a lazy phase -> GroupConfig mapping (a phase is costed on first use)."""
        key = (parts, round(pp_link_gbps, 3) if math.isfinite(pp_link_gbps) else pp_link_gbps)
        hit = self._memo.get(key)
        if hit is None:
            hit = self._memo[key] = PhaseConfigs(self, parts, pp_link_gbps)
        return hit

    def known(self, parts: tuple[tuple[str, int], ...], pp_link_gbps: float, phase: str) -> bool:
        """Whether this composition's phase is already costed (no perf-model call needed)."""
        key = (parts, round(pp_link_gbps, 3) if math.isfinite(pp_link_gbps) else pp_link_gbps)
        hit = self._memo.get(key)
        return hit is not None and dict.__contains__(hit, phase)

    def best(self, parts: tuple[tuple[str, int], ...], pp_link_gbps: float, phase: str) -> GroupConfig:
        self.evaluations += 1
        specs: list[GpuSpec] = [get_gpu(g) for g, _ in parts]
        combos = [(t,) * len(parts) for t in self.group_tps(tuple(n for _, n in parts))]
        best = GroupConfig(phase, 0.0, None, ())
        slo = self.prefill_slo if phase == "prefill" else self.slo
        # stages inside one instance hop over its GPU link; across instances over the network
        link = pp_link_gbps if len(parts) > 1 else min(intra_node_gbps(s) for s in specs)
        for tps in combos[:self.max_combos]:
            stages = [(spec, t) for spec, (_, n), t in zip(specs, parts, tps, strict=True) for _ in range(n // t)]
            if len(stages) > self.perf.model.layers or not engine_can_serve(len(stages), phase):
                continue
            layout = self.perf.split_layers(stages, phase, link)
            if layout is None:
                continue
            cap = self.perf.capacity(layout, phase, self.workload, slo)
            if cap > best.capacity:
                best = GroupConfig(phase, cap, layout, tuple(tps))
        return best


class PhaseConfigs(dict):
    """phase -> GroupConfig, computed on first access."""

    def __init__(self, planner: ParallelPlanner, parts: tuple, link: float) -> None:
        super().__init__()
        self._args = (planner, parts, link)

    def __missing__(self, phase: str) -> GroupConfig:
        planner, parts, link = self._args
        cfg = self[phase] = planner.best(parts, link, phase)
        return cfg

    def values(self):  # every phase, costing the missing ones
        return [self[ph] for ph in PHASES]

    def items(self):
        return [(ph, self[ph]) for ph in PHASES]
