"""Plan surgery: routing fallbacks, folding replacement instances back into a plan, the observed workload."""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

import numpy as np

from thunderops.plan import Group, Instance, Plan, Route, Stage

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


def _workload_dict(wl) -> dict[str, Any]:
    return {"name": wl.name, "rate": wl.rate, "prompt_quantiles": list(wl.prompt_quantiles),
            "output_quantiles": list(wl.output_quantiles), "source": wl.source}
