"""Reports for people and files: formatted cells and tables, PNG charts, one HTML page, the all-deployments
summary, and writing everything under `--out`."""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from thunderops.errors import ReportError
from thunderops.report.model import Report
from thunderops.report.money import CENT, SCHEMAS, _export, _frame, _money, iso

TITLES = {
    "totals": "totals", "nodes": "nodes", "phases": "by phase", "clouds": "by cloud", "preemptions": "preemptions",
    "baselines": "the same traffic on the baseline plans (same SLO, same performance model)",
    "estimate": "plan-time estimate against actual", "summary": "all deployments",
}
LABELS = {
    "usd_per_hour": "$/h", "cost_usd": "$", "hours": "hours", "gpu_hours": "GPU-hours", "prompt_share": "prompt share",
    "replacement_usd_per_hour": "replacement $/h", "replacement_cost_usd": "replacement $",
    "usd_per_hour_per_rps": "$/h per req/s", "rate_rps": "at req/s", "usd_per_hour_at_rate": "$/h at that rate",
    "usd_per_1m_tokens": "$/1M tokens", "goodput_rps": "goodput req/s", "ours_saves": "ours saves",
    "downtime_s": "downtime s", "plan_instance": "plan instance", "instance_type": "instance",
    "price_source": "price source", "serving_again_at": "serving again at", "preempted_at": "preempted at",
    "launched_at": "launched", "terminated_at": "terminated", "usd_per_hour_now": "$/h now",
    "prompt_tokens": "prompt tokens", "output_tokens": "output tokens", "start": "from (UTC)", "end": "to (UTC)",
}


def _short(t: str | None) -> str:
    return (t or "?").replace("T", " ")[:16]


def display_value(col: str, v: Any, unit: str | None = None) -> str:
    """A cell for people: $ to the cent, $/h and $/1M tokens to 1/10000, fractions as %, times as they are."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, Decimal):
        fine = any(k in (col + (unit or "")) for k in ("per_hour", "per_1m", "per_rps", "/h", "/1M"))
        return _money(v, Decimal("0.0001") if fine else CENT)
    if col in ("ours_saves", "prompt_share") or unit == "fraction":
        return f"{v:.1%}"
    if isinstance(v, float):
        return f"{v:,.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


COMPACT_HIDE = {"price_source", "zone", "covers_detail"}  # left out of terminal tables (kept in exports and HTML)


def display_frame(name: str, df: pd.DataFrame, compact: bool = False) -> pd.DataFrame:
    """The table with cells formatted for people and columns labelled with units; columns with nothing in them
    are left out (and, `compact`, the wide ones a terminal cannot hold)."""
    out = pd.DataFrame(index=df.index)
    for col in df.columns:
        if df[col].isna().all() and len(df) or (compact and col in COMPACT_HIDE):
            continue
        if compact and col == "plan_instance" and (df["plan_instance"] == df["node"]).all():
            continue
        if compact and col.endswith("_at"):
            out[LABELS.get(col, col) + " (UTC)"] = [_short(v) if v else "-" for v in df[col]]
        elif SCHEMAS[name].get(col) == "any":
            out[LABELS.get(col, col)] = [display_value(col, v, u) for v, u in zip(df[col], df["unit"], strict=True)]
        else:
            out[LABELS.get(col, col)] = [display_value(col, v) for v in df[col]]
    return out


def charts(report: Report) -> dict[str, bytes]:
    """PNG charts (matplotlib, Agg): spend over time stacked by node, $/1M tokens over time, ours vs baselines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: dict[str, bytes] = {}

    def png(fig) -> bytes:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
        plt.close(fig)
        return buf.getvalue()

    spend = report.series.get("spend")
    if spend is not None and not spend.empty:
        fig, ax = plt.subplots(figsize=(8, 4))
        ax.stackplot(spend.index.to_pydatetime(), *[spend[c].to_numpy() for c in spend.columns],
                     labels=list(spend.columns))
        ax.set_title(f"spend over time: $ so far, stacked by node ({_short(report.start)} to {_short(report.end)} UTC)",
                     fontsize=9)
        ax.set_ylabel("$")
        ax.set_xlabel("time (UTC)")
        ax.legend(fontsize=7, loc="upper left", ncol=2)
        fig.autofmt_xdate()
        out["spend"] = png(fig)
    unit = report.series.get("unit_cost")
    if unit is not None and not unit.empty and unit.notna().any().any():
        fig, ax = plt.subplots(figsize=(8, 4))
        for col in unit.columns:
            ok = unit[col].notna().to_numpy()
            ax.plot(unit.index.to_pydatetime()[ok], unit[col].to_numpy()[ok], marker="o", markersize=3,
                    linestyle="-" if "actual" in col else "--", label=col)
        vals = unit.to_numpy(dtype=float)
        vals = vals[np.isfinite(vals) & (vals > 0)]
        if len(vals) and vals.max() > 20 * vals.min():
            ax.set_yscale("log")
        ax.set_title("$ per 1M tokens (prompt + output) per time bucket: ours (actual spend, idle time included) vs "
                     "the plans priced at that bucket's traffic", fontsize=9)
        ax.set_ylabel("$/1M tokens")
        ax.set_xlabel("time (UTC)")
        ax.legend(fontsize=7)
        fig.autofmt_xdate()
        out["unit_cost"] = png(fig)
    base = report.tables.get("baselines")
    if base is not None and not base.empty:
        rows = base[base["usd_per_hour_per_rps"].notna()]
        if not rows.empty:
            fig, ax = plt.subplots(figsize=(8, 0.6 * len(rows) + 1.2))
            vals = [float(v) for v in rows["usd_per_hour_per_rps"]]
            colors = ["tab:green" if "(ours" in s else "tab:gray" for s in rows["strategy"]]
            ax.barh(list(rows["strategy"]), vals, color=colors)
            for k, v in enumerate(vals):
                ax.text(v, k, f" {v:,.4g}", va="center", fontsize=8)
            ax.set_title("$/h per req/s of goodput at the same SLO (plan predictions; lower is better): "
                         "ours vs baselines", fontsize=9)
            ax.set_xlabel("$/h per req/s")
            ax.invert_yaxis()
            out["baselines"] = png(fig)
    return out


def render_html(reports: list[Report], summary: pd.DataFrame | None = None,
                images: list[dict[str, bytes]] | None = None) -> str:
    """One self-contained HTML page: notes, tables and the charts embedded as base64 PNG."""
    images = images if images is not None else [charts(r) for r in reports]
    title = reports[0].title if len(reports) == 1 else "thunderops cost report: all deployments"
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
             "body{font-family:sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:0.5em 0 1.5em}"
             "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:left}"
             "th{background:#f0f0f0}.note{color:#555;font-size:13px}"
             "img{max-width:100%;display:block;margin:0.5em 0 1.5em}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>",
             f"<p class='note'>generated {iso(datetime.now(UTC))} UTC; money in US$, rounded to the cent for display "
             "($/h and $/1M tokens to 1/100 cent)</p>"]
    if summary is not None:
        parts.append("<h2>all deployments</h2>" + display_frame("summary", summary).to_html(
            index=False, escape=True, border=0, table_id="summary"))
    for r, imgs in zip(reports, images, strict=True):
        if len(reports) > 1:
            parts.append(f"<h2 id='dep-{html.escape(r.deployment or 'plan')}'>{html.escape(r.title)}</h2>")
        parts.append("<ul class='note'>" + "".join(f"<li>{html.escape(n)}</li>" for n in r.notes) + "</ul>")
        for name, img in imgs.items():
            b64 = base64.b64encode(img).decode()
            parts.append(f"<img id='chart-{name}' alt='{html.escape(name)} chart' src='data:image/png;base64,{b64}'>")
        for name, df in r.tables.items():
            if df.empty:
                continue
            parts.append(f"<h3>{html.escape(TITLES[name])}</h3>")
            parts.append(display_frame(name, df).to_html(index=False, escape=True, border=0,
                                                         table_id=f"{name}-{r.deployment or 'plan'}"))
    parts.append("</body></html>")
    return "\n".join(parts)


def summary_frame(reports: list[Report]) -> pd.DataFrame:
    """One row per deployment: window, spend ($), $/h running at its end, tokens, $/1M tokens (SCHEMAS["summary"])."""
    rows = []
    for r in reports:
        rows.append({"deployment": r.deployment, "status": r.status, "start": r.start, "end": r.end,
                     "cost_usd": r.total("spend"), "usd_per_hour_now": r.total("$/h now"),
                     "prompt_tokens": r.total("prompt tokens"), "output_tokens": r.total("output tokens"),
                     "usd_per_1m_tokens": r.total("$ per 1M tokens")})
    return _frame("summary", rows)


def summary_records(reports: list[Report]) -> list[dict[str, Any]]:
    return [{k: _export(v) for k, v in row.items()} for row in summary_frame(reports).to_dict("records")]


def _write_atomic(path: Path, data: bytes) -> Path:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    tmp.replace(path)
    return path


def write_reports(reports: list[Report], fmt: str, out: Path, text: str | None = None,
                  several: bool | None = None) -> list[Path]:
    """Write the reports (and their PNG charts) under `out`; with `several` (default: more than one report), one
    subdirectory per deployment and a summary. Everything is rendered in memory first, then each file is written
    atomically."""
    images = [charts(r) for r in reports]
    files: dict[Path, bytes] = {}
    several = len(reports) > 1 if several is None else several
    for r, imgs in zip(reports, images, strict=True):
        d = out / (r.deployment or "plan") if several else out
        for name, img in imgs.items():
            files[d / f"{name}.png"] = img
        if fmt == "csv":
            for name, text in r.csv_texts().items():
                files[d / f"{name}.csv"] = text.encode()
        elif fmt == "json":
            files[d / "report.json"] = r.to_json().encode()
    if fmt == "html":
        summary = summary_frame(reports) if several else None
        files[out / "report.html"] = render_html(reports, summary, images).encode()
    elif fmt == "table" and text is not None:
        files[out / "report.txt"] = text.encode()
    elif fmt == "json" and several:
        files[out / "summary.json"] = json.dumps(summary_records(reports), indent=2).encode()
    elif fmt == "csv" and several:
        files[out / "summary.csv"] = summary_frame(reports).map(_export).to_csv(index=False, lineterminator="\n").encode()
    try:
        for path in {p.parent for p in files}:
            path.mkdir(parents=True, exist_ok=True)
        return [_write_atomic(p, b) for p, b in files.items()]
    except OSError as e:
        raise ReportError(f"{out}: cannot write the report ({e.strerror}); pick a writable --out") from None
