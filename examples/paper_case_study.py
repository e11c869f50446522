"""The ThunderServe case study on our stack: 4xA40 + 4xRTX 3090 Ti serving LLaMA-30B, with the two boxes joined
by a 40 Gbps and then a 5 Gbps link. Plans ours and the baselines (same perf model, same simulator) and prints
the groups, phases and goodput of each.

    python examples/paper_case_study.py [--time-limit 20] [--workload conversation]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from thunderops.scheduler import solve
from thunderops.scheduler.inventory import load_inventory

INVENTORY = Path(__file__).with_name("paper_inventory.yaml")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--time-limit", type=float, default=20.0)
    ap.add_argument("--workload", default="conversation")
    ap.add_argument("--sim-check", type=int, default=3)
    args = ap.parse_args()
    inv = load_inventory(INVENTORY)
    for gbps in (40.0, 5.0):
        bw = {("a40-box", "rtx3090ti-box"): gbps}
        res = solve(None, "llama-30b", args.workload, inventory=inv, bandwidth=bw, time_limit=args.time_limit,
                    sim_check=args.sim_check)
        print(f"== link {gbps:g} Gbps, LLaMA-30B, {args.workload} ==")
        for name, p in [("thunderops", res.plan), *res.baselines.items()]:
            groups = ", ".join(f"{g.phase}:{'+'.join(f'{s.tp}x{s.gpu}' for s in g.stages)}" for g in p.groups)
            print(f"  {name:<11} {p.predicted.goodput_rps:6.2f} req/s ({p.predicted.method}) "
                  f"{p.predicted.tokens_per_s:7.0f} tok/s  [{groups}]")


if __name__ == "__main__":
    main()
