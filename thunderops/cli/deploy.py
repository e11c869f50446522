"""`thunderops up`, `thunderops status`, `thunderops down`: plan, provision, hand over; look; tear down.

`up` runs the pipeline as clearly separated steps: plan -> provision -> netbench finalize -> serve -> controller.
Each step after provisioning is one function below, so the steps can change without touching the others.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from thunderops.cli.app import app, console, err_console, print_json, wait_until_stopped
from thunderops.cli.plan import (
    AttainmentOpt,
    BandwidthOpt,
    CloudsOpt,
    MaxReplicaNodesOpt,
    ModelOpt,
    RateOpt,
    RegionsOpt,
    SeedOpt,
    SloTpotOpt,
    SloTtftOpt,
    SpotOpt,
    TimeLimitOpt,
    WorkloadOpt,
    print_notes,
    replica_limit,
    split_list,
)
from thunderops.errors import ProvisionError, UserError
from thunderops.plan import Plan

DEFAULT_BUDGET = 13.54  # $/h: ThunderServe's cloud setup (32 GPUs), the default when no budget is given
PROVIDERS = ("skypilot", "local")



@app.command("up")
def up(
    budget: Annotated[float | None, typer.Option(help=f"$/h hard limit for all instances (default {DEFAULT_BUDGET}; "
                                                     "with --rate, a ceiling set from the rate)")] = None,
    model: ModelOpt = "llama-30b",
    workload: WorkloadOpt = "conversation",
    rate: RateOpt = None,
    slo_ttft: SloTtftOpt = None,
    slo_tpot: SloTpotOpt = None,
    attainment: AttainmentOpt = None,
    clouds: CloudsOpt = None,
    regions: RegionsOpt = None,
    spot: SpotOpt = None,
    inventory: Annotated[Path | None, typer.Option(help="YAML of GPUs you already have (implies --provider local)")] = None,
    bandwidth: BandwidthOpt = None,
    seed: SeedOpt = 0,
    time_limit: TimeLimitOpt = 60.0,
    max_replica_nodes: MaxReplicaNodesOpt = None,
    plan_file: Annotated[Path | None, typer.Option("--plan", help="Use this plan JSON instead of planning")] = None,
    provider: Annotated[str | None, typer.Option(help="skypilot (clouds) or local (your machines, Ray)")] = None,
    emulate: Annotated[bool, typer.Option(help="Local provider: Ray nodes on this machine with declared GPUs, "
                                                "engine emulators instead of vLLM")] = False,
    ray_address: Annotated[str | None, typer.Option(help="Local provider: attach to this Ray cluster")] = None,
    name: Annotated[str | None, typer.Option(help="Deployment name (lower-case letters and digits)")] = None,
    dry_run: Annotated[bool, typer.Option(help="Print the plan, the SkyPilot tasks and the $/h; provision nothing")] = False,
    keep_partial: Annotated[bool, typer.Option(help="If the plan cannot be met, keep the nodes that came up")] = False,
    launch_timeout: Annotated[float, typer.Option(help="Seconds one node's launch may take before it is replaced",
                                                  min=1)] = 1800.0,
    max_replans: Annotated[int, typer.Option(help="When a GPU type cannot be had anywhere within the budget, plan "
                                                  "again without the offers that failed, at most this often (0: "
                                                  "give up at once)")] = 2,
    pip_spec: Annotated[str | None, typer.Option(help="What nodes pip-install instead of a wheel of this thunderops "
                                                    "(a git URL, an index name)")] = None,
    serve: Annotated[bool, typer.Option("--serve/--no-serve", help="Start engines and router after provisioning")] = True,
    max_spend: Annotated[float | None, typer.Option(help="Total $ the controller may spend before it tears the "
                                                         "deployment down")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the outcome as JSON")] = False,
) -> None:
    """Plan a deployment under a $/h budget, provision it (SkyPilot or your own machines), then measure the
    network, start serving and the controller. `--dry-run` shows what would be rented and run, offline."""
    provider = provider or ("local" if (inventory or emulate or ray_address) else "skypilot")
    if provider not in PROVIDERS:
        raise ProvisionError(f"unknown provider {provider!r}: use --provider skypilot or --provider local")
    if provider == "skypilot" and (emulate or ray_address):
        raise ProvisionError("--emulate and --ray-address are for the local provider; add --provider local")
    if budget is not None and budget <= 0:
        raise ProvisionError(f"--budget must be a positive $/h amount, got {budget:g}")
    if max_replans < 0:
        raise ProvisionError(f"--max-replans must be 0 or more, got {max_replans}")
    if max_spend is not None and max_spend <= 0:
        raise ProvisionError(f"--max-spend must be a positive $ amount, got {max_spend:g}")
    if name is not None:
        from thunderops.state import check_deployment_id

        check_deployment_id(name)
    if pip_spec:  # before planning: a local path the nodes cannot read fails now, not after a minute of search
        from thunderops.provision.package import resolve_pip_spec

        resolve_pip_spec(pip_spec)

    plan = plan_step(budget=budget, model=model, workload=workload, rate=rate, slo_ttft=slo_ttft, slo_tpot=slo_tpot,
                     attainment=attainment, clouds=split_list(clouds), regions=split_list(regions), spot=spot,
                     inventory=inventory, bandwidth=bandwidth, seed=seed, time_limit=time_limit, plan_file=plan_file,
                     max_replica_nodes=max_replica_nodes, quiet=json_out)
    if provider == "skypilot":
        check_offers(plan)
    if dry_run:
        dry_run_step(plan, provider, name or "dryrun", pip_spec, json_out)
        return

    if serve and (problem := servable(plan)) is not None:
        raise ProvisionError(f"the engines cannot start on this plan ({problem}); nothing was rented")
    dep = name or _new_name()
    prov = _provider(provider, emulate=emulate, ray_address=ray_address, launch_timeout=launch_timeout,
                     pip_spec=pip_spec, quiet=json_out, max_replans=max_replans)
    if provider == "skypilot":
        prov.check(plan)  # budget and credentials, before anything is written or launched
        prov.package(dep)  # the thunderops wheel the nodes install (unless --pip-spec), before anything is recorded
    result = provision_step(dep, plan, prov, provider, keep_partial,
                            replan=replanner(serve) if provider == "skypilot" and max_replans > 0 else None)
    if not result.ok and result.unavailable:  # no capacity for a GPU type, even after re-planning: one line, exit 2
        raise ProvisionError(f"provisioning failed: {result.message}; " + (
            f"kept what came up (--keep-partial): `thunderops down {dep}` when done" if keep_partial and result.nodes
            else "everything launched was torn down"))
    if not result.ok:
        err_console.print(f"[bold red]provisioning failed:[/] {result.message}", highlight=False, soft_wrap=True)
        err_console.print("everything launched was torn down" if not keep_partial else
                          f"kept what came up (--keep-partial): `thunderops down {dep}` when done", highlight=False)
        raise typer.Exit(1)
    handover: dict[str, Any] = {"deployment": dep, "provider": provider, "plan_version": result.plan_version,
                                "cost_per_hour": result.plan.cost_per_hour, "nodes": [n.host for n in result.nodes],
                                "replans": result.replans}
    if serve:
        try:
            netbench_step(dep, result, provider, emulate, json_out)
            handover.update(serve_step(dep, prov, provider, emulate))
            controller_step(dep, handover, max_spend)
        except (UserError, OSError) as e:
            prov.store.add_event(dep, "serve-failed", str(e).splitlines()[0] if str(e) else type(e).__name__)
            err_console.print(f"[bold red]serving did not start:[/] {e}", highlight=False, soft_wrap=True)
            _stop_pids([handover.get("router_pid"), handover.get("controller_pid")])
            if provider == "local" and not ray_address:
                prov.down(dep)  # its Ray nodes live only as long as this process
                err_console.print(f"deployment {dep} torn down", highlight=False)
            else:
                err_console.print(f"the nodes are up and billing {result.plan.cost_per_hour:.2f} $/h: "
                                  f"`thunderops down {dep}` to stop", highlight=False)
            raise typer.Exit(1) from None
    if json_out:
        print_json({k: v for k, v in handover.items() if k != "engine_launcher"})  # it holds the engines' key
    else:
        console.print(f"deployment [bold]{dep}[/] up: {len(result.nodes)} node(s), "
                      f"{result.plan.cost_per_hour:.2f} $/h (budget {result.plan.budget_per_hour:.2f} $/h); "
                      f"`thunderops status {dep}`, `thunderops down {dep}`", highlight=False)
    if provider == "local" and not ray_address:
        _foreground(dep, prov, handover, quiet=json_out)


# --------------------------------------------------------------------------------------------- the steps


def plan_step(*, budget, model, workload, rate, slo_ttft, slo_tpot, attainment, clouds, regions, spot, inventory,
              bandwidth, seed, time_limit, plan_file, quiet, max_replica_nodes=None) -> Plan:
    """A plan from --plan FILE, else from the scheduler (offline, from the shipped catalogs)."""
    if plan_file is not None:
        plan = Plan.load(plan_file)
        if budget is not None:
            if plan.cost_per_hour > budget + 1e-9:
                raise ProvisionError(f"--budget {budget:.2f} $/h is below the plan's {plan.cost_per_hour:.2f} $/h; "
                                     "raise it or re-plan with `thunderops plan --budget`")
            plan.budget_per_hour = budget
        return plan
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from thunderops.scheduler import solve

    default_budget = budget is None and inventory is None and rate is None  # a rate: solve sets a ceiling from it
    if default_budget:
        budget = DEFAULT_BUDGET
    label = f"planning for {DEFAULT_BUDGET} $/h (no --budget given)" if default_budget else "planning"
    with Progress(TextColumn(f"[bold]{label}"), BarColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=err_console, transient=True, disable=quiet or not err_console.is_terminal) as bar:
        task = bar.add_task("", total=1.0)
        result = solve(budget, model, workload, rate=rate, slo_ttft=slo_ttft, slo_tpot=slo_tpot, attainment=attainment,
                       clouds=clouds, regions=regions, spot=spot, inventory=inventory, bandwidth=bandwidth, seed=seed,
                       time_limit=time_limit, **replica_limit(max_replica_nodes),
                       progress=lambda f, m: bar.update(task, completed=min(1.0, f), description=m))
    if default_budget and not quiet:  # after planning, so that bad input stays one line
        err_console.print(f"no --budget given: planned for {DEFAULT_BUDGET} $/h", highlight=False)
    if not quiet:
        print_notes(result.plan)
    return result.plan


def check_offers(plan: Plan) -> None:
    """Every instance of a cloud plan names a cloud and region our catalog (and SkyPilot) knows."""
    from thunderops.catalog import load_offers
    from thunderops.errors import suggest

    offers = load_offers()
    clouds = set(offers["cloud"])
    for inst in plan.instances:
        if inst.cloud not in clouds:
            raise ProvisionError(f"instance {inst.id}: unknown cloud {inst.cloud!r}{suggest(inst.cloud, clouds)}; "
                                 f"known: {', '.join(sorted(clouds))}")
        regions = set(offers.loc[offers["cloud"] == inst.cloud, "region"])
        if inst.region not in regions:
            raise ProvisionError(f"instance {inst.id}: unknown {inst.cloud} region {inst.region!r}"
                                 f"{suggest(inst.region, regions)}; `thunderops catalog list --cloud {inst.cloud}`")


def dry_run_step(plan: Plan, provider: str, dep: str, pip_spec: str | None, json_out: bool) -> None:
    """Show the plan, what would be launched and the $/h. Writes nothing: no state, no token, no cluster."""
    from thunderops.provision.skypilot import sky_zone
    from thunderops.provision.tasks import accelerator_names, cluster_name, engine_task, render, router_task

    tasks: dict[str, str] = {}
    problem = servable(plan)
    if provider == "skypilot" and problem is None:
        from thunderops.provision.package import resolve_pip_spec, wheel_name
        from thunderops.state import default_home

        # shown, not built: `up` builds this wheel of the running thunderops (or ships --pip-spec's) to every node
        pip_spec, shipped = resolve_pip_spec(pip_spec)
        wheel = shipped or (None if pip_spec else default_home() / "deployments" / dep / wheel_name())
        accel = accelerator_names(plan)
        for inst in plan.instances:
            name = cluster_name(dep, inst.id, 1)
            shown = Plan.from_dict(plan.to_dict()).instance(inst.id)
            shown.zone = sky_zone(inst)
            cfg = engine_task(plan, shown, deployment=dep, node_id=name, cluster=name, accelerator=accel[inst.id],
                              pip_spec=pip_spec, agent_token="<made at launch>", engine_key="<made at launch>",
                              agent_tls=("<made at launch>", "<made at launch>"), wheel=wheel)
            tasks[name] = render(cfg)
        addressed = Plan.from_dict(plan.to_dict())  # engine URLs name the node each is on, known only once up
        for inst in addressed.instances:
            inst.host = inst.host or f"<{inst.id} address>"
        router = router_task(addressed, deployment=dep, plan_path="<the deployment's plan.json>",
                             api_key="<made at launch>", pip_spec=pip_spec, wheel=wheel,
                             engine_cert="<the deployment's certificate, made at launch>")
        tasks[router["name"]] = render(router)
    if json_out:
        print_json({"dry_run": True, "provider": provider, "plan": plan.to_dict(), "skypilot_tasks": tasks,
                    "cost_per_hour": plan.cost_per_hour, "budget_per_hour": plan.budget_per_hour,
                    "problem": problem})
        return
    from thunderops.cli.plan import render as render_plan

    render_plan(plan)
    for name, text in tasks.items():
        console.rule(f"SkyPilot task: {name}")
        console.print(text, highlight=False, markup=False, soft_wrap=True)
    if problem is not None:
        err_console.print(f"[yellow]warning:[/] the engines cannot start on this plan: {problem}; `up` would "
                          "refuse it before renting anything", highlight=False, soft_wrap=True)
    if provider == "local":
        console.print(f"local provider: {len(plan.instances)} Ray node(s) with declared GPUs: "
                      + ", ".join(f"{i.id} ({i.gpus}x{i.gpu})" for i in plan.instances), highlight=False)
    console.print(f"dry run: nothing provisioned. {plan.cost_per_hour:.2f} $/h for {len(plan.instances)} instance(s) "
                  f"({plan.total_gpus} GPUs), budget {plan.budget_per_hour:.2f} $/h", highlight=False)


def servable(plan: Plan) -> str | None:
    """Why the serving step could not start engines on this plan (None when it can)."""
    from thunderops.serve.vllm import engine_commands

    try:
        engine_commands(plan)
    except UserError as e:
        return str(e)
    return None


def provision_step(dep: str, plan: Plan, prov: Any, provider: str, keep_partial: bool, replan: Any = None):
    """Record the deployment and its plan, then bring the nodes up (intent and outcome go to the store). With
    `replan`, a GPU type that cannot be had is planned around (see `SkyPilotProvider.up`)."""
    from thunderops.state import Store

    store = prov.store if hasattr(prov, "store") else Store()
    store.create_deployment(dep, provider=provider, model=plan.model, budget_per_hour=plan.budget_per_hour,
                            meta={"keep_partial": keep_partial})
    store.add_plan(dep, plan, reason="thunderops up")
    if replan is not None:
        return prov.up(dep, plan, keep_partial=keep_partial, replan=replan)
    return prov.up(dep, plan, keep_partial=keep_partial)


def replanner(serve: bool) -> Callable[..., Plan]:
    """What `up` re-plans with when a GPU type cannot be had: `thunderops.scheduler.replan` (same budget,
    SLOs, model, workload, clouds/regions and --max-replica-nodes as the plan, without the blocked offers),
    refusing a plan the engines could not start."""

    def again(plan: Plan, blocked: Any, clouds: Any = None) -> Plan:
        from thunderops.scheduler import replan

        new = replan(plan, blocked, clouds=clouds)
        if serve and (problem := servable(new)) is not None:
            raise ProvisionError(f"the engines cannot start on the new plan ({problem})")
        return new

    return again


def netbench_step(dep: str, result: Any, provider: str, emulate: bool, quiet: bool) -> None:
    """Measure the links between the nodes' agents and re-plan on them (needs two or more nodes with agents)."""
    if len(result.nodes) < 2 or (provider == "local" and emulate):
        return  # emulated nodes run no agents: the plan keeps its assumed bandwidth
    try:
        from thunderops.netbench import measure_and_finalize
    except ImportError:
        return
    measure_and_finalize(dep, console=None if quiet else console)


def serve_step(dep: str, prov: Any, provider: str, emulate: bool) -> dict[str, Any]:
    """Engines on the nodes, then the router on this machine; returns where the router listens."""
    from thunderops.serve import _spawn, free_port, serve_module_argv, wait_healthy
    from thunderops.serve.router import RoutingTable
    from thunderops.state import default_home

    store = prov.store
    plan = store.latest_plan(dep)
    nodes = {n.instance_id: n for n in prov.status(dep) if n.status == "ready"}
    engine_key = secrets.token_urlsafe(16)
    if provider == "local":
        from thunderops.controller import RayEmulators

        if not emulate:
            raise ProvisionError("real vLLM engines on local Ray nodes are started with `thunderops serve local "
                                 "--vllm`; use --emulate here or --no-serve")
        launcher = RayEmulators(prov.ray_address(dep), engine_key=engine_key)
        engines = {"kind": "ray-emulators", "address": launcher.address, "engine_key": engine_key,
                   "speedup": launcher.speedup}
    else:
        from thunderops.agent import deployment_token
        from thunderops.controller import NodeEngines
        from thunderops.provision.tasks import engine_key_name

        engine_key = deployment_token(engine_key_name(dep), create=False)  # the nodes' VLLM_API_KEY
        launcher = NodeEngines()
        engines = {"kind": "node"}
    urls = launcher.start(dep, plan, [g.id for g in plan.groups], nodes)
    workdir = default_home() / "deployments" / dep
    workdir.mkdir(parents=True, exist_ok=True)
    table = workdir / "routing.json"
    table.write_text(json.dumps(RoutingTable.from_plan(plan, urls).to_dict()))
    port = free_port("127.0.0.1")
    api_key = f"tok-{secrets.token_urlsafe(24)}"
    log = workdir / "router.log"
    argv = serve_module_argv("router", "--routing", str(table), "--model", plan.model, "--host", "127.0.0.1",
                             "--port", str(port), "--usage-db", str(store.path), "--deployment", dep)
    if any(u.startswith("https:") for u in urls.values()):  # engines on HTTPS: the router trusts their one cert
        from thunderops.agent import deployment_tls

        pair = deployment_tls(dep, create=False)
        cert = workdir / "engine-cert.pem"  # the certificate only (public); its key stays in the pair's file
        cert.write_text(pair[0] if pair else "")
        argv += ["--engine-cert", str(cert)]
    pid = _spawn(argv, {"THUNDEROPS_API_KEY": api_key, "THUNDEROPS_ENGINE_KEY": engine_key}, log)
    wait_healthy(f"http://127.0.0.1:{port}", pid, 60, str(log))
    store.add_event(dep, "serving", f"router at http://127.0.0.1:{port}/v1", {"router_pid": pid, "engines": urls})
    return {"endpoint": f"http://127.0.0.1:{port}/v1", "api_key": api_key, "router_pid": pid,
            "router_url": f"http://127.0.0.1:{port}", "engines": urls, "engine_launcher": engines}


def controller_step(dep: str, handover: dict[str, Any], max_spend: float | None = None) -> None:
    """Start the controller (`thunderops watch`) in the background, where it lands."""
    try:
        from thunderops.controller import start_background
    except ImportError:
        return
    from thunderops.state import Store

    # The controller restarts engines on replacement nodes the way serve_step started them.
    pid = start_background(dep, router_url=handover.get("router_url"), admin_key=handover.get("api_key"),
                           engines=handover.get("engine_launcher"), max_spend=max_spend)
    handover["controller_pid"] = pid
    Store().add_event(dep, "controller-started", f"thunderops watch {dep} (pid {pid})", {"controller_pid": pid})


def _foreground(dep: str, prov: Any, handover: dict[str, Any], quiet: bool = False) -> None:
    """Ray nodes started here live as long as this process: serve until Ctrl-C, then tear down."""
    (err_console if quiet else console).print(f"serving at {handover.get('endpoint', '-')} (api key {handover.get('api_key', '-')}); "
                  "Ctrl-C tears the deployment down", highlight=False)
    if quiet:  # --json: stdout holds one JSON document. Ray's driver prints cluster errors (a lost node's
        # "Raylet is terminated") to sys.stdout from a thread of its own for as long as this process lives
        sys.stdout.flush()
        sys.stdout = sys.stderr
    prov.store.add_event(dep, "foreground", f"`thunderops up` holds the local nodes (pid {os.getpid()})",
                         {"up_pid": os.getpid()})  # so `thunderops down` from another shell can end it
    try:
        wait_until_stopped()
    finally:
        _stop_pids([handover.get("router_pid"), handover.get("controller_pid")])
        prov.down(dep)


def _stop_pids(pids: list[int | None]) -> None:
    from thunderops.serve import stop_pids

    stop_pids([p for p in pids if p])


def _new_name() -> str:
    return "d" + secrets.token_hex(3)


def _provider(name: str, *, emulate: bool = False, ray_address: str | None = None, launch_timeout: float = 1800.0,
              pip_spec: str | None = None, quiet: bool = False, max_replans: int = 2):
    from thunderops.provision import get_provider

    if name == "skypilot":
        return get_provider(name, console=None if quiet else console, launch_timeout_s=launch_timeout,
                            pip_spec=pip_spec, max_replans=max_replans)
    return get_provider(name, emulate=emulate, address=ray_address)


# ------------------------------------------------------------------------------------------ status / down


@app.command("status")
def status(
    deployment: Annotated[str | None, typer.Argument(help="Deployment name (default: all)")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
) -> None:
    """Deployments, their nodes and state, uptime, $/h now and $ spent so far."""
    from thunderops.state import Store, default_db_path

    if deployment is None and not default_db_path().exists():
        console.print("no deployments yet (`thunderops up` makes one)")
        return
    store = Store()
    deps = [store.deployment(deployment)] if deployment else store.deployments()
    now = datetime.now(UTC)
    rows = []
    for d in deps:
        recs = store.nodes(d.id)
        live = {n.id: n.status for n in _provider_status(d, store)} if deployment else {}
        for r in recs:
            rows.append({"deployment": d.id, "node": r.id, "instance": r.instance_id, "cluster": r.cluster_name,
                         "cloud": r.cloud, "where": "/".join(x for x in (r.region, r.zone) if x and x != "local"),
                         "type": r.instance_type, "gpus": f"{r.gpus}x{r.gpu}", "spot": r.spot,
                         "status": live.get(r.id, r.status), "host": r.host, "uptime_h": r.hours(now),
                         "price_per_hour": r.price_per_hour, "spend": r.spend(now)})
    summary = [{"deployment": d.id, "status": d.status, "provider": d.provider, "model": d.model,
                "created_at": d.created_at, "budget_per_hour": d.budget_per_hour,
                "cost_per_hour": store.cost_per_hour(d.id), "spend": store.spend(d.id, now)} for d in deps]
    if json_out:
        print_json({"deployments": summary, "nodes": rows})
        return
    t = Table(title="deployments ($/h: nodes running now; $: spent so far on all nodes)")
    for col in ("deployment", "status", "provider", "model", "created (UTC)", "$/h now", "budget $/h", "spent $"):
        t.add_column(col, justify="right" if "$" in col else "left")
    for s in summary:
        t.add_row(s["deployment"], s["status"], s["provider"], s["model"], s["created_at"][:19],
                  f"{s['cost_per_hour']:.2f}", f"{s['budget_per_hour'] or 0:.2f}", f"{s['spend']:.4f}")
    console.print(t)
    if rows:
        n = Table(title="nodes")
        for col in ("deployment", "instance", "cluster", "where", "GPUs", "pricing", "status", "host", "uptime",
                    "$/h", "spent $"):
            n.add_column(col, justify="right" if col in ("$/h", "spent $", "uptime") else "left")
        for r in rows:
            n.add_row(r["deployment"], r["instance"], r["cluster"][:28], r["where"], r["gpus"],
                      "spot" if r["spot"] else "on-demand", r["status"], r["host"] or "-",
                      f"{r['uptime_h'] * 60:.1f} min", f"{r['price_per_hour']:.3f}", f"{r['spend']:.4f}")
        console.print(n)


def stop_processes(store: Any, deployment: str) -> list[int]:
    """Stop the router and controller processes `up` started for the deployment on this machine, and a
    foreground `up` holding local nodes (all recorded as events), checking each pid still runs thunderops
    so a reused pid is left alone."""
    from thunderops.serve import stop_pids

    pids, ups = [], []
    for e in store.events(deployment):
        for key in ("router_pid", "controller_pid", "up_pid"):
            pid = e.payload.get(key)
            if isinstance(pid, int) and pid != os.getpid() and _runs_thunderops(pid):
                (ups if key == "up_pid" else pids).append(pid)
    stop_pids(pids)
    for pid in ups:  # SIGTERM only: it tears its nodes down itself (and this `down` does too)
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    return pids + ups


def _runs_thunderops(pid: int) -> bool:
    try:
        return b"thunderops" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _provider_status(dep: Any, store: Any) -> list:
    """The provider's live view where it can give one cheaply (else the store's)."""
    from thunderops.provision import get_provider

    if not dep.provider or not store.nodes(dep.id, live_only=True):
        return []
    try:
        return get_provider(dep.provider, store=store).status(dep.id)
    except UserError:
        raise
    except Exception as e:  # a cloud API hiccup must not hide the store's view
        err_console.print(f"[yellow]warning:[/] {dep.provider} status unavailable ({type(e).__name__}); "
                          "showing the last recorded state", highlight=False)
        return []


@app.command("down")
def down(
    deployment: Annotated[str | None, typer.Argument(help="Deployment name")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Every deployment, and every thunderops cluster SkyPilot lists")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
) -> None:
    """Tear down a deployment (idempotent). Reconciles with SkyPilot's own cluster list, so clusters that were
    launched but never recorded (a crash between launch and record) are found and torn down too."""
    from thunderops.provision import get_provider
    from thunderops.state import Store

    if (deployment is None) == (not all_):
        raise UserError("give a DEPLOYMENT or --all (`thunderops status` lists deployments)")
    store = Store()
    results = []
    if all_:
        for d in store.deployments():
            stop_processes(store, d.id)
        providers = {d.provider for d in store.deployments()} | {"skypilot"}
        for name in sorted(p for p in providers if p in PROVIDERS):
            results.append(get_provider(name, store=store).down(None))
    else:
        dep = store.deployment(deployment)  # unknown -> one line, exit 2 (intent is recorded before any launch)
        name = dep.provider if dep.provider in PROVIDERS else "skypilot"
        stop_processes(store, deployment)
        results.append(get_provider(name, store=store).down(deployment))
    out = {"terminated": [c for r in results for c in r.terminated],
           "unrecorded": [c for r in results for c in r.unrecorded],
           "failed": {k: v for r in results for k, v in r.failed.items()}}
    if json_out:
        print_json(out)
    else:
        console.print(f"terminated {len(out['terminated'])} node(s)"
                      + (f", of which {len(out['unrecorded'])} unrecorded: {', '.join(out['unrecorded'])}"
                         if out["unrecorded"] else ""), highlight=False)
    if out["failed"]:
        err_console.print("[bold red]could not terminate:[/] " + "; ".join(f"{k}: {v}" for k, v in out["failed"].items()),
                          highlight=False, soft_wrap=True)
        raise typer.Exit(1)
