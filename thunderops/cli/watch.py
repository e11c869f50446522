"""`thunderops watch DEPLOYMENT` (the controller in the foreground) and `thunderops events DEPLOYMENT`."""

from __future__ import annotations

import signal
from typing import Annotated

import typer
from rich.table import Table

from thunderops.cli.app import app, console, print_json
from thunderops.errors import UserError


@app.command("watch")
def watch(
    deployment: Annotated[str, typer.Argument(help="Deployment name")],
    router: Annotated[str | None, typer.Option(help="Router base URL (default: the one `thunderops up` saved)")] = None,
    max_spend: Annotated[float | None, typer.Option(help="Tear down before total spend passes this many $")] = None,
    interval: Annotated[float, typer.Option(help="Seconds between looks")] = 0.5,
    reprovision: Annotated[bool, typer.Option("--reprovision/--no-reprovision",
                                              help="Replace lost nodes within the $/h budget")] = True,
    duration: Annotated[float | None, typer.Option(help="Stop after this many seconds (default: until Ctrl-C)")] = None,
) -> None:
    """Keep a deployment serving: detect dead engines, lost nodes and preemption notices, reschedule lightly,
    reprovision, follow workload shifts, guard spend. Every decision is an event (`thunderops events`)."""
    from thunderops.controller import Controller, ControllerConfig

    if interval <= 0:
        raise UserError(f"--interval must be > 0 seconds, got {interval:g}")
    if max_spend is not None and max_spend <= 0:
        raise UserError(f"--max-spend must be > 0 $, got {max_spend:g}")
    cfg = ControllerConfig(interval_s=interval, max_spend=max_spend, reprovision=reprovision)

    def show(kind: str, message: str, payload: dict) -> None:
        console.print(f"[bold]{kind}[/] {message}", highlight=False, soft_wrap=True)

    ctl = Controller(deployment, router_url=router, config=cfg, on_event=show)
    signal.signal(signal.SIGTERM, lambda *_: ctl.stop())
    try:
        st = ctl.run(duration)
    except KeyboardInterrupt:
        st = ctl.status()
    finally:
        ctl.close()
    console.print(f"{st.deployment}: {st.state}, plan v{st.plan_version}, {len(st.replicas)} replicas, "
                  f"{st.cost_per_hour:.2f} $/h running, {st.spend:.4f} $ spent {st.message}", highlight=False)


@app.command("events")
def events(
    deployment: Annotated[str, typer.Argument(help="Deployment name")],
    kind: Annotated[str | None, typer.Option(help="Only events of this kind (e.g. reschedule)")] = None,
    last: Annotated[int | None, typer.Option(help="Only the last N events")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON (with payloads)")] = False,
) -> None:
    """List a deployment's events: provisioning, losses, reschedules, reprovisions, workload shifts, spend."""
    from thunderops.controller import event_rows
    from thunderops.state import Store

    if last is not None and last <= 0:
        raise UserError(f"--last must be a positive number of events, got {last}")
    rows = event_rows(Store(), deployment, kind)
    if last:
        rows = rows[-last:]
    if json_out:
        print_json(rows)
        return
    t = Table(title=f"{deployment}: {len(rows)} event(s)")
    for col in ("id", "time (UTC)", "kind", "plan", "message"):
        t.add_column(col, overflow="fold")
    for r in rows:
        p = r["payload"]
        ver = f"v{p['before']} -> v{p['after']}" if "before" in p and "after" in p else (
            f"v{p['plan_version']}" if "plan_version" in p else "")
        t.add_row(str(r["id"]), r["ts"][:23].replace("T", " "), r["kind"], ver, r["message"])
    console.print(t)

