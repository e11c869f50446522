"""`thunderops workload show NAME|FILE`."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from thunderops.cli.app import console, print_json, sub_app

workload_app = sub_app("workload", "Workload presets and trace files.")


@workload_app.command("show")
def show(
    name: Annotated[str, typer.Argument(help="Preset (coding, conversation) or a trace CSV path")],
    rate: Annotated[float | None, typer.Option(help="Rescale to this many requests/s")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
) -> None:
    """Show a workload's request rate and prompt/output length percentiles (tokens)."""
    from thunderops.workload import get_workload

    summary = get_workload(name, rate=rate).summary()
    if json_out:
        print_json(summary)
        return
    table = Table(title=f"workload {summary['name']} ({summary['rate_rps']} req/s)")
    table.add_column("tokens")
    for col in ("p50", "p90", "p99", "mean"):
        table.add_column(col, justify="right")
    for which in ("prompt", "output"):
        table.add_row(which, *(f"{summary[f'{which}_{c}']:.0f}" for c in ("p50", "p90", "p99", "mean")))
    console.print(table)
    console.print(f"source: {summary['source']}", highlight=False)
