"""How cost is split between prompt and output tokens.

A node's cost follows its GPUs. GPUs in a prefill group are prompt cost, GPUs in a decode group are output cost; a
colocated group does both, and its cost is split by GPU time per request from the performance model: a request
takes 1/C_prefill of the group's time to prefill and 1/C_decode to decode (C: the group's capacity in requests/s,
at the plan's SLO, serving one phase alone). A node whose plan instance the latest plan no longer has (a lost node)
is split as in the newest plan version that had it; a node in no plan version is split like the whole latest plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from thunderops.errors import UserError
from thunderops.plan import SLO, Plan


@dataclass
class Attribution:
    """Prompt share of each plan group's and instance's GPU time (the rest is output), from one plan."""

    version: int
    group_share: dict[str, float]
    instance_phases: dict[str, dict[str, tuple[int, float]]]  # plan instance -> phase -> (GPUs, prompt share)
    plan_share: float
    note: str

    def split(self, instance_id: str, gpus: int) -> dict[str, tuple[int, float]]:
        """phase -> (GPUs, prompt share) of a node of this plan instance; not in the plan: the plan's share."""
        return self.instance_phases.get(instance_id) or {f"not in plan v{self.version}": (max(gpus, 1), self.plan_share)}


def attribution(plan: Plan, older: list[Plan] | None = None) -> Attribution:
    """Prompt shares from `plan`; an instance it no longer has (a lost node) takes its split from the newest of
    the `older` plan versions that had it."""
    note = ("prompt/output cost split: prefill GPUs -> prompt, decode GPUs -> output, colocated GPUs by the "
            f"performance model's prefill vs decode GPU time per request (plan v{plan.version}"
            + (", earlier versions for nodes no longer in it)" if older else ")"))
    cache: dict[Any, float] = {}
    phases, shares, problems = _plan_split(plan, cache)
    total = sum(n for p in phases.values() for n, _ in p.values())
    plan_share = sum(n * w for p in phases.values() for n, w in p.values()) / total if total else 0.5
    for old in sorted(older or [], key=lambda p: -p.version):
        more, _, bad = _plan_split(old, cache)
        problems += bad
        for inst, split in more.items():
            phases.setdefault(inst, split)
    if problems:
        note += f"; colocated GPUs split 50/50 where the performance model could not price them ({problems[0]})"
    return Attribution(plan.version, shares, phases, plan_share, note)


def _plan_split(plan: Plan, cache: dict[Any, float]) -> tuple[dict[str, dict[str, tuple[int, float]]],
                                                              dict[str, float], list[str]]:
    """instance -> phase -> (GPUs, prompt share); group -> prompt share; problems met."""
    shares: dict[str, float] = {}
    problems: list[str] = []
    for g in plan.groups:
        if g.phase in ("prefill", "decode"):
            shares[g.id] = 1.0 if g.phase == "prefill" else 0.0
            continue
        try:
            shares[g.id] = _colocated_share(plan, g, cache)
        except (UserError, KeyError, TypeError, ValueError, ZeroDivisionError) as e:
            shares[g.id] = 0.5
            problems.append(str(e))
    acc: dict[str, dict[str, list[float]]] = {}  # instance -> phase -> [GPUs, prompt-weighted GPUs]
    for g in plan.groups:
        for st in g.stages:
            a = acc.setdefault(st.instance, {}).setdefault(g.phase, [0, 0.0])
            a[0] += st.tp
            a[1] += st.tp * shares[g.id]
    phases = {i: {ph: (int(n), w / n) for ph, (n, w) in p.items() if n > 0} for i, p in acc.items()}
    return phases, shares, problems


def prompt_share(split: dict[str, tuple[int, float]]) -> float:
    """The prompt share of a node's cost from its phase split (GPU-weighted)."""
    n = sum(g for g, _ in split.values())
    return sum(g * s for g, s in split.values()) / n if n else 0.5


def _colocated_share(plan: Plan, group, cache: dict[Any, Any]) -> float:
    """A colocated group's prefill share of GPU time per request: (1/C_prefill) / (1/C_prefill + 1/C_decode)."""
    from thunderops.perf import PerfModel, layout_of
    from thunderops.specs import get_model
    from thunderops.workload import get_workload

    wname = _workload_name(plan) or "conversation"
    slo = SLO(**plan.inputs["slo"]) if plan.inputs.get("slo") else SLO()
    if ("perf", plan.model) not in cache:
        cache[("perf", plan.model)] = PerfModel(get_model(plan.model))
    if ("wl", wname) not in cache:
        cache[("wl", wname)] = get_workload(wname)
    perf, wl = cache[("perf", plan.model)], cache[("wl", wname)]
    layout = layout_of(plan, group, perf)
    key = (plan.model, wname, slo, layout)
    if key not in cache:
        cp, cd = perf.capacity(layout, "prefill", wl, slo), perf.capacity(layout, "decode", wl, slo)
        cache[key] = cd / (cp + cd) if cp > 0 and cd > 0 else 0.5
    return cache[key]


def _workload_name(plan: Plan) -> str:
    """What the plan was made for: its trace file when it had one, else the preset's name."""
    return str(plan.inputs.get("workload_source") or plan.inputs.get("workload") or "")


def _workload_means(plan: Plan) -> tuple[float | None, float | None]:
    """Mean prompt and output tokens per request the plan was made for (None when its workload is gone)."""
    from thunderops.workload import get_workload

    try:
        wl = get_workload(_workload_name(plan))
        return wl.mean_prompt, wl.mean_output
    except (UserError, OSError, ValueError):
        out = plan.predicted.tokens_per_s / plan.predicted.goodput_rps if plan.predicted.goodput_rps else None
        return None, out
