"""`thunderops report`: what a deployment costs and spent, $/1M tokens, preemptions, savings against the baselines;
or the pre-launch view of a plan file (`--plan`)."""

from __future__ import annotations

import io
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from thunderops.cli.app import app, console, err_console


class Format(StrEnum):
    table = "table"
    csv = "csv"
    json = "json"
    html = "html"


@app.command("report")
def report_cmd(
    deployment: Annotated[str | None, typer.Argument(help="Deployment name (see `thunderops status`)")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Every deployment in the state store")] = False,
    fmt: Annotated[Format, typer.Option("--format", help="table (terminal), csv, json or html")] = Format.table,
    since: Annotated[str | None, typer.Option(help="Only from this UTC time (2026-11-25T09:00) or age (90m, 24h, 7d)")] = None,
    out: Annotated[Path | None, typer.Option(help="Write the report and its PNG charts into this directory")] = None,
    plan: Annotated[Path | None, typer.Option("--plan", help="Pre-launch view of a plan file (`thunderops plan --out`)")] = None,
) -> None:
    """Cost report: spend per node, phase and cloud, $/1M prompt and output tokens, preemptions, the same traffic on
    the baseline plans, and the plan's estimate against actual. Money in $ (exact; rounded to the cent on display)."""
    from thunderops import report as rp
    from thunderops.errors import ReportError
    from thunderops.state import Store

    if plan is not None:
        if deployment or all_ or since:
            raise ReportError("--plan shows a plan before launch; drop DEPLOYMENT/--all/--since, or drop --plan")
        p, baselines = rp.load_plan_file(plan)
        reports = [rp.plan_report(p, baselines)]
    else:
        if deployment and all_:
            raise ReportError("give a DEPLOYMENT or --all, not both")
        reports = rp.build_reports(Store(), deployment, all_=all_, since=rp.parse_since(since))

    several = all_
    text = _tables_text(reports, several) if fmt == Format.table else None
    if out is not None:
        paths = rp.write_reports(reports, fmt.value, out, text, several)
        if text is not None:
            sys.stdout.write(text)
        err_console.print(f"wrote {len(paths)} file(s) to {out}", highlight=False)
        return
    if fmt == Format.table:
        sys.stdout.write(text or "")
    elif fmt == Format.json:
        import json

        if several:
            data = {"summary": rp.summary_records(reports),
                    "deployments": {r.deployment: r.to_dict() for r in reports}}
        else:
            data = reports[0].to_dict()
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
    elif fmt == Format.csv:
        for r in reports:
            for name, csv in r.csv_texts().items():
                sys.stdout.write(f"# {r.deployment or 'plan'}: {name}\n{csv}\n")
    else:
        summary = rp.summary_frame(reports) if several else None
        sys.stdout.write(rp.render_html(reports, summary))


def _tables_text(reports, several: bool) -> str:
    """The reports as Rich tables, rendered to text (the terminal's width when it is one)."""
    from thunderops import report as rp

    buf = io.StringIO()
    con = Console(file=buf, width=console.width if console.is_terminal else 160, force_terminal=console.is_terminal)
    if several:
        con.print(_rich("all deployments", rp.display_frame("summary", rp.summary_frame(reports), compact=True)))
    for r in reports:
        con.rule(r.title)
        for n in r.notes:
            con.print(f"- {n}", highlight=False, soft_wrap=True)
        for name, df in r.tables.items():
            if not df.empty:
                con.print(_rich(rp.TITLES[name], rp.display_frame(name, df, compact=True)))
    return buf.getvalue()


def _rich(title: str, df) -> Table:
    t = Table(title=title, title_justify="left")
    for k, col in enumerate(df.columns):
        t.add_column(str(col), justify="left" if k == 0 else "right", overflow="fold")
    for row in df.itertuples(index=False):
        t.add_row(*[str(v) for v in row])
    return t
