"""Baselines in the same harness as our search: same pool (offers or inventory), budget, perf model and LP.

- `vllm`: the best single instance type, colocated replicas of uniform TP.
- `distserve`: the best single instance type, phase-split: as DistServe places replicas, each phase gets the replica
  size and parallelism with the most goodput per GPU on its own, then the GPUs are split between prefill and decode
  replicas (best split by the LP); also the greedy groups with the best phase cut.
- `hexgen`: heterogeneous instances, colocated replicas with asymmetric parallelism (mixed-GPU pipelines),
  found by the same tabu search restricted to colocated groups.
- `melange`: the heterogeneous mix that maximises capacity under the budget (or, with a target rate, the
  cheapest that serves it) by an integer program (scipy's HiGHS MILP); one colocated replica per instance unit.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from thunderops.scheduler.harness import Evaluation, Harness, State, canon
from thunderops.scheduler.search import (
    SearchConfig,
    Tabu,
    along,
    best_of,
    designate,
    fits_alone,
    greedy_groups,
    past,
)
from thunderops.specs import get_gpu

BASELINES = ("vllm", "distserve", "hexgen", "melange")


def templates(h: Harness, by_place: bool = True) -> dict[tuple, list[int]]:
    """Instances grouped by kind (instance type, and with `by_place` also place and pricing), copies cheapest
    first. Without `by_place` one kind spans clouds and regions (a single GPU type, wherever it is)."""
    out: dict[tuple, list[int]] = {}
    order = sorted(range(len(h.pool)), key=lambda k: (h.pool[k].price_per_hour, k))
    for k in order:
        inst = h.pool[k]
        key = (inst.gpu, inst.gpus) if not by_place else \
            (inst.instance_type, inst.cloud, inst.region, inst.zone, inst.spot, inst.price_per_hour)
        out.setdefault(key, []).append(k)
    return out


def _affordable(h: Harness, insts: list[int]) -> list[int]:
    """The longest prefix of these instances within the budget."""
    out, spent = [], 0.0
    for i in insts:
        p = h.pool[i].price_per_hour
        if h.budget is not None and spent + p > h.budget + 1e-9:
            break
        out.append(i)
        spent += p
    return out


def _merge_pairs(groups: list[tuple]) -> list[tuple]:
    """Uniform TP twice as wide: merge consecutive groups pairwise (an odd one stays as it is)."""
    return [groups[k] + groups[k + 1] if k + 1 < len(groups) else groups[k] for k in range(0, len(groups), 2)]


def _candidates(h: Harness, top: int = 6) -> list[list[int]]:
    """The GPU kinds worth trying as a single type: the best few by memory bandwidth per $ (decode) and by
    compute per $ (prefill), of what the budget buys; most promising first (`_promise`)."""
    kinds = [insts for insts in templates(h, by_place=False).values() if _affordable(h, insts)]
    if len(kinds) > 2 * top:
        def per_dollar(insts, attr):
            i = h.pool[insts[0]]
            return getattr(get_gpu(i.gpu), attr) * i.gpus / max(i.price_per_hour, 1e-3)

        by_bw = sorted(kinds, key=lambda k: -per_dollar(k, "memory_gbps"))[:top]
        by_flops = sorted(kinds, key=lambda k: -per_dollar(k, "bf16_tflops"))[:top]
        kinds = list({tuple(k): k for k in by_bw + by_flops}.values())
    promise = [_promise(h, k) for k in kinds]
    return [kinds[n] for n in sorted(range(len(kinds)), key=lambda n: (-promise[n], n))]


def _promise(h: Harness, insts: list[int]) -> float:
    """Colocated capacity (requests/s) of as many replicas of this kind as the budget buys, each as the fewest
    instances that hold one: the order in which a time limit gets to try kinds. Its configs are the ones the
    baseline then uses."""
    avail = _affordable(h, insts)
    need = h.instances_per_replica(insts[0])
    if need is None or need > len(avail):
        return 0.0
    cap = sum(h.config(g, "colocated").capacity for g in greedy_groups(h, avail[:need]))
    return cap * (len(avail) // need)


def _homogeneous(h: Harness, phase_split: bool, deadline: float | None = None) -> tuple[Evaluation | None, str]:
    """Best single instance kind: as many copies as affordable (with a rate, the fewest that serve it). Past
    `deadline` (time.perf_counter()) no further kind is tried once one has a plan that serves something; the
    second item then says how many were (else ""). A kind whose evaluation runs past `deadline` settles for
    the best phase cut found by then (`designate`): a fleet of hundreds of GPUs takes seconds per cut."""
    best: Evaluation | None = None
    kinds = _candidates(h)
    cut_short = ""
    for n, insts in enumerate(kinds):
        if past(deadline) and best is not None and best.goodput > 0:
            return best, f"{n} of {len(kinds)} GPU kinds tried{cut_short}"
        avail = _affordable(h, insts)
        if not avail:
            continue
        counts = [len(avail)]
        if h.rate is not None:  # fewest copies that meet the rate (goodput grows with copies)
            lo, hi = 1, len(avail)
            while lo < hi:
                mid = (lo + hi) // 2
                ev = _homog_eval(h, avail[:mid], phase_split, deadline)  # None: too few to hold a replica
                if ev is not None and ev.goodput >= h.rate:
                    hi = mid
                else:
                    lo = mid + 1
            counts = sorted({lo, len(avail)})
        for m in counts:
            ev = _homog_eval(h, avail[:m], phase_split, deadline)
            if ev is not None and (best is None or ev.score > best.score):
                best = ev
        cut_short = " (the last one in part)" if past(deadline) else ""
    return best, f"{len(kinds)} of {len(kinds)} GPU kinds tried{cut_short}" if cut_short else ""


def _homog_eval(h: Harness, insts: list[int], phase_split: bool, deadline: float | None = None
                ) -> Evaluation | None:
    """The best plan of these instances as one kind's replicas: greedy groups, or pairs of them merged (TP
    twice as wide); phase-split, also DistServe's per-phase replica sizes. Past `deadline` it keeps what it
    has evaluated (at least the greedy groups)."""
    groups = greedy_groups(h, insts)
    if not groups:
        return None
    options = [groups]
    if len(groups) >= 2:
        options.append(_merge_pairs(groups))
    evs: list[Evaluation] = []
    for g in options:
        if evs and past(deadline):
            break
        # DistServe is phase-split by design (colocated only when there is a single replica)
        evs.append(designate(h, g, phase_split, require_split=True, deadline=deadline) if phase_split
                   else h.evaluate(canon((u, "colocated") for u in g)))
    if phase_split and not past(deadline) and \
            (states := _per_phase_states(h, insts, min(len(g) for g in groups), deadline=deadline)):
        evs.append(best_of(h, states, deadline=deadline))
    return max(evs, key=lambda e: e.score)


def _per_phase_states(h: Harness, insts: list[int], smallest: int, top: int = 2,
                      deadline: float | None = None) -> list[State]:
    """DistServe's placement on one GPU kind: the prefill replica and the decode replica each take a size (and
    with it the TP/PP) among the `top` with the most capacity per GPU, chosen on their own; then the ways of
    splitting the units into n prefill replicas and as many decode replicas as the rest holds (the best few
    by the bound: every n in a fleet of up to `search.ALONG_FULL` splits, see `along`). `smallest`: units
    the smallest replica needs; sizes double from it while a replica stays within the replica limit."""
    units = [u for i in sorted(insts) for u in h.units_of[i]]
    sizes, k = [], smallest
    while k <= len(units) - smallest and h.allowed(((tuple(units[:k]), "prefill"),)):
        sizes.append(k)
        k *= 2
    ranked = {ph: sorted(sizes, key=lambda k, ph=ph: -h.config(tuple(units[:k]), ph).capacity / k)[:top]
              for ph in ("prefill", "decode")}
    states = []
    for sp in ranked["prefill"]:
        for sd in ranked["decode"]:
            def split(k: int, sp: int = sp, sd: int = sd) -> State:  # k + 1 prefill replicas, decode on the rest
                rest = units[(k + 1) * sp:]
                return canon([(tuple(units[a * sp:(a + 1) * sp]), "prefill") for a in range(k + 1)]
                             + [(tuple(rest[b * sd:(b + 1) * sd]), "decode") for b in range(len(rest) // sd)])

            states += along(h, (len(units) - sd) // sp, split, deadline=deadline)  # a large fleet's best few
    return states


def vllm(h: Harness) -> Evaluation | None:
    return _homogeneous(h, phase_split=False)[0]


def distserve(h: Harness) -> Evaluation | None:
    return _homogeneous(h, phase_split=True)[0]


def melange(h: Harness) -> Evaluation | None:
    """Integer program over instance kinds whose single instance holds replicas (one per unit)."""
    kinds = []
    for insts in templates(h).values():
        i0 = insts[0]
        units = h.units_of[i0]
        if not fits_alone(h, (units[0],)):
            continue
        cap = h.config((units[0],), "colocated").capacity * len(units)
        if cap > 0:
            kinds.append((insts, cap, h.pool[i0].price_per_hour))
    if not kinds:
        return None
    cap = np.array([k[1] for k in kinds])
    price = np.array([k[2] for k in kinds])
    upper = np.array([len(k[0]) for k in kinds], dtype=float)
    cons = []
    if h.rate is not None:
        c = price
        cons.append(LinearConstraint(cap[None, :], lb=h.rate, ub=np.inf))
        if h.budget is not None:
            cons.append(LinearConstraint(price[None, :], lb=0, ub=h.budget))
    else:
        c = -cap + 1e-6 * price
        cons.append(LinearConstraint(price[None, :], lb=0, ub=h.budget if h.budget is not None else np.inf))
    res = milp(c, constraints=cons, integrality=np.ones(len(kinds)), bounds=Bounds(0, upper))
    if res.x is None:  # the rate is out of reach: take the largest capacity the budget buys
        if h.rate is None:
            return None
        res = milp(-cap, constraints=cons[1:], integrality=np.ones(len(kinds)), bounds=Bounds(0, upper))
        if res.x is None:
            return None
    groups = []
    for (insts, _, _), n in zip(kinds, np.rint(res.x).astype(int), strict=True):
        for i in insts[:n]:
            groups += [((u,), "colocated") for u in h.units_of[i]]
    return h.evaluate(canon(groups)) if groups else None


def hexgen(h: Harness, seed: int = 0, start: list[Evaluation] | None = None, cfg: SearchConfig | None = None) -> Evaluation | None:
    """Heterogeneous colocated replicas: the tabu search with phase splitting switched off."""
    starts = [e for e in (start or []) if e is not None and all(ph == "colocated" for _, ph in e.state)]
    if not starts:
        base = vllm(h) or melange(h)
        if base is None:
            return None
        starts = [base]
    c = cfg or SearchConfig(max_iters=40, patience=10)
    c = SearchConfig(**{**c.__dict__, "phase_split": False})
    tabu = Tabu(h, c, seed=seed)
    best = tabu.run(starts)
    # its runners-up, so the final simulator check treats this search like ours (best few, not one)
    HEXGEN_ELITES[id(h)] = sorted((e for e in tabu.elites.values() if e.state != best.state),
                                  key=lambda e: -e.score)
    return best


HEXGEN_ELITES: dict[int, list[Evaluation]] = {}  # harness id -> the HexGen search's runners-up, best first


def all_baselines(h: Harness, seed: int = 0, cfg: SearchConfig | None = None, deadline: float | None = None
                  ) -> tuple[dict[str, Evaluation], dict[str, str]]:
    """Every baseline's plan, and which were cut short by `deadline` (time.perf_counter()) and how: past it,
    vLLM and DistServe try no further GPU kind once they have a plan (HexGen's search has `cfg.time_limit`)."""
    out: dict[str, Evaluation] = {}
    cut: dict[str, str] = {}
    for name, phase_split in (("vllm", False), ("distserve", True)):
        ev, note = _homogeneous(h, phase_split, deadline)
        if ev is not None:
            out[name] = ev
        if note:
            cut[name] = note
    ev = melange(h)
    if ev is not None:
        out["melange"] = ev
    ev = hexgen(h, seed, [out.get("melange"), out.get("vllm")], cfg)
    if ev is not None:
        out["hexgen"] = ev
    return out, cut


def shaped_like(h: Harness, name: str, state: State) -> bool:
    """Whether `state` is a plan baseline `name` could make: one GPU type for vLLM (uniform replicas, colocated)
    and DistServe (phase-split, or one replica); colocated replicas for HexGen, of one unit each for Melange."""
    colocated = all(ph == "colocated" for _, ph in state)
    one_type = len({h.pool[u[0]].gpu for units, _ in state for u in units}) == 1
    if name == "vllm":
        return one_type and colocated and len({len(units) for units, _ in state}) == 1
    if name == "distserve":
        return one_type and (not colocated or len(state) == 1)
    if name == "hexgen":
        return colocated
    if name == "melange":
        return colocated and all(len(units) == 1 for units, _ in state)
    return False


def colocated_state(groups: list[tuple]) -> State:
    return canon((g, "colocated") for g in groups)
