"""Money, table schemas and times for the cost reports.

Money is `Decimal` from the store's $/h figures (`Decimal(repr(price))`) times exact hours (microsecond timestamps);
rounding happens only when displaying (cents) or exporting (micro-dollars). Times are UTC. Every table row and
total says what it covers.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any

import numpy as np
import pandas as pd

from thunderops.errors import ReportError, StateError

MICRO = Decimal("0.000001")
CENT = Decimal("0.01")
MILLION = Decimal(1_000_000)
_US_PER_HOUR = Decimal(3_600_000_000)

# Column kinds of every table (one schema for building, exporting and reading back):
# str, int, float, usd (Decimal or None), any (typed by the row's `unit`: "$..." -> Decimal, tokens/... -> int).
SCHEMAS: dict[str, dict[str, str]] = {
    "totals": {"metric": "str", "value": "any", "unit": "str", "covers": "str"},
    "nodes": {"node": "str", "plan_instance": "str", "cloud": "str", "region": "str", "zone": "str",
              "instance_type": "str", "gpus": "str", "pricing": "str", "usd_per_hour": "usd",
              "price_source": "str", "status": "str", "launched_at": "str", "terminated_at": "str",
              "hours": "float", "cost_usd": "usd", "prompt_share": "float", "replaces": "str"},
    "phases": {"phase": "str", "gpus": "int", "usd_per_hour": "usd", "gpu_hours": "float", "cost_usd": "usd",
               "prompt_share": "float"},
    "clouds": {"cloud": "str", "nodes": "int", "gpus": "int", "usd_per_hour": "usd", "gpu_hours": "float",
               "cost_usd": "usd"},
    "preemptions": {"node": "str", "cause": "str", "preempted_at": "str", "replacement": "str", "serving_again_at": "str",
                    "downtime_s": "float", "replacement_usd_per_hour": "usd", "replacement_cost_usd": "usd"},
    "baselines": {"strategy": "str", "usd_per_hour": "usd", "goodput_rps": "float", "gpus": "int",
                  "usd_per_hour_per_rps": "usd", "rate_rps": "float", "usd_per_hour_at_rate": "usd",
                  "cost_usd": "usd", "usd_per_1m_tokens": "usd", "ours_saves": "float"},
    "summary": {"deployment": "str", "status": "str", "start": "str", "end": "str", "cost_usd": "usd",
                "usd_per_hour_now": "usd", "prompt_tokens": "int", "output_tokens": "int", "usd_per_1m_tokens": "usd"},
    "estimate": {"metric": "str", "predicted": "any", "observed": "any", "unit": "str", "ratio": "float",
                 "note": "str"},
}


def usd(x: float | int | str | Decimal) -> Decimal:
    """A dollar figure as Decimal: floats through their shortest repr (2.4655 stays 2.4655)."""
    if isinstance(x, Decimal):
        return x
    if isinstance(x, float):
        if not math.isfinite(x):
            raise ValueError(f"not a finite amount: {x}")
        return Decimal(repr(x))
    return Decimal(x)


def _export(v: Any) -> Any:
    """A cell as JSON/CSV writes it: Decimal to a micro-dollar string, NaN to None."""
    if isinstance(v, Decimal):
        return str(v.quantize(MICRO, ROUND_HALF_UP))
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.floating):
        return float(v)
    return v


def _unit_kind(unit: str | None) -> str:
    unit = unit or ""
    if unit.startswith("$"):
        return "usd"
    if unit in ("tokens", "requests", "count"):
        return "int"
    return "float"


def _cast(v: Any, kind: str) -> Any:
    if v is None or (isinstance(v, float) and math.isnan(v)) or v == "":
        return None
    try:
        if kind == "usd":
            return Decimal(str(v))
        if kind == "int":
            return int(v)
        if kind == "float":
            return float(v)
    except (InvalidOperation, ValueError) as e:
        raise ReportError(f"bad report value {v!r} for a {kind} column ({e})") from None
    return str(v)


def _typed_frame(name: str, df: pd.DataFrame) -> pd.DataFrame:
    """Give every column of an imported table its kind from SCHEMAS (money back to Decimal, "" to None)."""
    if name not in SCHEMAS:
        raise ReportError(f"unknown report table {name!r}; expected one of {', '.join(SCHEMAS)}")
    rows = df.to_dict("records")
    data: dict[str, list[Any]] = {}
    for col, kind in SCHEMAS[name].items():
        if kind == "any":
            data[col] = [_cast(r.get(col), _unit_kind(r.get("unit"))) for r in rows]
        else:
            data[col] = [_cast(r.get(col), kind) for r in rows]
    return pd.DataFrame(data, columns=list(SCHEMAS[name]), dtype=object)


def _frame(name: str, rows: list[dict[str, Any]]) -> pd.DataFrame:
    """A table from row dicts: the schema's columns in order, missing or empty cells None."""
    cols = list(SCHEMAS[name])
    data = {c: [None if r.get(c) in ("", None) else r.get(c) for r in rows] for c in cols}
    return pd.DataFrame(data, columns=cols, dtype=object)


def _ts(value: str | None, what: str) -> datetime | None:
    if not value:
        return None
    try:
        dt = datetime.fromisoformat(value)
    except (TypeError, ValueError):
        raise StateError(f"{what}: {value!r} is not an ISO 8601 time; the state store row is corrupted "
                         "(fix or delete it)") from None
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def iso(dt: datetime | None) -> str | None:
    return dt.astimezone(UTC).isoformat(timespec="seconds") if dt else None


def _hours(a: datetime, b: datetime) -> Decimal:
    """Exact hours from a to b (0 when b is before a)."""
    d = b - a
    us = (d.days * 86_400 + d.seconds) * 1_000_000 + d.microseconds
    return Decimal(max(0, us)) / _US_PER_HOUR


def parse_since(value: str | None, now: datetime | None = None) -> datetime | None:
    """`--since`: an ISO date or time (UTC unless it says otherwise) or an age such as 90m, 24h, 7d."""
    if value is None:
        return None
    now = now or datetime.now(UTC)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", value)
    if m:
        n, unit = float(m.group(1)), m.group(2)
        return now - timedelta(seconds=n * {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[unit])
    try:
        dt = datetime.fromisoformat(value.strip())
    except ValueError:
        raise ReportError(f"--since {value!r} is neither an ISO time (2026-11-25T09:00) nor an age (90m, 24h, 7d)") from None
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def _money(v: Decimal | None, places: Decimal = CENT) -> str:
    return "-" if v is None else f"{v.quantize(places, ROUND_HALF_UP):,}"
