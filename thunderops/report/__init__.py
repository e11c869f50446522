"""Cost reports: what a deployment spent, per node, phase and cloud; $/1M prompt and output tokens; preemptions;
the same traffic priced on the baseline plans; the plan's estimate against what happened. Also the pre-launch view
of a plan file and its baselines.

Where each step lives: `money` (Decimal dollars, the table schemas and typed frames, UTC times, `parse_since`),
`model` (the `Report` dataclass and its JSON/CSV exports), `attribution` (the prompt/output split of each node's
cost), `nodes` (billed nodes, router usage, and preemptions with their replacements, from the state store),
`baselines` (a plan's predicted $/1M tokens and the baseline plans priced at a rate), `deployment`
(`deployment_report`, `build_reports`), `series` (chart data over time), `plan_view` (`plan_report`,
`load_plan_file`), and `render` (cells and tables for people, PNG charts, HTML, `write_reports`). Every public name
is importable from `thunderops.report` itself.
"""

from thunderops.report.attribution import Attribution, attribution, prompt_share
from thunderops.report.deployment import build_reports, deployment_report
from thunderops.report.model import Report
from thunderops.report.money import CENT, MICRO, MILLION, SCHEMAS, iso, parse_since, usd
from thunderops.report.plan_view import load_plan_file, plan_report
from thunderops.report.render import (
    COMPACT_HIDE,
    LABELS,
    TITLES,
    charts,
    display_frame,
    display_value,
    render_html,
    summary_frame,
    summary_records,
    write_reports,
)

__all__ = [
    "CENT", "COMPACT_HIDE", "LABELS", "MICRO", "MILLION", "SCHEMAS", "TITLES", "Attribution", "Report",
    "attribution", "build_reports", "charts", "deployment_report", "display_frame", "display_value", "iso",
    "load_plan_file", "parse_since", "plan_report", "prompt_share", "render_html", "summary_frame",
    "summary_records", "usd", "write_reports",
]
