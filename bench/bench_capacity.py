"""Per-replica capacity: the perf model's analytic figure (PerfModel.capacity) against the simulator's goodput.

Grid: GPU type x TP x model, workloads coding / conversation, three SLOs, phases prefill / decode / colocated.
A prefill replica is simulated with 4 decode replicas behind it (and a decode replica with 4 prefill replicas in
front), one node, so the replica under test is the bottleneck. The scheduler ranks plans by the model and checks
finalists by simulation: the two must agree, above all on colocated vs phase-split.

Last line: the share of grid points (where either figure is above 0) within 35 % of the simulator.
Usage: python bench/bench_capacity.py [--jobs N] [--phases colocated,prefill,decode]   (default: colocated;
36 points took about 8 min on 16 cores)
"""

from __future__ import annotations

import argparse
import math
import time
from concurrent.futures import ProcessPoolExecutor

from thunderops.perf import PerfModel, layout_of
from thunderops.plan import SLO
from thunderops.sim import goodput, homogeneous_plan
from thunderops.workload import get_workload

REPLICAS = [("Llama-3.1-8B", "H100", 1), ("Llama-3.1-8B", "A100-80GB", 1), ("Llama-3.1-8B", "L4", 1),
            ("Llama-3.1-70B", "H100", 4), ("Llama-3.1-70B", "A100-80GB", 4), ("llama-30b", "A40", 4)]
SLOS = [SLO(2.0, 0.1, 0.9), SLO(1.0, 0.05, 0.9), SLO(1.0, 0.03, 0.9)]
TOL = 0.35


def point(args: tuple) -> tuple:
    phase, (model, gpu, tp), wl, slo = args
    if phase == "colocated":
        plan = homogeneous_plan(model, gpu, colocated=(1, tp))
        g = plan.groups[0]
    elif phase == "prefill":
        plan = homogeneous_plan(model, gpu, prefill=(1, tp), decode=(4, tp))
        g = plan.groups[0]
    else:
        plan = homogeneous_plan(model, gpu, prefill=(4, tp), decode=(1, tp))
        g = plan.groups[-1]
    perf = PerfModel(plan.model)
    w = get_workload(wl)
    t0 = time.perf_counter()
    cap = perf.capacity(layout_of(plan, g, perf), phase, w, slo)
    ms = (time.perf_counter() - t0) * 1e3
    return phase, model, gpu, tp, wl, slo, cap, goodput(plan, w, slo, perf=perf), ms


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--phases", default="colocated", help="comma list of colocated, prefill, decode (the latter two"
                    " simulate 5 replicas per point: slow)")
    args = ap.parse_args()
    grid = [(ph, r, wl, slo) for ph in args.phases.split(",") for r in REPLICAS
            for wl in ("coding", "conversation") for slo in SLOS]
    print(f"{'phase':<10} {'model':<14} {'gpu':<10} {'tp':>2} {'workload':<12} {'TTFT':>5} {'TPOT':>5} "
          f"{'model r/s':>9} {'sim r/s':>8} {'ratio':>6} {'ms':>5}")
    within, total, logs = 0, 0, []
    with ProcessPoolExecutor(args.jobs) as ex:
        for ph, model, gpu, tp, wl, slo, cap, sim, ms in ex.map(point, grid):
            ratio = cap / sim if sim > 0 else (math.inf if cap > 0 else 1.0)
            print(f"{ph:<10} {model:<14} {gpu:<10} {tp:>2} {wl:<12} {slo.ttft_s:>5.2f} {slo.tpot_s:>5.3f} "
                  f"{cap:>9.2f} {sim:>8.2f} {ratio:>6.2f} {ms:>5.0f}", flush=True)
            if cap > 0 or sim > 0:
                total += 1
                within += abs(ratio - 1) <= TOL
                if 0 < ratio < math.inf:
                    logs.append(abs(math.log(ratio)))
    logs.sort()
    med = math.exp(logs[len(logs) // 2]) if logs else float("nan")
    print(f"capacity vs simulator: median error x{med:.2f}; within {TOL:.0%}: {within}/{total} = {within / max(total, 1):.2f}")


if __name__ == "__main__":
    main()
