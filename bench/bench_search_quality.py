"""Search quality: our tabu search against exhaustive enumeration on inventories of up to 8 GPUs.

Exhaustive: every way to split the GPUs into groups (GPUs of one instance are interchangeable, so partitions that
differ only by such a swap are enumerated once; GPUs may stay unused), every phase assignment, each scored by the
same perf model and routing LP. Branch and bound keeps it tractable: a partition is skipped when
sum over groups of max(colocated, max(prefill, decode) / 2) cannot beat the best so far (a valid upper bound:
the prefill-decode flow is at most half the capacity on both sides), a phase assignment when the LP-free bound
cannot. Scores are the perf model's (the search's own objective), not the simulator's.

Last line: the smallest search/exhaustive goodput ratio over the cases (target >= 0.97).
"""

from __future__ import annotations

import itertools
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _inventories import paper  # noqa: E402

from thunderops.plan import SLO  # noqa: E402
from thunderops.scheduler import SearchConfig, solve  # noqa: E402
from thunderops.scheduler.harness import Harness, canon  # noqa: E402
from thunderops.scheduler.inventory import parse_inventory  # noqa: E402
from thunderops.scheduler.search import fits_alone  # noqa: E402

PHASES = ("prefill", "decode", "colocated")


def partitions(units):
    """Assignments of units to blocks (or unused, -1) as restricted growth strings."""
    n = len(units)

    def rec(i, labels, nblocks):
        if i == n:
            yield list(labels)
            return
        for b in range(-1, nblocks + 1):
            labels.append(b)
            yield from rec(i + 1, labels, max(nblocks, b + 1))
            labels.pop()

    yield from rec(0, [], 0)


def exhaustive(h: Harness) -> tuple[float, int]:
    units = [u for us in h.units_of for u in us]
    best, seen, scored = 0.0, set(), 0
    for labels in partitions(units):
        blocks: dict[int, list] = {}
        for u, b in zip(units, labels, strict=True):
            if b >= 0:
                blocks.setdefault(b, []).append(u)
        groups = [tuple(sorted(v)) for v in blocks.values()]
        if not groups:
            continue
        key = tuple(sorted(tuple(sorted(Counter(u[0] for u in g).items())) for g in groups))
        if key in seen:
            continue
        seen.add(key)
        if not all(fits_alone(h, g) for g in groups):
            continue  # a block that holds no replica is better left unused: that partition is enumerated too
        cfgs = [h.configs(g) for g in groups]
        ub = sum(max(c["colocated"].capacity, max(c["prefill"].capacity, c["decode"].capacity) / 2) for c in cfgs)
        if ub <= best:
            continue
        for phases in itertools.product(PHASES, repeat=len(groups)):
            state = canon(zip(groups, phases, strict=True))
            if h.bound(state) <= best:
                continue
            ev = h.evaluate(state)
            scored += 1
            best = max(best, ev.goodput)
    return best, scored


def main() -> None:
    small = parse_inventory({"nodes": [
        {"name": "a100-box", "gpu": "A100-80GB", "gpus": 2, "network_gbps": 25},
        {"name": "l4-box", "gpu": "L4", "gpus": 4, "network_gbps": 25}]}, "2xA100+4xL4")
    eight = parse_inventory({"nodes": [
        {"name": "l4-box", "gpu": "L4", "gpus": 4, "network_gbps": 10},
        {"name": "a10g-box", "gpu": "A10G", "gpus": 4, "network_gbps": 10}]}, "4xL4+4xA10G")
    cases = [
        ("paper 40 Gbps, LLaMA-30B, conversation", paper(40.0), "llama-30b", "conversation", SLO()),
        ("paper 5 Gbps, LLaMA-30B, coding", paper(5.0), "llama-30b", "coding", SLO()),
        ("2xA100 + 4xL4, Llama-3.1-8B, conversation", small, "llama-3.1-8b", "conversation", SLO()),
        ("2xA100 + 4xL4, Llama-3.1-8B, coding, TPOT 25 ms", small, "llama-3.1-8b", "coding", SLO(2.0, 0.025)),
        ("4xL4 + 4xA10G (2 boxes, 10 Gbps), Llama-3.1-8B, conversation", eight, "llama-3.1-8b", "conversation",
         SLO()),
    ]
    ratios = []
    print(f"{'case':<62} {'search':>8} {'s':>6} {'exhaustive':>10} {'s':>7} {'scored':>7} {'ratio':>6}")
    for name, inv, model, wl, slo in cases:
        t0 = time.perf_counter()
        res = solve(None, model, wl, inventory=inv, slo=slo, sim_check=0, search=SearchConfig(time_limit=30))
        ts = time.perf_counter() - t0
        ours = res.plan.predicted.goodput_rps
        t0 = time.perf_counter()
        h = Harness(res.harness.pool, res.harness.perf, res.harness.workload, slo, res.harness.topo)
        ex, scored = exhaustive(h)
        te = time.perf_counter() - t0
        ratios.append(ours / ex if ex > 0 else 1.0)
        print(f"{name:<62} {ours:>8.3f} {ts:>6.1f} {ex:>10.3f} {te:>7.1f} {scored:>7} {ratios[-1]:>6.3f}", flush=True)
    print(f"search quality: min search/exhaustive goodput ratio {min(ratios):.3f} over {len(ratios)} cases")


if __name__ == "__main__":
    main()
