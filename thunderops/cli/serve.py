"""`thunderops serve ...`: vLLM command lines, the router, the engine emulator, a local deployment."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Annotated

import typer

from thunderops.cli.app import console, err_console, print_json, sub_app, wait_until_stopped
from thunderops.errors import UserError

serve_app = sub_app("serve", "Serve a plan: vLLM command lines, the P/D router, the engine emulator.")

PlanArg = Annotated[Path, typer.Argument(help="Plan JSON (from `thunderops plan --out`)")]
SslCertOpt = Annotated[Path | None, typer.Option(help="Serve HTTPS with this PEM certificate (as vLLM)")]
SslKeyOpt = Annotated[Path | None, typer.Option(help="... and this PEM key")]


@serve_app.command("commands")
def commands(
    plan: PlanArg,
    gpu_memory_utilization: Annotated[float, typer.Option(help="vLLM --gpu-memory-utilization")] = 0.9,
    max_model_len: Annotated[int | None, typer.Option(help="Context length (default: from the plan)", min=1)] = None,
    base_port: Annotated[int, typer.Option(help="First engine port on each node (NIXL side channels: +1000)",
                                          min=1, max=64535)] = 8100,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
) -> None:
    """Print the `vllm serve` command line and environment of every group."""
    from thunderops.plan import Plan
    from thunderops.serve.vllm import EngineOptions, engine_commands

    opts = EngineOptions(base_port=base_port, gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len)
    cmds = engine_commands(Plan.load(plan.expanduser()), opts)
    if json_out:
        print_json([{"group": c.group, "phase": c.phase, "instance": c.instance, "port": c.port, "argv": c.argv,
                     "env": c.env, "connector": c.connector} for c in cmds])
        return
    for c in cmds:
        console.print(f"[bold]{c.group}[/] ({c.phase}) on {c.instance}:", highlight=False)
        console.print(c.shell(), highlight=False, soft_wrap=True)


@serve_app.command("emulator")
def emulator(
    port: Annotated[int, typer.Option(help="HTTP port", min=1, max=65535)] = 8100,
    host: Annotated[str, typer.Option(help="Bind address")] = "127.0.0.1",
    role: Annotated[str, typer.Option(help="prefill, decode or both (vLLM's kv_both: the default, so a "
                                           "reschedule can flip the phase without a restart)")] = "both",
    model: Annotated[str, typer.Option(help="Model name (catalog name, alias or HF id)")] = "llama3-8b",
    gpu: Annotated[str | None, typer.Option(help="GPU type whose timing to emulate (default: no delay)")] = None,
    tp: Annotated[int, typer.Option(help="Tensor-parallel degree")] = 1,
    pp: Annotated[int, typer.Option(help="Pipeline-parallel degree")] = 1,
    plan: Annotated[Path | None, typer.Option(help="Take model and layout from this plan's --group")] = None,
    group: Annotated[str | None, typer.Option(help="Group id within --plan")] = None,
    speedup: Annotated[float, typer.Option(help="Run emulated time this many times faster")] = 1.0,
    delay_scale: Annotated[float, typer.Option(help="Multiply delays (0 = answer at once, for benchmarks)")] = 1.0,
    max_model_len: Annotated[int, typer.Option(help="Longest prompt + output, tokens", min=1)] = 8192,
    exit_with_pid: Annotated[int | None, typer.Option(help="Also exit when this process is gone (its owner)")] = None,
    ssl_certfile: SslCertOpt = None,
    ssl_keyfile: SslKeyOpt = None,
) -> None:
    """Run an engine emulator: vLLM's HTTP API and P/D protocol with performance-model timing, no GPU.
    Requires THUNDEROPS_ENGINE_KEY as bearer token when that variable is set."""
    from thunderops.serve.emulator import EmulatorConfig, Timing, perf_timing, run_emulator

    if role not in ("prefill", "decode", "both"):
        raise UserError(f"--role must be prefill, decode or both, got {role!r}")
    if speedup <= 0 or delay_scale < 0:
        raise UserError("--speedup must be > 0 and --delay-scale >= 0")
    timing: Timing | None = None
    max_num_seqs = 256  # vLLM's default on small GPUs; a plan's group gets its engine's own limit
    if plan is not None:
        from thunderops.perf import PerfModel, layout_of
        from thunderops.plan import Plan

        p = Plan.load(plan.expanduser())
        if group is None:
            raise UserError("--plan needs --group GROUP_ID (one emulator per plan group)")
        try:
            g = p.group(group)
        except KeyError:
            raise UserError(f"plan has no group {group!r}; groups: {', '.join(x.id for x in p.groups)}") from None
        model, tp = p.model, g.tp  # the role is not the group's phase: phases change with every reschedule
        max_num_seqs = PerfModel(p.model).batch_limits([s.gpu for s in g.stages])[1] * g.pp  # as the planner's
        if delay_scale > 0:
            from thunderops.serve.emulator import PerfTiming

            pm = PerfModel(p.model)
            timing = PerfTiming(pm, layout_of(p, g, pm))
    elif gpu is not None and delay_scale > 0:
        timing = perf_timing(model, gpu, tp, pp)
    ssl_files = _ssl_files(ssl_certfile, ssl_keyfile)
    from thunderops.specs import served_names

    names = served_names(model)
    cfg = EmulatorConfig(model=names[0], served_names=names, role=role, max_model_len=max_model_len, host=host,
                         port=port, api_key=os.environ.get("THUNDEROPS_ENGINE_KEY") or None, tp=tp,
                         speedup=speedup, delay_scale=delay_scale, max_num_seqs=max_num_seqs, ssl_files=ssl_files)
    run_emulator(cfg, timing, exit_with_pid=exit_with_pid)


def _ssl_files(certfile: Path | None, keyfile: Path | None) -> tuple[str, str] | None:
    """--ssl-certfile/--ssl-keyfile (vLLM's names) as a pair of paths, or None for plain HTTP. The server loads
    them (`agent.server_tls_files`) before it listens: a pair that does not load is one line."""
    if certfile is None and keyfile is None:
        return None
    if certfile is None or keyfile is None:
        raise UserError("--ssl-certfile and --ssl-keyfile go together")
    return str(certfile.expanduser()), str(keyfile.expanduser())


@serve_app.command("router")
def router(
    routing: Annotated[Path | None, typer.Option(help="Routing table JSON ({replicas, routes})")] = None,
    plan: Annotated[Path | None, typer.Option(help="Plan JSON; give each group's URL with --endpoint")] = None,
    endpoint: Annotated[list[str] | None, typer.Option(help="GROUP=URL, e.g. p0=http://10.0.0.5:8100")] = None,
    model: Annotated[str | None, typer.Option(help="Served model (default: the plan's)")] = None,
    host: Annotated[str, typer.Option(help="Bind address")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port", min=1, max=65535)] = 8000,
    max_model_len: Annotated[int | None, typer.Option(help="Reject token-id prompts this long", min=1)] = None,
    usage_db: Annotated[str | None, typer.Option(help="State store to append token usage to")] = None,
    deployment: Annotated[str | None, typer.Option(help="Deployment id for --usage-db")] = None,
    engine_cert: Annotated[Path | None, typer.Option(
        help="PEM certificate the engines serve HTTPS with (https:// endpoints): the only one trusted")] = None,
    ssl_certfile: Annotated[Path | None, typer.Option(
        help="Serve the router's own API over HTTPS with this PEM certificate (clients verify it)")] = None,
    ssl_keyfile: SslKeyOpt = None,
) -> None:
    """Run the OpenAI-compatible P/D router. The API key comes from THUNDEROPS_API_KEY (generated and
    printed when unset); the admin key from THUNDEROPS_ADMIN_KEY (default: the API key). Bound to anything
    but this machine, give it --ssl-certfile/--ssl-keyfile: the API key and the prompts cross the network."""
    import json

    from thunderops.agent import server_tls_files
    from thunderops.plan import Plan
    from thunderops.serve.router import RouterConfig, RoutingError, RoutingTable, StoreUsageSink, run_router

    ssl_files = _ssl_files(ssl_certfile, ssl_keyfile)
    tls = server_tls_files(*ssl_files) if ssl_files else None  # before an API key is made and printed
    p = Plan.load(plan.expanduser()) if plan else None
    if routing is not None:
        try:
            table = RoutingTable.from_dict(json.loads(routing.expanduser().read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise RoutingError(f"{routing}: cannot read routing table ({e})") from None
    elif p is not None:
        urls = {}
        for item in endpoint or []:
            gid, sep, url = item.partition("=")
            if not sep or not url.startswith("http"):
                raise UserError(f"--endpoint must look like GROUP=http://HOST:PORT, got {item!r}")
            urls[gid] = url
        table = RoutingTable.from_plan(p, urls)
    else:
        raise UserError("give --routing FILE, or --plan FILE with --endpoint GROUP=URL for each group")
    model = model or (p.model if p else None)
    if max_model_len is None and p is not None:
        from thunderops.serve.vllm import max_model_len as plan_max_model_len

        max_model_len = plan_max_model_len(p)
    if model is None:
        raise UserError("give --model (or --plan) so the router knows which model it serves")
    key = os.environ.get("THUNDEROPS_API_KEY")
    if not key:
        key = f"tok-{secrets.token_urlsafe(24)}"
        err_console.print(f"API key (set THUNDEROPS_API_KEY to choose one): {key}", highlight=False)
    if bool(usage_db) != bool(deployment):
        raise UserError("--usage-db and --deployment go together")
    engine_tls = None
    if engine_cert is not None:
        from thunderops.agent import client_tls

        try:
            engine_tls = client_tls(engine_cert.expanduser().read_text())
        except OSError as e:
            raise UserError(f"--engine-cert {engine_cert}: cannot read the engines' certificate ({e.strerror})") from None
        except UserError:
            raise UserError(f"--engine-cert {engine_cert} is not a PEM certificate; give the one the engines "
                            "serve (the deployment's)") from None
    sink = StoreUsageSink(deployment, usage_db) if usage_db and deployment else None
    from thunderops.specs import served_names

    cfg = RouterConfig(api_key=key, served_models=served_names(model), max_model_len=max_model_len,
                       admin_key=os.environ.get("THUNDEROPS_ADMIN_KEY") or None,
                       engine_api_key=os.environ.get("THUNDEROPS_ENGINE_KEY") or None, usage_sink=sink,
                       engine_tls=engine_tls)
    run_router(table, cfg, host=host, port=port, tls=tls)


@serve_app.command("local")
def local(
    plan: PlanArg,
    emulate: Annotated[bool, typer.Option("--emulate/--vllm", help="Engine emulators (no GPU) or real vLLM")] = True,
    port: Annotated[int | None, typer.Option(help="Router port (default: a free one)", min=1, max=65535)] = None,
    speedup: Annotated[float, typer.Option(help="Emulated time runs this many times faster")] = 1.0,
) -> None:
    """Start a plan's whole serving side on this machine and keep it up until Ctrl-C."""
    from thunderops.plan import Plan
    from thunderops.serve import start_local

    handle = start_local(Plan.load(plan.expanduser()), emulate=emulate, router_port=port, speedup=speedup)
    console.print(f"endpoint: {handle.endpoint}\napi key:  {handle.api_key}\nlogs:     {handle.workdir}",
                  highlight=False)
    try:
        wait_until_stopped()
    finally:
        handle.stop()


@serve_app.command("ray-engine", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def ray_engine(
    ctx: typer.Context,
    port: Annotated[int, typer.Option(help="First port of the group's Ray port block (its GCS port)")],
    gpus: Annotated[str, typer.Option(help="This node's GPU ids of the group, e.g. 0,1")],
    expect_gpus: Annotated[int, typer.Option(help="GPUs of the whole group: wait until the cluster has them")],
    node_ip: Annotated[str | None, typer.Option(help="This node's private address (default: its default route's)")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the other nodes to join")] = 1800.0,
    log_dir: Annotated[Path, typer.Option(help="Where the Ray head's log goes")] = Path("~/thunderops-logs"),
    instance: Annotated[str | None, typer.Option(help="This node's plan instance id (tags its raylet)")] = None,
    layers: Annotated[list[str] | None, typer.Option(
        help="INSTANCE=L,L,...: each instance's stage layers as planned, head first (repeat); the split handed "
             "to vLLM then follows the order its Ray executor gives the nodes their stages")] = None,
) -> None:
    """On the head node of an engine spanning several nodes: start the group's Ray head, wait until the other
    nodes have joined it, then run the engine command given after `--` on the cluster (see
    thunderops.serve.ray_cluster). Exits with the engine's code."""
    from thunderops.serve.ray_cluster import run_head_engine

    argv = list(ctx.args)
    if not argv:
        raise UserError("give the engine command after --, e.g. thunderops serve ray-engine ... -- vllm serve MODEL")
    try:
        ids = [int(x) for x in gpus.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--gpus must be GPU ids separated by commas, e.g. 0,1; got {gpus!r}") from None
    if not ids or expect_gpus < len(ids) or not 0 < port < 65536 - 64:
        raise UserError(f"--gpus {gpus!r}, --expect-gpus {expect_gpus} and --port {port} do not describe a group "
                        "(expect at least this node's GPUs, a port below 65472)")
    split: dict[str, list[int]] = {}
    for item in layers or []:
        inst, sep, counts = item.partition("=")
        try:
            split[inst] = [int(n) for n in counts.split(",")]
            if not sep or not inst or min(split[inst]) < 1:
                raise ValueError
        except ValueError:
            raise UserError(f"--layers must look like INSTANCE=20,12 (layers per stage), got {item!r}") from None
    if split and instance not in split:
        raise UserError("--layers needs --instance, this node's instance id, among its instances")
    logs = log_dir.expanduser()
    logs.mkdir(parents=True, exist_ok=True)
    code = run_head_engine(argv, port=port, gpu_ids=ids, expect_gpus=expect_gpus, ip=node_ip, timeout_s=timeout,
                           log_dir=logs, instance=instance, layers=split or None)
    raise typer.Exit(code)


@serve_app.command("supervise", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def supervise_cmd(
    ctx: typer.Context,
    delay: Annotated[float, typer.Option(help="Seconds before restarting an engine that exited", min=0)] = 10.0,
    max_delay: Annotated[float, typer.Option(help="Most seconds between restarts (the delay doubles while the "
                                                  "engine keeps exiting soon after it starts)", min=0)] = 300.0,
    max_restarts: Annotated[int | None, typer.Option(help="Stop after this many restarts (default: never)",
                                                     min=0)] = None,
) -> None:
    """Run the engine command given after `--` and restart it whenever it exits, until SIGTERM (which goes to
    the engine). What a node's job runs each engine under (thunderops.serve.supervise)."""
    from thunderops.serve.supervise import supervise

    argv = list(ctx.args)
    if not argv:
        raise UserError("give the engine command after --, e.g. thunderops serve supervise -- vllm serve MODEL")
    raise typer.Exit(supervise(argv, delay_s=delay, max_delay_s=max(max_delay, delay), max_restarts=max_restarts))
