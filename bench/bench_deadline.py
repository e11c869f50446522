"""Deadline tightness: how tight an SLO each strategy meets at a fixed request rate and equal budget.

ThunderServe's second headline ("1.5x tighter latency deadlines"): at the same rate and price, the SLO scale each
system still serves at 90 % attainment. Here, for each case, the SLO is `s` x a single request's unloaded latency
(TTFT and TPOT, as in bench_plan_quality.py) for s on a descending grid; at every s the scheduler plans (ours and
the baselines, same harness) and the simulator says whether each plan serves the rate R. R is half the best
baseline's simulated goodput at the loosest scale. A strategy's deadline is the smallest s it meets; the ratio is
the best baseline's deadline over ours (> 1: ours meets tighter deadlines).

Last line: the mean ratio over the cases.
Usage: python bench/bench_deadline.py [--quick] [--time-limit S] [--scales 8,5,4,3,2.5,2,1.5,1.25]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_plan_quality import Case, cases, scaled_slo  # noqa: E402

from thunderops.scheduler import solve  # noqa: E402


def tightest(case: Case, scales: list[float], tl: float) -> tuple[float, dict[str, float]]:
    """The rate R and each strategy's smallest scale meeting it (inf: none on the grid)."""
    met: dict[str, float] = {}
    rate = None
    for s in sorted(scales, reverse=True):
        slo, _ = scaled_slo(case.model, case.reference, case.workload, s)
        res = solve(case.budget, case.model, case.workload, slo=slo, inventory=case.inventory, time_limit=tl)
        got = {"ours": res.plan.predicted.goodput_rps} | {k: p.predicted.goodput_rps for k, p in res.baselines.items()}
        if rate is None:
            rate = 0.5 * max(v for k, v in got.items() if k != "ours")
        for k, v in got.items():
            met.setdefault(k, float("inf"))
            if v >= rate:
                met[k] = min(met[k], s)
        print(f"    scale {s:g}: TTFT {slo.ttft_s:g} s TPOT {slo.tpot_s * 1e3:.1f} ms  "
              + " ".join(f"{k}={v:.2f}" for k, v in got.items()), flush=True)
        if all(v < rate for v in got.values()):
            break  # nobody meets it: tighter scales will not either
    return rate or 0.0, met


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--time-limit", type=float, default=20.0)
    ap.add_argument("--scales", default="8,5,4,3,2.5,2,1.5,1.25")
    args = ap.parse_args()
    scales = [float(x) for x in args.scales.split(",")]
    picked = [c for c in cases(False) if c.label.startswith("(a) paper 4xA40+4x3090Ti 40") or
              (c.label.startswith("(c)") and "25 $/h" in c.label)]
    if args.quick:
        picked = picked[:1]
    ratios = []
    for case in picked:
        print(f"{case.label}", flush=True)
        rate, met = tightest(case, scales, args.time_limit)
        base = {k: v for k, v in met.items() if k != "ours"}
        best = min(base.values())
        ratio = best / met["ours"] if met["ours"] < float("inf") else 0.0
        ratios.append(ratio)
        print(f"  at {rate:.2f} req/s, tightest scale met: ours {met['ours']:g}, "
              + ", ".join(f"{k} {v:g}" for k, v in base.items()) + f"  -> {ratio:.2f}x tighter", flush=True)
    print(f"deadline: best baseline's tightest SLO scale / ours, mean {sum(ratios) / len(ratios):.2f} "
          f"min {min(ratios):.2f} over {len(ratios)} cases")


if __name__ == "__main__":
    main()
