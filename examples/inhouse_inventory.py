"""GPUs you already have: plan a mixed 32-GPU in-house fleet (examples/inventory_32gpu.yaml), save the plan, then
lose two boxes and reschedule lightly (surviving replicas keep their layouts; phases and routing are re-decided).

    python examples/inhouse_inventory.py [--out plan.json] [--time-limit 20]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from thunderops.scheduler import solve
from thunderops.scheduler.reschedule import reschedule

INVENTORY = Path(__file__).with_name("inventory_32gpu.yaml")


def show(title, plan) -> None:
    print(f"== {title}: {plan.predicted.goodput_rps:.2f} req/s ({plan.predicted.method}), "
          f"{len(plan.groups)} replicas on {sum(g.gpus for g in plan.groups)} GPUs")
    for g in plan.groups:
        print(f"  {g.id:<4} {g.phase:<9} " + " -> ".join(f"{s.instance}[{s.tp} GPUs, {s.layers} layers]"
                                                       for s in g.stages))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--time-limit", type=float, default=20.0)
    ap.add_argument("--sim-check", type=int, default=0)
    ap.add_argument("--model", default="llama-30b")
    args = ap.parse_args()
    res = solve(None, args.model, "conversation", inventory=INVENTORY, time_limit=args.time_limit,
                sim_check=args.sim_check)
    plan = res.plan
    show("plan", plan)
    if args.out:
        plan.save(args.out)
        print(f"saved to {args.out}")
    lost = [i.id for i in plan.instances if i.gpu == "A40"][:2]
    t0 = time.perf_counter()
    new = reschedule(plan, lost)
    show(f"after losing {', '.join(lost)} (light reschedule in {time.perf_counter() - t0:.2f} s)", new)


if __name__ == "__main__":
    main()
