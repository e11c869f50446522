"""`thunderops calibrate` (GPU micro-benchmarks -> calibration file) and `thunderops simulate PLAN.json`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from thunderops.cli.app import app, console, err_console, print_json


@app.command("calibrate")
def calibrate(
    model: Annotated[list[str] | None, typer.Option("--model", "-m", help="Model whose layer shapes to measure "
                                                    "(repeatable; default Llama-3.1-8B, Llama-3.1-70B, Llama-2-7B)")] = None,
    out: Annotated[Path | None, typer.Option(help="Calibration file to write (default catalogs/calibration/<GPU>.json)")] = None,
    gpu: Annotated[str | None, typer.Option(help="GPU catalog name (default: detected from the device)")] = None,
    quick: Annotated[bool, typer.Option(help="Fewer shapes (about a minute)")] = False,
    refit: Annotated[Path | None, typer.Option(help="Re-fit an existing file's measurements (no GPU needed)")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
) -> None:
    """Measure this machine's GPU with PyTorch (GEMMs, attention, memory bandwidth, decoder layers, NCCL
    all-reduce on several GPUs), fit the perf model's efficiencies and write a calibration file."""
    from thunderops import calibrate as cal
    from thunderops.perf import calibration_dir

    if refit is not None:
        doc = cal.refit_file(refit, gpu)
    else:
        doc = cal.run_calibration(model, gpu, quick, log=lambda s: err_console.print(s, highlight=False))
    path = cal.write_document(doc, out or calibration_dir() / f"{doc['gpu']}.json")
    if json_out:
        print_json({"out": str(path), "calibration": doc["calibration"], "errors": doc["errors"]})
        return
    table = Table(title=f"calibration of {doc['gpu']} ({doc.get('device_name', '')})")
    table.add_column("parameter")
    table.add_column("value", justify="right")
    for k, v in doc["calibration"].items():
        table.add_row(k, f"{v:.4g}" if isinstance(v, float) else str(v))
    console.print(table)
    errs = Table(title="perf model vs measurement (absolute error, %)")
    for col in ("kind", "n", "median", "p90", "max"):
        errs.add_column(col, justify="right" if col != "kind" else "left")
    for kind, e in doc["errors"].items():
        errs.add_row(kind, str(e["n"]), f"{e['median_abs_error_pct']:.1f}", f"{e['p90_abs_error_pct']:.1f}",
                     f"{e['max_abs_error_pct']:.1f}")
    console.print(errs)
    console.print(f"wrote {path}", highlight=False)


@app.command("simulate")
def simulate(
    plan_file: Annotated[Path, typer.Argument(help="Plan JSON (from `thunderops plan --out`)", metavar="PLAN.json")],
    workload: Annotated[str | None, typer.Option("--workload", "-w", help="Preset (coding, conversation) or trace "
                                                 "CSV (default: the one the plan was made for)")] = None,
    rate: Annotated[float | None, typer.Option(help="Requests/s (default: the plan's --rate if it was made for "
                                                    "one, else the workload's own rate)")] = None,
    requests: Annotated[int, typer.Option("--requests", "-n", help="Requests to simulate")] = 2000,
    seed: Annotated[int, typer.Option(help="Random seed (runs are deterministic under a seed)")] = 0,
    ttft: Annotated[float | None, typer.Option(help="TTFT target, s (default: the plan's SLO, else 2)")] = None,
    tpot: Annotated[float | None, typer.Option(help="TPOT target, s (default: the plan's SLO, else 0.1)")] = None,
    attainment: Annotated[float | None, typer.Option(help="Share of requests that must meet both targets")] = None,
    find_goodput: Annotated[bool, typer.Option("--goodput", help="Also search the highest rate meeting the SLO")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
) -> None:
    """Simulate a plan under a workload: TTFT/TPOT/e2e percentiles, SLO attainment, tokens/s, goodput."""
    from thunderops.perf import PerfModel
    from thunderops.plan import Plan
    from thunderops.sim import goodput, slo_of
    from thunderops.sim import simulate as run_sim
    from thunderops.workload import check_rate, plan_workload

    if rate is not None:
        check_rate(rate)
    plan = Plan.load(plan_file)
    slo = slo_of(plan, ttft, tpot, attainment)
    wl = plan_workload(plan, workload)
    perf = PerfModel(plan.model)
    res = run_sim(plan, wl, slo, rate=rate, n=requests, seed=seed, perf=perf)
    summary = res.summary()
    summary["slo"] = {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s, "attainment": slo.attainment}
    if find_goodput:
        summary["goodput_rps"] = round(goodput(plan, wl, slo, n=min(requests, 2000), seed=seed, perf=perf), 3)
    if json_out:
        print_json(summary)
        return
    table = Table(title=f"simulated {res.requests} requests of {wl.name} at {res.rate:.2f} req/s "
                        f"through {plan_file.name} ({plan.total_gpus} GPUs)")
    table.add_column("latency, s")
    for col in ("p50", "p90", "p99"):
        table.add_column(col, justify="right")
    for which in ("ttft", "tpot", "e2e"):
        table.add_row(which.upper(), *(f"{summary[f'{which}_p{q}_s']:.3f}" for q in (50, 90, 99)))
    console.print(table)
    console.print(f"SLO attainment {res.attainment:.1%} (TTFT <= {slo.ttft_s}s and TPOT <= {slo.tpot_s}s; "
                  f"target {slo.attainment:.0%}); {res.output_tokens_per_s:,.0f} output tokens/s, "
                  f"{res.total_tokens_per_s:,.0f} total tokens/s; {res.rejected} rejected", highlight=False)
    if find_goodput:
        console.print(f"goodput: {summary['goodput_rps']} req/s meet the SLO target", highlight=False)
