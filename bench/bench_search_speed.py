"""Search time of `thunderops plan` on mixed in-house fleets of 32, 128 and 512 GPUs (LLaMA-30B, conversation).

Targets (issue 4): 32 GPUs under 5 s, 128 under 30 s, 512 under 5 min, for the whole planning (baselines, greedy
start, tabu search; the final simulator check is off here, it is a separate, optional step). The search runs with
its time limit at 80 % of the target; the wall time includes everything. Also printed: our goodput over the best
baseline computed in the same run (never below 1.0).

Last line: the smallest target/actual time ratio over the sizes (>= 1.0 means every size met its target).
Usage: python bench/bench_search_speed.py [--sizes 32,128,512]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _inventories import fleet  # noqa: E402

from thunderops.scheduler import solve  # noqa: E402

TARGETS = {32: 5.0, 128: 30.0, 512: 300.0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="32,128,512")
    ap.add_argument("--model", default="llama-30b")
    args = ap.parse_args()
    ratios = []
    print(f"{'GPUs':>5} {'target s':>9} {'wall s':>8} {'candidates':>10} {'replicas':>8} {'goodput':>8} "
          f"{'best baseline':>14} {'ours/base':>9}")
    for n in (int(x) for x in args.sizes.split(",")):
        target = TARGETS.get(n, n / 32 * 5.0)
        t0 = time.perf_counter()
        res = solve(None, args.model, "conversation", inventory=fleet(n), sim_check=0, time_limit=0.8 * target)
        wall = time.perf_counter() - t0
        ours = res.plan.predicted.goodput_rps
        base = max((p.predicted.goodput_rps for p in res.baselines.values()), default=0.0)
        ratios.append(target / wall)
        print(f"{n:>5} {target:>9.0f} {wall:>8.2f} {res.evaluations:>10} {len(res.plan.groups):>8} {ours:>8.2f} "
              f"{base:>14.2f} {ours / base if base else float('inf'):>9.2f}", flush=True)
    print(f"search speed: min target/actual time ratio {min(ratios):.2f}")


if __name__ == "__main__":
    main()
