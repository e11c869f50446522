"""The scheduler: which instances to rent under a $/h budget (or which of your own GPUs to use), how they form
model replicas, each replica's phase and parallelism, and the routing between prefill and decode replicas.

`plan(...)` is the entry point (also `thunderops.plan`). `solve(...)` returns our plan with the baselines'.
Modules: procure (offers -> pool), inventory (your GPUs), topology (links), parallel (per-group layouts),
route (the routing LP), harness (shared evaluation), search (tabu), baselines, reschedule.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

import pandas as pd

from thunderops.errors import PlanError
from thunderops.perf import PerfModel
from thunderops.plan import SLO, Plan
from thunderops.scheduler.baselines import BASELINES, HEXGEN_ELITES, all_baselines
from thunderops.scheduler.check import FinalCheck, serves_rate, sim_key
from thunderops.scheduler.harness import Harness
from thunderops.scheduler.inventory import Inventory, load_inventory
from thunderops.scheduler.procure import (
    MAX_REPLICA_NODES,
    NO_NODE_LIMIT,
    budget_for_rate,
    build_pool,
    check_budget,
)
from thunderops.scheduler.search import SearchConfig, Tabu, designate, greedy_groups
from thunderops.scheduler.topology import Topology, check_bandwidth_names, load_bandwidth
from thunderops.sim import SimDeadline
from thunderops.specs import get_gpu, get_model
from thunderops.workload import Workload, get_workload

__all__ = ["plan", "solve", "replan", "without_offers", "PlanResult", "SearchConfig", "BASELINES"]

# The time limit covers the simulator check. The baselines' plans are simulated first; if that has not ended
# within this share of the limit, nothing is simulated (the search needs the rest) and every plan keeps the
# perf model's figures. Our finalists' simulations get the time the search left for them (measured on the
# baselines') and may run this share past the limit before they too are abandoned for the model's figures.
CHECK_SHARE = 0.75
CHECK_GRACE = 0.25
# vLLM's and DistServe's scans over GPU kinds try no further kind past this share of the limit (HexGen's search
# has a fifth of it): with the defaults it never binds, at a few seconds it keeps the comparison within them.
BASELINE_SHARE = 0.3


@dataclass
class PlanResult:
    plan: Plan
    baselines: dict[str, Plan] = field(default_factory=dict)
    seconds: float = 0.0
    evaluations: int = 0
    harness: Harness | None = field(default=None, repr=False)


def make_slo(slo: SLO | None, slo_ttft: float | None, slo_tpot: float | None, attainment: float | None) -> SLO:
    base = slo or SLO()
    return SLO(slo_ttft if slo_ttft is not None else base.ttft_s,
               slo_tpot if slo_tpot is not None else base.tpot_s,
               attainment if attainment is not None else base.attainment)


def solve(
    budget: float | None = None,
    model: str = "llama-30b",
    workload: str | Workload = "conversation",
    *,
    rate: float | None = None,
    slo: SLO | None = None,
    slo_ttft: float | None = None,
    slo_tpot: float | None = None,
    attainment: float | None = None,
    clouds: str | list[str] | None = None,
    regions: str | list[str] | None = None,
    spot: bool | None = None,
    inventory: str | Path | Inventory | None = None,
    bandwidth: str | Path | dict | None = None,
    offers: str | Path | pd.DataFrame | None = None,
    seed: int = 0,
    time_limit: float = 60.0,
    search: SearchConfig | None = None,
    perf: PerfModel | None = None,
    progress: Callable[[float, str], None] | None = None,
    sim_check: int = 3,
    sim_requests: int = 600,
    max_replica_nodes: int | None = MAX_REPLICA_NODES,
) -> PlanResult:
    """Plan a deployment and the baselines in the same harness. See `plan` for the arguments."""
    t0 = time.perf_counter()
    given_budget = budget
    spec = get_model(model)
    perf = perf or PerfModel(spec)
    wl = get_workload(workload) if isinstance(workload, str) else workload
    if rate is not None:
        wl = wl.with_rate(rate)
    slo = make_slo(slo, slo_ttft, slo_tpot, attainment)
    if not (math.isfinite(time_limit) and time_limit > 0):
        raise PlanError(f"time limit must be a positive number of seconds, got {time_limit:g} (--time-limit 60)")
    if budget is not None and not (math.isfinite(budget) and budget > 0):  # inf would rent without end
        raise PlanError(f"budget must be a positive, finite $/h figure, got {budget:g} (--budget 25)")
    overrides: dict = {}
    not_servable: dict[str, str] = {}  # GPU types left out of the offers: the engines cannot run there
    if inventory is not None:
        inv = inventory if isinstance(inventory, Inventory) else load_inventory(inventory)
        pool, overrides = list(inv.instances), dict(inv.links)
        # your own GPUs are used as given; the plan says where vLLM's pip wheels will not run
        not_servable = gpu_problems({i.gpu for i in pool})
    else:
        if budget is None and rate is None:
            raise PlanError("give a budget in $/h (--budget 13.54), a target --rate in req/s, or an --inventory "
                            "of GPUs you already have")
        if isinstance(offers, pd.DataFrame):
            table = offers
        else:
            from thunderops.catalog import load_offers

            table = load_offers(offers, clouds=clouds, regions=regions, spot=True if spot else None)
        table, not_servable = servable_offers(table)
        nodes = max_replica_nodes or NO_NODE_LIMIT
        if budget is None:  # a rate alone: the search's ceiling is RATE_HEADROOM x one offer kind's cost for it
            check_budget(table, perf, math.inf, spot, nodes)  # the model fits some offer
            budget = round(budget_for_rate(table, perf, wl, slo, rate, spot, nodes), 2)
        else:
            check_budget(table, perf, budget, spot, nodes)
        pool = build_pool(table, perf, budget, spot, max_nodes_per_replica=nodes)
    if bandwidth is not None:
        if isinstance(bandwidth, dict):  # a measured matrix (it may name nodes lost since)
            overrides.update(bandwidth)
        else:  # a file the user wrote: a name that matches nothing is a typo
            given = load_bandwidth(bandwidth)
            check_bandwidth_names(given, pool, bandwidth)
            overrides.update(given)
    h = Harness(pool, perf, wl, slo, Topology(overrides), budget=budget, rate=rate,
                max_replica_nodes=max_replica_nodes)
    cfg = search or SearchConfig(time_limit=time_limit)
    if inventory is not None:
        everything_units = tuple(u for us in h.units_of for u in us)
        if not h.holds(everything_units) and not any(h.holds(tuple(us)) for us in h.units_of):
            mem = sum(get_gpu(i.gpu).memory_gb * i.gpus for i in pool)
            raise PlanError(f"{spec.name} ({spec.weight_bytes / 1e9:.0f} GB of weights) does not fit in the "
                            f"inventory's {sum(i.gpus for i in pool)} GPUs ({mem:.0f} GB in all, with KV room); "
                            "add GPUs or pick a smaller model")
    if inventory is not None and budget is not None:
        cheapest = min(i.price_per_hour for i in pool)
        if cheapest > budget:
            raise PlanError(f"budget {budget:g} $/h is below the cheapest inventory node ({cheapest:g} $/h)")

    if max_replica_nodes is not None and pool and all(h.instances_per_replica(k) is None for k in range(len(pool))):
        raise PlanError(f"one replica of {spec.name} needs more than --max-replica-nodes {max_replica_nodes} of "
                        "these instances; raise it or use GPUs with more memory")
    base, cut = all_baselines(h, seed, SearchConfig(max_iters=min(40, cfg.max_iters), patience=10,
                                                    time_limit=cfg.time_limit / 5),
                              deadline=t0 + BASELINE_SHARE * cfg.time_limit)
    hexgen_runners = HEXGEN_ELITES.pop(id(h), [])
    starts = list(base.values())
    if inventory is not None:  # everything you own, bandwidth-aware groups, best phase cut
        everything = [designate(h, greedy_groups(h, range(len(pool))))]
        if h.budget is None or everything[0].cost <= h.budget:
            starts += everything
    starts = [s for s in starts if s.goodput > 0] or starts
    if not starts:
        raise PlanError(f"no instance can hold {spec.name} within the inputs; add GPUs or pick a smaller model")
    inputs = {
        "model": spec.name, "workload": wl.name, "workload_source": wl.source if wl.trace is not None else None,
        "rate": rate, "budget_per_hour": given_budget,
        "slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s, "attainment": slo.attainment},
        "clouds": clouds, "regions": regions, "spot": spot,
        "inventory": str(inventory) if isinstance(inventory, str | Path) else (inventory.source if inventory else None),
        "bandwidth": str(bandwidth) if isinstance(bandwidth, str | Path) else None,
        "seed": seed, "time_limit": cfg.time_limit, "max_replica_nodes": max_replica_nodes,
    }
    if not_servable:
        inputs["not_servable"] = not_servable
    if (over := wl.share_longer_than(spec.max_position)) > 0:  # vLLM rejects them: --max-model-len <= this
        inputs["beyond_context"] = {"share": round(over, 4), "max_position": spec.max_position}
    tabu = Tabu(h, cfg, seed=seed, progress=progress)
    with FinalCheck(h, wl, slo, perf, rate, sim_requests, seed, inputs,
                    workers=None if sim_check > 0 else 1) as check:
        plans = model_plans = {name: h.to_plan(h.prune(ev), strategy=name, inputs=inputs)
                               for name, ev in base.items()}
        cands: list[Plan] = []
        reserve = 0.0
        checking = sim_check > 0
        check_note = None  # why the check did not decide, if it did not
        if checking:  # the baselines' plans first: the time limit covers the check, so it is measured
            if progress:
                progress(0.0, f"simulating the {len(plans)} baselines' plans")
            try:
                plans, cands = check.baselines(plans, base, hexgen_runners[:sim_check - 1], tabu,
                                               deadline=t0 + cfg.time_limit / 2,
                                               sim_deadline=t0 + CHECK_SHARE * cfg.time_limit)
            except SimDeadline:  # every plan is then judged by the model alone, ours and the baselines' alike
                checking = False
                check_note = (f"skipped: simulating the baselines' plans did not end within {CHECK_SHARE:.0%} "
                              f"of --time-limit {cfg.time_limit:g} s; the figures are the perf model's (raise "
                              "--time-limit for the simulator's)")
                if progress:
                    progress(0.0, "simulator check skipped: the time limit is too short for it")
            else:  # what simulating our finalists will take (with a rate, also as many near misses)
                reserve = check.seconds_for((2 * sim_check if rate is not None else sim_check) + 1)
        # the main search gets what the baselines, their check and the finalists' check leave of the time limit
        left = max(0.05, cfg.time_limit - (time.perf_counter() - t0) - reserve - 0.1)
        tabu.cfg = replace(cfg, time_limit=min(cfg.time_limit, left))
        best = tabu.walks(starts)
        best = max([best, *starts], key=lambda e: e.score)
        if best.goodput <= 0:
            raise PlanError(f"no plan meets the SLO (TTFT {slo.ttft_s:g} s, TPOT {slo.tpot_s:g} s at "
                            f"{slo.attainment:.0%}) for {spec.name}; relax --slo-ttft/--slo-tpot or raise the budget")
        best = h.prune(best)
        ours = h.to_plan(best, strategy="thunderops", inputs=inputs)
        if checking:  # the simulator decides between our best few and the baselines' plans
            if progress:
                progress(0.99, f"simulating the best {sim_check} candidates")
            elites = sorted(tabu.elites.values(), key=lambda e: -e.score)
            finalists = [best] + [e for e in elites if e.state != best.state][:sim_check - 1]
            split = tabu.best_split
            if split is not None and all(split.state != e.state for e in finalists):
                finalists.append(split)
            if rate is not None:  # cheaper plans the model rates just short of the rate: the simulator decides
                cheapest = min((e.cost for e in finalists if e.goodput >= rate * (1 - 1e-6)), default=math.inf)
                finalists += [e for e in h.near_misses(cheapest, sim_check)
                              if all(e.state != f.state for f in finalists)]
            try:
                cands += check.ours([h.prune(e) for e in finalists],
                                    deadline=t0 + (1 + CHECK_GRACE) * cfg.time_limit)
                ours = max(cands, key=lambda p: sim_key(p, rate))
            except SimDeadline:  # back to the model's figures for every plan, as if the check had not run
                plans = model_plans
                check_note = (f"stopped: simulating our finalists ran past --time-limit {cfg.time_limit:g} s; "
                              "the figures are the perf model's (raise --time-limit for the simulator's)")
    if check_note:
        ours.inputs["sim_check"] = check_note
    if cut:
        ours.inputs["baselines_cut"] = {name: f"{how} within {BASELINE_SHARE:.0%} of --time-limit {cfg.time_limit:g} s"
                                        for name, how in cut.items()}
    ours.inputs["baselines"] = {
        name: {"goodput_rps": p.predicted.goodput_rps, "cost_per_hour": p.cost_per_hour, "gpus": p.total_gpus}
        for name, p in plans.items()}
    if rate is not None:
        ours.inputs["rate_met"] = serves_rate(ours, rate)
    if progress:
        progress(1.0, f"done: {ours.predicted.goodput_rps:.2f} req/s at {ours.cost_per_hour:.2f} $/h")
    return PlanResult(ours, plans, time.perf_counter() - t0, h.evaluations, h)


def plan(budget: float | None = None, model: str = "llama-30b", workload: str | Workload = "conversation",
         **kwargs) -> Plan:
    """Find a deployment plan.

    budget: $/h for all instances (with offers, required unless a rate is given: then the search's ceiling is
    `procure.RATE_HEADROOM` x what the cheapest single kind of offer needs for the rate; optional with an inventory). model: a name from
    `thunderops catalog models` or a HF config.json. workload: `coding`, `conversation` or a trace CSV.
    Keywords: rate (req/s: the cheapest plan serving it), slo / slo_ttft / slo_tpot / attainment, clouds,
    regions, spot (True: spot prices only, False: on-demand only, None: either), inventory (YAML of your GPUs),
    bandwidth (JSON/CSV of Gbps between instances), offers (a catalog path or DataFrame), seed, time_limit (s),
    search (SearchConfig), progress (callback(fraction, message)), sim_check (how many of the best candidates
    the simulator checks at the end, with the baselines; 0: the perf model alone decides), sim_requests,
    max_replica_nodes (most instances one replica may span, default 4; None: no limit).
    """
    return solve(budget, model, workload, **kwargs).plan


def without_offers(offers: pd.DataFrame, blocked: Iterable[tuple]) -> pd.DataFrame:
    """The catalog minus `blocked` offers, each (cloud, region, zone, instance type, spot): a blocked spot offer
    loses its spot price, a blocked on-demand one its on-demand price, and a row left with neither is dropped."""
    spot_off, od_off = set(), set()
    for cloud, region, zone, itype, spot in blocked:
        (spot_off if spot else od_off).add((str(cloud), str(region), str(zone or ""), str(itype)))
    if not spot_off and not od_off:
        return offers
    df = offers.copy()
    keys = list(zip(df["cloud"].astype(str), df["region"].astype(str), df["zone"].fillna("").astype(str),
                    df["instance_type"].astype(str), strict=True))
    no_spot = pd.Series([k in spot_off for k in keys], index=df.index)
    no_od = pd.Series([k in od_off for k in keys], index=df.index)
    df.loc[no_spot, ["price_spot", "price_per_gpu_spot"]] = float("nan")
    df.loc[no_od, ["price_ondemand", "price_per_gpu_ondemand"]] = float("nan")
    return df[~((no_od | df["price_ondemand"].isna()) & df["price_spot"].isna())].reset_index(drop=True)


def gpu_problems(gpus: Iterable[str]) -> dict[str, str]:
    """GPU type -> why the engines thunderops installs cannot run on it (`serve.vllm.engine_gpu_problem`), for
    those of `gpus` they cannot run on."""
    from thunderops.serve.vllm import engine_gpu_problem

    return {g: p for g in sorted(set(gpus)) if (p := engine_gpu_problem(g)) is not None}


def servable_offers(table: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, str]]:
    """The offers whose GPUs the engines thunderops installs can run on, and why each GPU type left out cannot
    (`gpu_problems`). Renting a node whose engine cannot start would bill for nothing. GPUs of an --inventory
    are not filtered: their owner may run a vLLM build of their own."""
    problems = gpu_problems(table["gpu"])
    if not problems:
        return table, {}
    kept = table[~table["gpu"].isin(set(problems))]
    if kept.empty:
        raise PlanError(f"no offer left that vLLM can serve: {'; '.join(problems.values())}; widen --clouds/--regions")
    return kept, problems


def replan(plan: Plan, blocked: Iterable[tuple] = (), *, clouds: Iterable[str] | None = None,
           offers: str | Path | None = None, time_limit: float | None = None,
           progress: Callable[[float, str], None] | None = None) -> Plan:
    """Plan again for what `plan` was made for (its budget, and from `plan.inputs` the model, workload, rate,
    SLO, clouds, regions, spot, bandwidth, seed, time limit and --max-replica-nodes) over the catalog minus
    the `blocked` offers (see `without_offers`); `clouds` narrows the clouds further (e.g. to those with
    credentials). `thunderops up` gives this to the provider when a GPU type cannot be had."""
    from thunderops.catalog import load_offers

    inputs = plan.inputs
    if inputs.get("inventory"):
        raise PlanError("a plan over your own GPUs (--inventory) cannot be re-planned onto cloud offers")
    spot = inputs.get("spot")
    table = load_offers(offers, clouds=inputs.get("clouds"), regions=inputs.get("regions"),
                        spot=True if spot else None)
    table = without_offers(table, blocked)
    if clouds is not None:
        table = table[table["cloud"].isin({str(c).lower() for c in clouds})]
    if table.empty:
        raise PlanError("no offers left to re-plan with once the unavailable ones are set aside; widen "
                        "--clouds/--regions or try later")
    slo = inputs.get("slo") or {}
    workload = inputs.get("workload_source") or inputs.get("workload") or "conversation"
    limit = inputs["max_replica_nodes"] if "max_replica_nodes" in inputs else MAX_REPLICA_NODES
    result = solve(plan.budget_per_hour, inputs.get("model") or plan.model, workload, rate=inputs.get("rate"),
                   slo_ttft=slo.get("ttft_s"), slo_tpot=slo.get("tpot_s"), attainment=slo.get("attainment"),
                   clouds=inputs.get("clouds"), regions=inputs.get("regions"), spot=spot,
                   bandwidth=inputs.get("bandwidth"), offers=table, seed=int(inputs.get("seed") or 0),
                   time_limit=float(time_limit if time_limit is not None else inputs.get("time_limit") or 60.0),
                   progress=progress, max_replica_nodes=limit)
    return result.plan
