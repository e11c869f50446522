"""How goodput grows with the $/h budget: plan Llama-3.1-8B (or another model) at several budgets from the
shipped cloud catalogs and print what each buys, against the best baseline at the same budget.

    python examples/budget_sweep.py [--model llama-3.1-8b] [--budgets 2,5,10,20] [--clouds lambda,aws]
"""

from __future__ import annotations

import argparse

from thunderops.errors import UserError
from thunderops.scheduler import solve


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--workload", default="conversation")
    ap.add_argument("--budgets", default="2,5,10,20")
    ap.add_argument("--clouds", default=None)
    ap.add_argument("--time-limit", type=float, default=20.0)
    ap.add_argument("--sim-check", type=int, default=0)
    args = ap.parse_args()
    print(f"{'budget $/h':>10} {'cost $/h':>9} {'GPUs':>5} {'goodput req/s':>14} {'req/s per $/h':>14} "
          f"{'best baseline':>14}  instances")
    for budget in (float(b) for b in args.budgets.split(",")):
        try:
            res = solve(budget, args.model, args.workload, clouds=args.clouds, time_limit=args.time_limit,
                        sim_check=args.sim_check)
        except UserError as e:
            print(f"{budget:>10.2f}  {e}")
            continue
        p = res.plan
        base = max(res.baselines.items(), key=lambda kv: kv[1].predicted.goodput_rps)
        kinds = ", ".join(sorted({f"{i.gpus}x{i.gpu}{' spot' if i.spot else ''} ({i.cloud})" for i in p.instances}))
        print(f"{budget:>10.2f} {p.cost_per_hour:>9.2f} {p.total_gpus:>5} {p.predicted.goodput_rps:>14.2f} "
              f"{p.predicted.goodput_rps / p.cost_per_hour:>14.3f} {base[1].predicted.goodput_rps:>8.2f} "
              f"{base[0]:<9} {kinds}")


if __name__ == "__main__":
    main()
