"""Simulator speed: 10,000 requests through a 32-GPU plan on one core, against the 1 s goal.

Plans: Llama-3.1-70B on 32 H100s as 4 prefill + 4 decode replicas (TP4, phase-split, KV over 100 Gbit/s
between nodes) and as 8 colocated replicas (TP4, chunked prefill), conversation workload near saturation.
Last line: goal / measured time (>= 1 meets the goal).
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

from thunderops.perf import PerfModel  # noqa: E402
from thunderops.plan import SLO  # noqa: E402
from thunderops.sim import homogeneous_plan, simulate  # noqa: E402
from thunderops.workload import get_workload  # noqa: E402

GOAL_S = 1.0
N = 10_000


def main() -> None:
    wl = get_workload("conversation")
    slo = SLO(ttft_s=1.0, tpot_s=0.05, attainment=0.9)
    cases = [
        ("4P+4D x TP4 (32 H100)", homogeneous_plan("Llama-3.1-70B", "H100", prefill=(4, 4), decode=(4, 4)), 36.0),
        ("8 colocated x TP4 (32 H100)", homogeneous_plan("Llama-3.1-70B", "H100", colocated=(8, 4)), 45.0),
    ]
    worst = 0.0
    for name, plan, rate in cases:
        assert plan.total_gpus == 32
        t0 = time.process_time()
        res = simulate(plan, wl, slo, rate=rate, n=N, seed=0, perf=PerfModel(plan.model))  # cold: no memo
        dt = time.process_time() - t0
        worst = max(worst, dt)
        print(f"{name}: {N} requests at {rate} req/s in {dt:.3f} s CPU "
              f"(attainment {res.attainment:.1%}, {res.output_tokens_per_s:,.0f} output tok/s)")
    print(f"simulator speed ratio (goal {GOAL_S:.1f} s / worst {worst:.3f} s): {GOAL_S / worst:.2f}")


if __name__ == "__main__":
    main()
