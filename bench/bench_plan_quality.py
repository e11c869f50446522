"""Plan quality: goodput of our plan over the best baseline at equal budget (same perf model, same simulator).

Cases (issue 4):
  (a) the ThunderServe case study: 4xA40 + 4xRTX 3090 Ti, LLaMA-30B, conversation and coding, links at 40 and 5 Gbps;
  (b) equal budget, 13.54 $/h: a cloud mix from our catalogs against an in-house 8xA100-80GB server (vLLM and
      DistServe on the server), LLaMA-30B conversation;
  (c) the cloud catalogs, Llama-3.1-70B, coding and conversation, at 25 and 50 $/h.
Goodput is req/s meeting the SLO at 90 % attainment, from the simulator (`sim`) for the final plans and from the
perf model + routing LP (`model`) as the search sees it.

SLOs (one rule for every case, as in DistServe/ThunderServe's evaluations: a scale times the unloaded latency of a
single request): TTFT = 5 x the prefill latency of the workload's mean prompt and TPOT = 5 x the batch-1 decode
step, both on a reference replica at the smallest TP that holds the model: (a) the inventory's fastest GPU type by
peak FLOPs, (b) the A100-80GB of the server we compare against, (c) the H100. Printed per case. `--slo-scale` changes the 5; `--fixed-slo` uses the old fixed 2 s / 0.1 s instead.

Last line: the mean of ours/best-baseline (simulated) over all cases, and the minimum.
Usage: python bench/bench_plan_quality.py [--quick] [--time-limit S]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _inventories import paper  # noqa: E402

from thunderops.perf import PerfModel  # noqa: E402
from thunderops.plan import SLO  # noqa: E402
from thunderops.scheduler import solve  # noqa: E402
from thunderops.scheduler.inventory import parse_inventory  # noqa: E402
from thunderops.specs import get_gpu  # noqa: E402
from thunderops.workload import get_workload  # noqa: E402


def scaled_slo(model: str, gpus: list[str], workload: str, scale: float) -> tuple[SLO, str]:
    """`scale` x a single request's unloaded TTFT (mean prompt) and TPOT (batch 1) on the reference replica."""
    pm, wl = PerfModel(model), get_workload(workload)
    gpu = max((get_gpu(g) for g in gpus), key=lambda s: s.bf16_tflops)
    for tp in (1, 2, 4, 8):
        layout = pm.split_layers([(gpu, tp)], "colocated")
        if layout is not None:
            break
    ttft = scale * pm.prefill_time(layout, [round(wl.mean_prompt)])
    tpot = scale * pm.decode_step_time(layout, 1, round(wl.mean_prompt))
    return SLO(round(ttft, 3), round(tpot, 4), 0.9), f"{tp}x{gpu.name}"


def best_baseline(res, extra=()) -> tuple[str, float, float]:
    """(name, simulated goodput, model goodput) of the best baseline."""
    rows = [(k, p.predicted.goodput_rps, p.inputs.get("model_goodput_rps", p.predicted.goodput_rps))
            for k, p in res.baselines.items()] + list(extra)
    return max(rows, key=lambda r: r[1])


def line(case: str, res, base) -> float:
    p = res.plan
    model = p.inputs.get("model_goodput_rps", p.predicted.goodput_rps)
    ratio = p.predicted.goodput_rps / base[1] if base[1] > 0 else float("inf")
    shape = ", ".join(f"{g.phase[0]}:" + "+".join(f"{s.tp}x{s.gpu}" for s in g.stages) for g in p.groups)
    print(f"{case:<44} {p.cost_per_hour:>7.2f} {p.predicted.goodput_rps:>8.2f} {model:>8.2f} "
          f"{base[0]:>10} {base[1]:>8.2f} {base[2]:>8.2f} {ratio:>6.2f}  [{shape}]", flush=True)
    return ratio


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="(a) and one case of (c) only")
    ap.add_argument("--time-limit", type=float, default=30.0)
    ap.add_argument("--slo-scale", type=float, default=5.0)
    ap.add_argument("--fixed-slo", action="store_true", help="TTFT 2 s, TPOT 0.1 s for every case")
    args = ap.parse_args()
    tl = args.time_limit

    def slo_for(model: str, gpus: list[str], wl: str) -> SLO:
        if args.fixed_slo:
            slo, ref = SLO(2.0, 0.1, 0.9), "fixed"
        else:
            slo, ref = scaled_slo(model, gpus, wl, args.slo_scale)
        print(f"  SLO: TTFT {slo.ttft_s:g} s, TPOT {slo.tpot_s * 1e3:.1f} ms, 90 % "
              f"({'fixed' if args.fixed_slo else f'{args.slo_scale:g}x single request on {ref}'})", flush=True)
        return slo

    print(f"{'case':<44} {'$/h':>7} {'sim':>8} {'model':>8} {'baseline':>10} {'sim':>8} {'model':>8} {'ratio':>6}")
    ratios = []
    for wl in ("conversation", "coding"):
        for gbps in (40.0, 5.0):
            slo = slo_for("llama-30b", ["A40", "RTX3090Ti"], wl)
            res = solve(None, "llama-30b", wl, slo=slo, inventory=paper(gbps), time_limit=tl)
            ratios.append(line(f"(a) paper 4xA40+4x3090Ti {gbps:g} Gbps {wl}", res, best_baseline(res)))
            if args.quick:
                break
        if args.quick:
            break
    if not args.quick:
        slo = slo_for("llama-30b", ["A100-80GB"], "conversation")
        server = parse_inventory({"nodes": [{"name": "a100-server", "gpu": "A100-80GB", "gpus": 8,
                                             "price_per_hour": 13.54}]}, "8xA100 server")
        srv = solve(None, "llama-30b", "conversation", slo=slo, inventory=server, time_limit=tl)
        extra = [(f"8xA100:{k}", p.predicted.goodput_rps, p.inputs.get("model_goodput_rps", 0.0))
                 for k, p in srv.baselines.items() if k in ("vllm", "distserve")]
        res = solve(13.54, "llama-30b", "conversation", slo=slo, time_limit=tl)
        ratios.append(line("(b) 13.54 $/h cloud mix vs 8xA100 server", res, best_baseline(res, extra)))
        srv_best = max(extra, key=lambda r: r[1])
        print(f"    the 8xA100 server alone: {srv_best[0]} {srv_best[1]:.2f} req/s simulated; our cloud mix at the "
              f"same $/h: {res.plan.predicted.goodput_rps / max(srv_best[1], 1e-9):.2f}x", flush=True)
    for budget in (25.0, 50.0):
        for wl in ("coding", "conversation"):
            slo = slo_for("llama-3.1-70b", ["H100"], wl)
            res = solve(budget, "llama-3.1-70b", wl, slo=slo, time_limit=tl)
            ratios.append(line(f"(c) Llama-3.1-70B {wl} {budget:g} $/h", res, best_baseline(res)))
            if args.quick:
                break
        if args.quick:
            break
    mean = sum(ratios) / len(ratios)
    print(f"plan quality: ours/best baseline (simulated goodput) mean {mean:.2f} min {min(ratios):.2f} "
          f"over {len(ratios)} cases")


if __name__ == "__main__":
    main()
