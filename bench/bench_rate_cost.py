"""Cost at a target rate: the $/h of our plan serving a request rate against each baseline's (`--rate`, no budget).

The other side of plan quality: instead of goodput at equal $/h, the $/h each strategy needs to serve a rate at
the SLO, every plan judged by the simulator (attainment at the rate, 3 seeds pooled) and, where the perf model
rates a cheaper plan just short of the rate, that near miss judged too (ours and, of its own shape, each
baseline's). A baseline whose plan misses the rate is not counted. Cases: Llama-3.1-70B on the cloud catalogs,
`coding` and `conversation`, at the product's default SLO (TTFT 2 s, TPOT 100 ms, 90 %), at 20, 40, 60 and 100
req/s (about 8 minutes on a 2-core machine).

Printed per case: each strategy's $/h (or "misses") and best baseline $/h / ours; then each baseline's $/h over
ours averaged over the cases it serves; the last line is the mean of the best-baseline ratio (above 1: ours is
cheaper).
Usage: python bench/bench_rate_cost.py [--time-limit S] [--rates 20,40,60,100] [--workloads coding,conversation]
"""

from __future__ import annotations

import argparse

from thunderops.plan import SLO
from thunderops.scheduler import solve
from thunderops.scheduler.check import serves_rate


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--time-limit", type=float, default=30.0)
    ap.add_argument("--rates", default="20,40,60,100")
    ap.add_argument("--workloads", default="coding,conversation")
    ap.add_argument("--model", default="llama-3.1-70b")
    args = ap.parse_args()
    slo = SLO(2.0, 0.1, 0.9)
    ratios: list[float] = []
    per_baseline: dict[str, list[float]] = {}
    for wl in args.workloads.split(","):
        for rate in (float(r) for r in args.rates.split(",")):
            res = solve(None, args.model, wl, rate=rate, slo=slo, time_limit=args.time_limit)
            ours = res.plan
            cols, costs = [], {}
            for name, p in res.baselines.items():
                if serves_rate(p, rate):
                    costs[name] = p.cost_per_hour
                    cols.append(f"{name}={p.cost_per_hour:.2f}")
                else:
                    cols.append(f"{name}=misses")
            met = serves_rate(ours, rate)
            line = (f"  {args.model} {wl} {rate:g} req/s: ours {ours.cost_per_hour:.2f} $/h "
                    f"(sim {ours.predicted.goodput_rps:.2f} req/s, model {ours.inputs.get('model_goodput_rps')}"
                    f"{'' if met else ', MISSES'})  {' '.join(cols)}")
            if costs and met:
                for name, cost in costs.items():
                    per_baseline.setdefault(name, []).append(cost / ours.cost_per_hour)
                best = min(costs, key=costs.get)
                ratios.append(costs[best] / ours.cost_per_hour)
                line += f"  best {best} -> {ratios[-1]:.2f}x"
            print(line, flush=True)
    for name, rs in per_baseline.items():
        print(f"  {name:<10} $/h over ours: mean {sum(rs) / len(rs):.2f} max {max(rs):.2f} over {len(rs)} cases")
    mean = sum(ratios) / len(ratios) if ratios else float("nan")
    print(f"rate cost: best baseline $/h / ours at the same rate, mean {mean:.2f} "
          f"min {min(ratios, default=float('nan')):.2f} over {len(ratios)} cases")


if __name__ == "__main__":
    main()
