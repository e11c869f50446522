"""Replay a request trace through a deployment plan with the simulator.

    python examples/trace_replay.py TRACE.csv [--plan PLAN.json] [--model M --gpu G] [--speedup 1 2 4]

TRACE.csv has the Azure LLM inference trace schema (TIMESTAMP,ContextTokens,GeneratedTokens). Without
--plan, a phase-split plan is made by hand: 2 prefill + 2 decode replicas of the model on one GPU type.
The trace is replayed at its own pace and time-compressed by each speed-up, then the plan's goodput (the
highest rate meeting the SLO) is searched with the trace's length distribution.
"""

from __future__ import annotations

import argparse
import sys

from thunderops.errors import UserError
from thunderops.perf import PerfModel
from thunderops.plan import SLO, Plan
from thunderops.sim import goodput, homogeneous_plan, simulate
from thunderops.workload import load_trace


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace", help="trace CSV: TIMESTAMP,ContextTokens,GeneratedTokens")
    ap.add_argument("--plan", help="plan JSON (default: a hand-made 2 prefill + 2 decode plan)")
    ap.add_argument("--model", default="Llama-3.1-8B")
    ap.add_argument("--gpu", default="H100")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--speedup", type=float, nargs="+", default=[1.0, 4.0, 16.0])
    ap.add_argument("--requests", type=int, default=2000, help="requests replayed per run (the trace's first N)")
    ap.add_argument("--ttft", type=float, default=1.0)
    ap.add_argument("--tpot", type=float, default=0.05)
    args = ap.parse_args(argv)
    try:
        wl = load_trace(args.trace)
        plan = Plan.load(args.plan) if args.plan else homogeneous_plan(
            args.model, args.gpu, prefill=(2, args.tp), decode=(2, args.tp))
        slo = SLO(args.ttft, args.tpot, 0.9)
        perf = PerfModel(plan.model)
        n = min(args.requests, len(wl.trace))
        print(f"trace {wl.name}: {len(wl.trace)} requests at {wl.rate:.2f} req/s; plan: {plan.model} on "
              f"{plan.total_gpus} GPUs ({', '.join(f'{g.id}:{g.phase}' for g in plan.groups)})")
        print(f"{'speed-up':>8} {'req/s':>7} {'TTFT p50':>9} {'TTFT p99':>9} {'TPOT p50':>9} {'TPOT p99':>9} "
              f"{'attain':>7} {'out tok/s':>10}")
        for s in args.speedup:
            res = simulate(plan, wl, slo, rate=wl.rate * s, n=n, seed=0, perf=perf)
            print(f"{s:>8g} {res.rate:>7.2f} {res.pct('ttft', 50):>9.3f} {res.pct('ttft', 99):>9.3f} "
                  f"{res.pct('tpot', 50):>9.4f} {res.pct('tpot', 99):>9.4f} {res.attainment:>7.1%} "
                  f"{res.output_tokens_per_s:>10,.0f}")
        gp = goodput(plan, wl, slo, n=n, perf=perf)
        print(f"goodput: {gp:.2f} req/s meet TTFT <= {slo.ttft_s}s and TPOT <= {slo.tpot_s}s for 90% of requests "
              f"({gp / wl.rate:.1f}x the trace's own rate)")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
