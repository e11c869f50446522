"""Chart data over a report's window: spend per node, and $/1M tokens per time bucket (floats, for plotting only)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd

from thunderops.report.attribution import Attribution
from thunderops.report.nodes import _Node, _overlap_hours

SPEND_POINTS = 120  # samples in the spend-over-time chart
COST_BUCKETS = 24  # buckets in the $/1M-tokens-over-time chart


def _spend_series(nodes: list[_Node], start: datetime, end: datetime) -> pd.DataFrame:
    """Cumulative $ per node at evenly spaced times over the window (floats: for plotting only)."""
    billed = [n for n in nodes if _overlap_hours(n, start, end) > 0]
    if not billed or end <= start:
        return pd.DataFrame()
    t0 = start.timestamp()
    ts = np.linspace(t0, end.timestamp(), SPEND_POINTS)
    data = {}
    for n in billed:
        a = max(n.start.timestamp(), t0)  # type: ignore[union-attr]
        b = min((n.stop or end).timestamp(), end.timestamp())
        data[n.rec.id] = float(n.price) * np.clip(np.minimum(ts, b) - a, 0, None) / 3600
    return pd.DataFrame(data, index=pd.to_datetime(ts, unit="s", utc=True))


def _unit_cost_series(nodes: list[_Node], usage: pd.DataFrame, start: datetime, end: datetime,
                      base_rows: list[dict[str, Any]], attr: Attribution | None) -> pd.DataFrame:
    """$/1M tokens (prompt + output) per time bucket: ours from spend, each baseline from its $/h per req/s."""
    if end <= start or usage.empty:
        return pd.DataFrame()
    edges = np.linspace(start.timestamp(), end.timestamp(), COST_BUCKETS + 1)
    secs = (usage["t"] - pd.Timestamp(0, tz="UTC")).dt.total_seconds().to_numpy()
    idx = np.clip(np.searchsorted(edges, secs, side="right") - 1, 0, COST_BUCKETS - 1)
    tokens = np.bincount(idx, weights=(usage["prompt"] + usage["output"]).to_numpy(float), minlength=COST_BUCKETS)
    reqs = np.bincount(idx, minlength=COST_BUCKETS).astype(float)
    cost = np.zeros(COST_BUCKETS)
    for n in nodes:
        if n.start is None:
            continue
        a, b = n.start.timestamp(), (n.stop or end).timestamp()
        cost += float(n.price) * np.clip(np.minimum(edges[1:], b) - np.maximum(edges[:-1], a), 0, None) / 3600
    with np.errstate(divide="ignore", invalid="ignore"):
        data = {"ours (actual)": np.where(tokens > 0, cost / tokens * 1e6, np.nan)}
        for row in base_rows:
            per_rps = row.get("usd_per_hour_per_rps")
            if per_rps is None or "(ours, actual)" in row["strategy"]:
                continue
            data[row["strategy"]] = np.where(tokens > 0, float(per_rps) * reqs / 3600 / tokens * 1e6, np.nan)
    mids = (edges[:-1] + edges[1:]) / 2
    return pd.DataFrame(data, index=pd.to_datetime(mids, unit="s", utc=True))
