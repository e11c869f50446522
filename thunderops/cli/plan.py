"""`thunderops plan`: find the GPU mix, groups, phases, parallelism and routing under a $/h budget."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from thunderops.cli.app import app, console, err_console, output_file, print_json

# Planning options shared by `thunderops plan` and `thunderops up` (one definition, one help text).
ModelOpt = Annotated[str, typer.Option("--model", help="Model name (`thunderops catalog models`) or a HF config.json")]
WorkloadOpt = Annotated[str, typer.Option("--workload", help="coding, conversation, or a trace CSV")]
RateOpt = Annotated[float | None, typer.Option("--rate", help="Target req/s: find the cheapest plan that serves it")]
SloTtftOpt = Annotated[float | None, typer.Option("--slo-ttft", help="Time-to-first-token target, s (default 2)")]
SloTpotOpt = Annotated[float | None, typer.Option("--slo-tpot", help="Time-per-output-token target, s (default 0.1)")]
AttainmentOpt = Annotated[float | None, typer.Option("--attainment",
                                                    help="Share of requests that must meet the SLO (default 0.9)")]
CloudsOpt = Annotated[str | None, typer.Option("--clouds", help="Comma-separated clouds to rent from")]
RegionsOpt = Annotated[str | None, typer.Option("--regions", help="Comma-separated regions")]
SpotOpt = Annotated[bool | None, typer.Option("--spot/--no-spot", help="Spot only / on-demand only (default: either)")]
BandwidthOpt = Annotated[Path | None, typer.Option("--bandwidth", help="Measured Gbps between instances (JSON or CSV)")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Search seed (same seed, same plan)")]
TimeLimitOpt = Annotated[float, typer.Option("--time-limit", help="Seconds for the whole planning: baselines, search and the simulator check (skipped, with a note, where it does not fit)")]
MaxReplicaNodesOpt = Annotated[int | None, typer.Option(
    "--max-replica-nodes", help="Most instances one replica's pipeline may span (default 4)", min=1)]


def replica_limit(value: int | None) -> dict:
    """solve()'s keyword for --max-replica-nodes: absent means the scheduler's default."""
    return {} if value is None else {"max_replica_nodes": value}


def split_list(value: str | None) -> list[str] | None:
    """`a, b,c` -> ["a", "b", "c"]; None or empty -> None."""
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


@app.command("plan")
def plan_cmd(
    budget: Annotated[float | None, typer.Option(help="$/h for all instances (optional with --inventory or --rate)")] = None,
    model: ModelOpt = "llama-30b",
    workload: WorkloadOpt = "conversation",
    rate: RateOpt = None,
    slo_ttft: SloTtftOpt = None,
    slo_tpot: SloTpotOpt = None,
    attainment: AttainmentOpt = None,
    clouds: CloudsOpt = None,
    regions: RegionsOpt = None,
    spot: SpotOpt = None,
    inventory: Annotated[Path | None, typer.Option(help="YAML of GPUs you already have (see docs/scheduler.md)")] = None,
    bandwidth: BandwidthOpt = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the plan as JSON")] = False,
    out: Annotated[Path | None, typer.Option(help="Write the plan JSON here")] = None,
    compare: Annotated[bool, typer.Option(help="Show the baselines' plans side by side")] = False,
    seed: SeedOpt = 0,
    time_limit: TimeLimitOpt = 60.0,
    max_replica_nodes: MaxReplicaNodesOpt = None,
) -> None:
    """Plan a deployment: instances to rent, model replicas with phase and parallelism, routing, predicted goodput."""
    from thunderops.scheduler import solve

    out = output_file(out)
    quiet = json_out or not console.is_terminal
    with Progress(TextColumn("[bold]searching"), BarColumn(), TextColumn("{task.description}"),
                  TimeElapsedColumn(), console=err_console, transient=True, disable=quiet) as bar:
        task = bar.add_task("", total=1.0)

        def progress(fraction: float, message: str) -> None:
            bar.update(task, completed=min(1.0, fraction), description=message)

        result = solve(budget, model, workload, rate=rate, slo_ttft=slo_ttft, slo_tpot=slo_tpot,
                       attainment=attainment, clouds=split_list(clouds), regions=split_list(regions), spot=spot,
                       inventory=inventory, bandwidth=bandwidth, seed=seed, time_limit=time_limit,
                       progress=progress, **replica_limit(max_replica_nodes))
    plan = result.plan
    if out is not None:
        plan.save(out)
    if json_out:
        data = plan.to_dict()
        if compare:
            data = {"plan": data, "baselines": {k: p.to_dict() for k, p in result.baselines.items()}}
        print_json(data)
        return
    render(plan)
    render_comparison(plan, result.baselines, detailed=compare)
    console.print(f"searched {result.evaluations} candidates in {result.seconds:.1f} s"
                  + (f"; plan written to {out}" if out else ""), highlight=False)


def render(plan) -> None:
    """Instances, groups, routing and the prediction, as Rich tables."""
    inputs = plan.inputs
    from_rate = inputs.get("rate") and inputs.get("budget_per_hour") is None and not inputs.get("inventory")
    limit = "ceiling set from --rate" if from_rate else "budget"
    inst = Table(title=f"instances: {plan.cost_per_hour:.2f} $/h of a {plan.budget_per_hour:.2f} $/h {limit}")
    for col in ("id", "where", "type", "GPUs", "pricing", "$/h"):
        inst.add_column(col, justify="right" if col in ("GPUs", "$/h") else "left")
    for i in plan.instances:
        inst.add_row(i.id, f"{i.cloud}/{i.region}" + (f"/{i.zone}" if i.zone else ""), i.instance_type,
                     f"{i.gpus}x{i.gpu}", "spot" if i.spot else "on-demand", f"{i.price_per_hour:.3f}")
    console.print(inst)
    sources = sorted({f"{i.source} ({i.as_of})" if i.as_of else i.source for i in plan.instances})
    console.print("prices ($/h per node): " + "; ".join(sources), highlight=False)
    if inputs.get("not_servable") and inputs.get("inventory"):
        err_console.print(f"[yellow]warning:[/] {'; '.join(inputs['not_servable'].values())}: run engines there "
                          "with a vLLM build of your own (`up --pip-spec`)", highlight=False)
    elif inputs.get("not_servable"):
        console.print(f"[dim]not considered: {'; '.join(inputs['not_servable'].values())}[/]", highlight=False)
    grp = Table(title="replicas (groups)")
    for col in ("group", "phase", "GPUs", "TP", "PP", "layers", "stages"):
        grp.add_column(col)
    for g in plan.groups:
        stages = ", ".join(f"{s.instance}[{','.join(map(str, s.gpu_ids))}]" for s in g.stages)
        grp.add_row(g.id, g.phase, str(g.gpus), "/".join(str(s.tp) for s in g.stages), str(g.pp),
                    "/".join(map(str, g.layer_split)), stages)
    console.print(grp)
    rt = Table(title="routing (share of requests)")
    for col in ("prefill", "decode", "share", "KV transfer"):
        rt.add_column(col)
    for r in sorted(plan.routing, key=lambda r: -r.fraction):
        kv = "in place" if r.prefill == r.decode else ("raw" if r.kv_compression >= 1 else
                                                       f"compressed x{r.kv_compression:g}")
        rt.add_row(r.prefill, r.decode, f"{r.fraction:.1%}", kv)
    console.print(rt)
    console.print(f"KV connector: {_connector_note(plan)}", highlight=False)
    p = plan.predicted
    slo = plan.inputs.get("slo", {})
    console.print(
        f"predicted ({p.method}): goodput [bold]{p.goodput_rps:.2f} req/s[/] ({p.tokens_per_s:.0f} output tok/s) "
        f"at {slo.get('attainment', 0):.0%} within TTFT {slo.get('ttft_s')} s / TPOT {slo.get('tpot_s')} s; "
        f"{'simulated at ' + format(plan.inputs.get('rate') or p.goodput_rps, '.2f') + ' req/s' if p.method == 'sim' else 'at light load'}: "
        f"TTFT p50 {p.ttft_p50:.3f} s p90 {p.ttft_p90:.3f} s, TPOT p50 {p.tpot_p50 * 1000:.1f} ms "
        f"p90 {p.tpot_p90 * 1000:.1f} ms; "
        f"{plan.cost_per_hour:.2f} $/h for the instances above", highlight=False)
    print_notes(plan)
    if plan.inputs.get("rate") and not plan.inputs.get("rate_met", True):
        err_console.print(f"[yellow]warning:[/] no plan within the budget serves {plan.inputs['rate']} req/s; "
                          "this is the most goodput it buys", highlight=False)


def print_notes(plan) -> None:
    """Say on stderr what the plan's figures leave out: requests beyond the model's context
    (`inputs.beyond_context`), and what the time limit cut short: the baselines' scans (`inputs.baselines_cut`),
    the simulator check (`inputs.sim_check`)."""
    beyond = plan.inputs.get("beyond_context")
    if beyond:
        err_console.print(
            f"[yellow]warning:[/] {beyond['share']:.1%} of the {plan.inputs.get('workload')} workload's requests are "
            f"longer than {plan.model}'s {beyond['max_position']:,}-token context: vLLM will reject them, and the "
            "plan's figures count them as served; pick a longer-context model or a workload that fits",
            highlight=False)
    for name, how in (plan.inputs.get("baselines_cut") or {}).items():
        err_console.print(f"[yellow]note:[/] baseline {name}: {how} (raise --time-limit "
                          "for the whole comparison)", highlight=False)
    if plan.inputs.get("sim_check"):
        err_console.print(f"[yellow]note:[/] simulator check {plan.inputs['sim_check']}", highlight=False)


def _connector_note(plan) -> str:
    """The deployment's vLLM KV connector and why (serve.vllm.kv_transfer)."""
    from thunderops.errors import PlanError
    from thunderops.serve.vllm import LMCACHE, NIXL_PUSH, kv_transfer

    try:
        conn = kv_transfer(plan)
    except PlanError as e:
        return f"none usable ({e})"
    why = {NIXL_PUSH: "NIXL's push mode: a replica pipelines, which only it sends from",
           LMCACHE: "LMCache: KV is compressed for transfer"}.get(conn, "NIXL's pull mode")
    return f"{conn} ({why})"


def render_comparison(plan, baselines: dict, detailed: bool = False) -> None:
    """Baselines next to ours: with a budget, goodput over theirs; with a target rate, the $/h each needs for
    it (a baseline missing the rate is marked so, not compared by cost). `detailed` first shows each baseline's
    plan as `render` shows ours."""
    from thunderops.scheduler.check import serves_rate

    rate = plan.inputs.get("rate")
    title = (f"baselines: serving {rate:g} req/s, same perf model and simulator" if rate else
             "baselines: same budget, same perf model and simulator")
    table = Table(title=title)
    last = "ours costs" if rate else "vs ours"
    for col in ("strategy", "goodput req/s", "$/h", "GPUs", "req/s per $/h", last):
        table.add_column(col, justify="left" if col == "strategy" else "right")
    rows = [("thunderops (ours)", plan)] + [(k, p) for k, p in baselines.items()]
    ours = plan.predicted.goodput_rps
    for name, p in rows:
        g = p.predicted.goodput_rps
        if rate:  # the cheapest plan serving the rate wins
            serves = serves_rate(p, rate)
            vs = f"{plan.cost_per_hour / p.cost_per_hour:.2f}x" if serves and p.cost_per_hour else "misses rate"
        else:
            vs = f"{ours / g:.2f}x" if g > 0 else "-"
        table.add_row(name, f"{g:.2f}", f"{p.cost_per_hour:.2f}", str(p.total_gpus),
                      f"{g / p.cost_per_hour:.3f}" if p.cost_per_hour else "-", vs)
    if detailed:  # each baseline's plan in full, then the side-by-side table, so the output ends on the verdict
        for name, p in baselines.items():
            console.rule(f"baseline: {name}")
            render(p)
        console.rule()
    console.print(table)
