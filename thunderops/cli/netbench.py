"""`thunderops agent` (runs on every node) and `thunderops netbench [DEPLOYMENT | --hosts ...]`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from thunderops.cli.app import app, console, err_console, print_json
from thunderops.provision import AGENT_PORT


@app.command("agent")
def agent(
    port: Annotated[int, typer.Option(help="HTTP port (the data port is port+1, iperf3 port+2 unless set)")] = AGENT_PORT,
    token_file: Annotated[Path | None, typer.Option(help="File holding the deployment token (else $THUNDEROPS_AGENT_TOKEN)")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on")] = "0.0.0.0",
    data_port: Annotated[int | None, typer.Option(help="TCP port for bandwidth streams and echo (0: any)")] = None,
    iperf_port: Annotated[int | None, typer.Option(help="Port for iperf3's server")] = None,
    node: Annotated[str, typer.Option(help="This node's id (shown in health)")] = "",
    deployment: Annotated[str, typer.Option(help="The deployment this node belongs to")] = "",
    advertise_host: Annotated[str | None, typer.Option(help="Address peers should send data to (e.g. private IP)")] = None,
    gpu: Annotated[str | None, typer.Option(envvar="THUNDEROPS_AGENT_GPU", help="Declared GPU type where nvidia-smi is absent")] = None,
    gpus: Annotated[int, typer.Option(envvar="THUNDEROPS_AGENT_GPUS", help="Declared GPU count where nvidia-smi is absent")] = 0,
    link_mbps: Annotated[float | None, typer.Option(help="Emulate a slow link: pace this node's data path (Mbit/s)")] = None,
    peer_mbps: Annotated[list[str] | None, typer.Option(help="Emulate a slow link to one peer: ADDRESS=MBPS (repeatable)")] = None,
    cloud: Annotated[str, typer.Option(help="Metadata service for preemption notices: aws, gcp, auto or none")] = "auto",
    metadata_url: Annotated[str | None, typer.Option(help="Base URL of the instance metadata service")] = None,
    tls_cert: Annotated[Path | None, typer.Option(help="Serve HTTPS with this certificate (PEM; else "
                                                       "$THUNDEROPS_AGENT_TLS_CERT, else plain HTTP)")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="... and its key (else $THUNDEROPS_AGENT_TLS_KEY)")] = None,
) -> None:
    """Run the node agent: health, GPU inventory, bandwidth/latency measurements, preemption notices."""
    from thunderops.agent import AgentConfig, load_tls, load_token, parse_peer_mbps, run_agent

    cfg = AgentConfig(token=load_token(token_file), host=host, port=port, data_port=data_port, iperf_port=iperf_port,
                      node_id=node, deployment=deployment, advertise_host=advertise_host, gpu=gpu, gpus=gpus,
                      link_mbps=link_mbps, peer_mbps=parse_peer_mbps(peer_mbps or []), cloud=cloud, metadata_url=metadata_url,
                      tls=load_tls(tls_cert, tls_key))
    run_agent(cfg)


@app.command("netbench")
def netbench(
    deployment: Annotated[str | None, typer.Argument(help="Deployment whose nodes to measure")] = None,
    hosts: Annotated[str | None, typer.Option(help="Ad hoc agents instead: host:port,host:port (or name=host:port)")] = None,
    token_file: Annotated[Path | None, typer.Option(help="Token for --hosts (else $THUNDEROPS_AGENT_TOKEN)")] = None,
    tls_cert: Annotated[Path | None, typer.Option(help="For --hosts agents serving HTTPS: their certificate (PEM), "
                                                       "the only one trusted")] = None,
    duration: Annotated[float, typer.Option(help="Seconds of sending per pair")] = 2.0,
    streams: Annotated[int, typer.Option(help="Parallel TCP streams per pair")] = 4,
    tool: Annotated[str, typer.Option(help="auto (iperf3 where both nodes have it), builtin or iperf3")] = "auto",
    nccl: Annotated[bool, typer.Option(help="Also measure GPU-to-GPU bandwidth inside nodes with NCCL")] = True,
    png: Annotated[Path | None, typer.Option(help="Save the heat map here (deployments default to THUNDEROPS_HOME)")] = None,
    finalize: Annotated[bool, typer.Option(help="Then re-plan on the measured matrix (deployments only)")] = False,
    threshold: Annotated[float, typer.Option(help="With --finalize: re-search when goodput drops more than this")] = 0.1,
    relayout: Annotated[bool, typer.Option(help="With --finalize: also re-form replicas and layouts (the running "
                                                "engines keep theirs until redeployed)")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
) -> None:
    """Measure bandwidth and round trips between all node pairs (rounds of disjoint pairs)."""
    from thunderops import netbench as nb
    from thunderops.agent import client_tls, load_token
    from thunderops.errors import NetbenchError

    if (deployment is None) == (hosts is None):
        raise NetbenchError("give a DEPLOYMENT or --hosts host:port,... (one of them)")
    if finalize and deployment is None:
        raise NetbenchError("--finalize needs a DEPLOYMENT (ad hoc --hosts runs have no plan)")
    say = None if json_out else (lambda m: err_console.print(m, highlight=False, markup=False))
    opts = dict(duration_s=duration, streams=streams, tool=tool, nccl=nccl, progress=say)
    if deployment is not None and finalize:
        outcome = nb.measure_and_finalize(deployment, threshold=threshold, png=png, console=None if json_out else console,
                                          relayout=relayout, **opts)
        if json_out:
            print_json(outcome.to_dict())
        raise typer.Exit(0 if not outcome.result.unknown else 1)
    if deployment is not None:
        result = nb.measure(nb.endpoints_for_deployment(deployment), **opts)
        version = nb.store_result(deployment, result)
        png = png or nb.default_png(deployment)
    else:
        tls = None
        if tls_cert is not None:
            try:
                tls = client_tls(tls_cert.read_text())
            except OSError as e:
                raise NetbenchError(f"{tls_cert}: cannot read the agents' certificate ({e.strerror})") from None
        result = nb.measure(nb.parse_hosts(hosts or "", load_token(token_file), tls=tls), **opts)
        version = None
    if png is not None:
        nb.save_heatmap(result, png)
    if json_out:
        print_json({**result.to_dict(), "plan_version": version, "png": str(png) if png else None})
    else:
        console.print(nb.render_table(result))
        console.print(result.message(), highlight=False, style="yellow" if result.unknown else None)
        if version is not None:
            console.print(f"stored as plan version {version} of {deployment}", highlight=False)
        if png is not None:
            console.print(f"heat map: {png}", highlight=False)
    raise typer.Exit(0 if not result.unknown else 1)

