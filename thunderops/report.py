"""Cost reports: what a deployment spent, per node, phase and cloud; $/1M prompt and output tokens; preemptions;
the same traffic priced on the baseline plans; the plan's estimate against what happened. Also the pre-launch view
of a plan file and its baselines.

Money is `Decimal` from the store's $/h figures (`Decimal(repr(price))`) times exact hours (microsecond timestamps);
rounding happens only when displaying (cents) or exporting (micro-dollars). Times are UTC. Every table row and
total says what it covers.

How cost is split between prompt and output tokens: a node's cost follows its GPUs. GPUs in a prefill group are
prompt cost, GPUs in a decode group are output cost; a colocated group does both, and its cost is split by GPU time
per request from the performance model: a request takes 1/C_prefill of the group's time to prefill and 1/C_decode
to decode (C: the group's capacity in requests/s, at the plan's SLO, serving one phase alone). A node whose plan
instance the latest plan no longer has (a lost node) is split as in the newest plan version that had it; a node in
no plan version is split like the whole latest plan.

Preemptions and other losses come from the controller (thunderops/controller.py): a lost node has status
`preempted` (or `failed`) and `terminated_at`; the `reschedule` event lists lost plan instances; `reprovision-start`
maps each lost instance to its replacement instance and `reprovisioned` (same key) says when the replacement
serves. Downtime runs from the loss to that moment (or the replacement's launch, or the window's end). Without
those events, a lost node's replacement is the first node launched after it went on the same plan instance, else
of the same GPU type.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from thunderops.errors import ReportError, StateError, UserError
from thunderops.plan import SLO, Plan
from thunderops.state import NodeRecord, Store

LOSS_KIND = "reschedule"  # the controller's decision on lost nodes: payload {"lost": {instance id: why}}
REPLACE_KIND = "reprovision-start"  # payload {"key": K, "replacements": {lost instance id: {"id": new id, ...}}}
SERVED_KIND = "reprovisioned"  # payload {"key": K}: the replacements serve from this event's ts
NOTICE = timedelta(minutes=2)  # a replacement may be launched on a preemption notice, before the node goes
MICRO = Decimal("0.000001")
CENT = Decimal("0.01")
MILLION = Decimal(1_000_000)
_US_PER_HOUR = Decimal(3_600_000_000)
SPEND_POINTS = 120  # samples in the spend-over-time chart
COST_BUCKETS = 24  # buckets in the $/1M-tokens-over-time chart

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


@dataclass
class Report:
    """One report: named tables (see SCHEMAS), notes on what they cover, and chart data."""

    title: str
    deployment: str | None  # None for a plan file's pre-launch view
    start: str | None  # the window covered, ISO UTC (None for a plan view)
    end: str | None
    tables: dict[str, pd.DataFrame]
    notes: list[str] = field(default_factory=list)
    series: dict[str, pd.DataFrame] = field(default_factory=dict, repr=False)  # chart data, not exported
    status: str | None = None  # the deployment's status when reported

    def total(self, metric: str) -> Any:
        t = self.tables["totals"]
        row = t[t["metric"] == metric]
        if row.empty:
            raise KeyError(metric)
        return row["value"].iloc[0]

    # -- exports ---------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"title": self.title, "deployment": self.deployment, "status": self.status, "start": self.start,
                "end": self.end, "notes": list(self.notes),
                "tables": {name: [{k: _export(v) for k, v in row.items()} for row in df.to_dict("records")]
                           for name, df in self.tables.items()}}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Report:
        tables = {name: _typed_frame(name, pd.DataFrame(rows, columns=list(SCHEMAS.get(name, {})) or None))
                  for name, rows in d["tables"].items()}
        return cls(d["title"], d.get("deployment"), d.get("start"), d.get("end"), tables, list(d.get("notes", [])),
                   status=d.get("status"))

    def csv_texts(self) -> dict[str, str]:
        """One CSV per table (money in $ to the micro-dollar, times ISO UTC)."""
        return {name: df.map(_export).to_csv(index=False, lineterminator="\n") for name, df in self.tables.items()}

    @classmethod
    def read_csv(cls, directory: Path, title: str = "", deployment: str | None = None) -> Report:
        tables = {}
        for name in SCHEMAS:
            path = Path(directory) / f"{name}.csv"
            if path.exists():
                tables[name] = _typed_frame(name, pd.read_csv(path, dtype=str, keep_default_na=False))
        return cls(title, deployment, None, None, tables)


# --------------------------------------------------------------------------------------------- helpers


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


# ------------------------------------------------------------------------------ prompt/output attribution


@dataclass
class Attribution:
    """Prompt share of each plan group's and instance's GPU time (the rest is output), from one plan."""

    version: int
    group_share: dict[str, float]
    instance_phases: dict[str, dict[str, tuple[int, float]]]  # plan instance -> phase -> (GPUs, prompt share)
    plan_share: float
    note: str

    def split(self, instance_id: str, gpus: int) -> dict[str, tuple[int, float]]:
        """phase -> (GPUs, prompt share) of a node of this plan instance; not in the plan: the plan's share."""
        return self.instance_phases.get(instance_id) or {f"not in plan v{self.version}": (max(gpus, 1), self.plan_share)}


def attribution(plan: Plan, older: list[Plan] | None = None) -> Attribution:
    """Prompt shares from `plan`; an instance it no longer has (a lost node) takes its split from the newest of
    the `older` plan versions that had it."""
    note = ("prompt/output cost split: prefill GPUs -> prompt, decode GPUs -> output, colocated GPUs by the "
            f"performance model's prefill vs decode GPU time per request (plan v{plan.version}"
            + (", earlier versions for nodes no longer in it)" if older else ")"))
    cache: dict[Any, float] = {}
    phases, shares, problems = _plan_split(plan, cache)
    total = sum(n for p in phases.values() for n, _ in p.values())
    plan_share = sum(n * w for p in phases.values() for n, w in p.values()) / total if total else 0.5
    for old in sorted(older or [], key=lambda p: -p.version):
        more, _, bad = _plan_split(old, cache)
        problems += bad
        for inst, split in more.items():
            phases.setdefault(inst, split)
    if problems:
        note += f"; colocated GPUs split 50/50 where the performance model could not price them ({problems[0]})"
    return Attribution(plan.version, shares, phases, plan_share, note)


def _plan_split(plan: Plan, cache: dict[Any, float]) -> tuple[dict[str, dict[str, tuple[int, float]]],
                                                              dict[str, float], list[str]]:
    """instance -> phase -> (GPUs, prompt share); group -> prompt share; problems met."""
    shares: dict[str, float] = {}
    problems: list[str] = []
    for g in plan.groups:
        if g.phase in ("prefill", "decode"):
            shares[g.id] = 1.0 if g.phase == "prefill" else 0.0
            continue
        try:
            shares[g.id] = _colocated_share(plan, g, cache)
        except (UserError, KeyError, TypeError, ValueError, ZeroDivisionError) as e:
            shares[g.id] = 0.5
            problems.append(str(e))
    acc: dict[str, dict[str, list[float]]] = {}  # instance -> phase -> [GPUs, prompt-weighted GPUs]
    for g in plan.groups:
        for st in g.stages:
            a = acc.setdefault(st.instance, {}).setdefault(g.phase, [0, 0.0])
            a[0] += st.tp
            a[1] += st.tp * shares[g.id]
    phases = {i: {ph: (int(n), w / n) for ph, (n, w) in p.items() if n > 0} for i, p in acc.items()}
    return phases, shares, problems


def prompt_share(split: dict[str, tuple[int, float]]) -> float:
    """The prompt share of a node's cost from its phase split (GPU-weighted)."""
    n = sum(g for g, _ in split.values())
    return sum(g * s for g, s in split.values()) / n if n else 0.5


def _colocated_share(plan: Plan, group, cache: dict[Any, Any]) -> float:
    """A colocated group's prefill share of GPU time per request: (1/C_prefill) / (1/C_prefill + 1/C_decode)."""
    from thunderops.perf import PerfModel, layout_of
    from thunderops.specs import get_model
    from thunderops.workload import get_workload

    wname = _workload_name(plan) or "conversation"
    slo = SLO(**plan.inputs["slo"]) if plan.inputs.get("slo") else SLO()
    if ("perf", plan.model) not in cache:
        cache[("perf", plan.model)] = PerfModel(get_model(plan.model))
    if ("wl", wname) not in cache:
        cache[("wl", wname)] = get_workload(wname)
    perf, wl = cache[("perf", plan.model)], cache[("wl", wname)]
    layout = layout_of(plan, group, perf)
    key = (plan.model, wname, slo, layout)
    if key not in cache:
        cp, cd = perf.capacity(layout, "prefill", wl, slo), perf.capacity(layout, "decode", wl, slo)
        cache[key] = cd / (cp + cd) if cp > 0 and cd > 0 else 0.5
    return cache[key]


def _workload_name(plan: Plan) -> str:
    """What the plan was made for: its trace file when it had one, else the preset's name."""
    return str(plan.inputs.get("workload_source") or plan.inputs.get("workload") or "")


def _workload_means(plan: Plan) -> tuple[float | None, float | None]:
    """Mean prompt and output tokens per request the plan was made for (None when its workload is gone)."""
    from thunderops.workload import get_workload

    try:
        wl = get_workload(_workload_name(plan))
        return wl.mean_prompt, wl.mean_output
    except (UserError, OSError, ValueError):
        out = plan.predicted.tokens_per_s / plan.predicted.goodput_rps if plan.predicted.goodput_rps else None
        return None, out


# --------------------------------------------------------------------------------------------- deployments


@dataclass
class _Node:
    rec: NodeRecord
    start: datetime | None  # billed from (launched_at)
    stop: datetime | None  # billed to (terminated_at), None while running
    price: Decimal


def _nodes(recs: list[NodeRecord]) -> list[_Node]:
    out = []
    for n in recs:
        try:
            price = usd(float(n.price_per_hour))
        except (TypeError, ValueError):
            price = Decimal(-1)
        if price < 0:
            raise StateError(f"node {n.id}: price_per_hour {n.price_per_hour!r} is not a $/h figure; the state store "
                             "row is corrupted (fix or delete it)")
        out.append(_Node(n, _ts(n.launched_at, f"node {n.id} launched_at"),
                         _ts(n.terminated_at, f"node {n.id} terminated_at"), price))
    return out


def _overlap_hours(n: _Node, a: datetime, b: datetime) -> Decimal:
    if n.start is None:
        return Decimal(0)
    return _hours(max(n.start, a), min(n.stop or b, b))


def _usage_frame(store: Store, dep: str) -> pd.DataFrame:
    rows = store.usage(dep)
    df = pd.DataFrame({"ts": [u.ts for u in rows], "prompt": [u.prompt_tokens for u in rows],
                       "output": [u.output_tokens for u in rows]})
    try:
        df["t"] = pd.to_datetime(df["ts"], utc=True, format="ISO8601")
    except (ValueError, TypeError) as e:
        raise StateError(f"deployment {dep!r}: a usage row has a bad timestamp ({e}); the state store is "
                         "corrupted") from None
    if len(df) and ((df["prompt"] < 0) | (df["output"] < 0)).any():
        raise StateError(f"deployment {dep!r}: a usage row has negative token counts; the state store is corrupted")
    return df


@dataclass
class _Preemption:
    node: _Node
    at: datetime
    cause: str
    replacement: _Node | None = None
    serving_at: datetime | None = None


def _preemptions(store: Store, dep: str, nodes: list[_Node]) -> list[_Preemption]:
    """Lost nodes and their replacements, from the controller's events (see the module docstring)."""
    by_inst: dict[str, list[_Node]] = {}
    for n in sorted(nodes, key=lambda n: (n.start is None, n.start or datetime.min.replace(tzinfo=UTC))):
        by_inst.setdefault(n.rec.instance_id, []).append(n)
    events = store.events(dep)
    found: dict[str, _Preemption] = {}  # node id -> loss
    for n in nodes:
        if n.rec.status == "preempted" and (n.stop or n.start):
            found[n.rec.id] = _Preemption(n, n.stop or n.start, n.rec.error or "preempted")  # type: ignore[arg-type]
    for ev in events:
        if ev.kind != LOSS_KIND or not isinstance(ev.payload.get("lost"), dict):
            continue
        at = _ts(ev.ts, f"event {ev.id} ts")
        for iid, why in ev.payload["lost"].items():
            # the node of that instance that was up when the loss was decided
            up = [n for n in by_inst.get(iid, []) if n.start and n.start <= at and n.rec.id not in found]  # type: ignore[operator]
            if up:
                n = up[-1]
                found[n.rec.id] = _Preemption(n, n.stop or at, str(why))  # type: ignore[arg-type]
    # replacements: reprovision-start maps lost instance -> new instance; reprovisioned (same key) says when it served
    served = {e.payload.get("key"): _ts(e.ts, f"event {e.id} ts") for e in events if e.kind == SERVED_KIND}
    taken: set[str] = set()
    for ev in events:
        if ev.kind != REPLACE_KIND or not isinstance(ev.payload.get("replacements"), dict):
            continue
        for old_iid, new in ev.payload["replacements"].items():
            new_iid = new.get("id") if isinstance(new, dict) else str(new)
            lost = [p for p in found.values() if p.node.rec.instance_id == old_iid and p.replacement is None]
            cands = [n for n in by_inst.get(new_iid, []) if n.start and n.rec.id not in taken]
            if lost and cands:
                p = min(lost, key=lambda p: p.at)
                p.replacement, p.serving_at = cands[0], served.get(ev.payload.get("key")) or cands[0].start
                taken.add(cands[0].rec.id)
    # no events (a replacement made by hand, or a controller stopped half-way): the first node launched after the
    # loss on the same plan instance, else of the same GPU type
    lost_ids = set(found)
    for p in sorted(found.values(), key=lambda p: p.at):
        if p.replacement is not None:
            continue
        cands = [n for n in nodes if n.start is not None and n.rec.id not in taken and n.rec.id not in lost_ids
                 and n.start >= p.at - NOTICE and n.start > (p.node.start or p.at)
                 and (n.rec.instance_id == p.node.rec.instance_id or n.rec.gpu == p.node.rec.gpu)]
        if cands:
            best = min(cands, key=lambda n: (n.rec.instance_id != p.node.rec.instance_id, n.start))
            p.replacement, p.serving_at = best, best.start
            taken.add(best.rec.id)
    return sorted(found.values(), key=lambda p: p.at)


def deployment_report(store: Store, dep_id: str, *, since: datetime | None = None,
                      now: datetime | None = None) -> Report:
    """The cost report of one deployment over [since or its first launch, now or its last termination]."""
    dep = store.deployment(dep_id)
    now = (now or datetime.now(UTC)).astimezone(UTC)
    nodes = _nodes(store.nodes(dep_id))
    plan = store.plan(dep_id) if store.plan_versions(dep_id) else None
    launched = [n for n in nodes if n.start is not None]
    running = [n for n in launched if n.stop is None]
    end = now if running or not launched else max(n.stop for n in launched)  # type: ignore[type-var]
    first = min((n.start for n in launched), default=None) or _ts(dep.created_at, f"deployment {dep_id} created_at")
    start = since or first
    assert start is not None
    end = max(end, start)
    hours = _hours(start, end)
    window = f"{iso(start)} to {iso(end)} UTC"
    notes = [f"deployment {dep_id} ({dep.model or 'model ?'}, {dep.status}); window {window}"
             + (" (--since)" if since else "")]

    attr = None
    if plan:
        missing = {n.rec.instance_id for n in nodes if n.start is not None} - {i.id for i in plan.instances}
        older = [store.plan(dep_id, v) for v in store.plan_versions(dep_id) if v != plan.version] if missing else []
        attr = attribution(plan, older)
    if attr:
        notes.append(attr.note)
    else:
        notes.append("no plan stored: prompt/output cost split 50/50, no baselines or estimate")

    # -- per node
    preempts = _preemptions(store, dep_id, nodes)
    replaces = {p.replacement.rec.id: p.node.rec.id for p in preempts if p.replacement}
    node_rows, cost_total, prompt_cost = [], Decimal(0), Decimal(0)
    phase_acc: dict[str, dict[str, Any]] = {}
    per_hour_now = Decimal(0)
    for n in nodes:
        h = _overlap_hours(n, start, end)
        cost = n.price * h
        phases = attr.split(n.rec.instance_id, n.rec.gpus) if attr else {"no plan": (max(n.rec.gpus, 1), 0.5)}
        share = prompt_share(phases)
        live_at_end = n.start is not None and n.stop is None and end == now
        if live_at_end:
            per_hour_now += n.price
        inst = _plan_instance(plan, n.rec.instance_id)
        node_rows.append({
            "node": n.rec.id, "plan_instance": n.rec.instance_id, "cloud": n.rec.cloud, "region": n.rec.region,
            "zone": n.rec.zone, "instance_type": n.rec.instance_type, "gpus": f"{n.rec.gpus}x{n.rec.gpu}",
            "pricing": "spot" if n.rec.spot else "on-demand", "usd_per_hour": n.price,
            "price_source": f"{inst.source} ({inst.as_of})" if inst and inst.source else "",
            "status": n.rec.status, "launched_at": iso(n.start), "terminated_at": iso(n.stop),
            "hours": float(h), "cost_usd": cost, "prompt_share": round(share, 6), "replaces": replaces.get(n.rec.id),
        })
        cost_total += cost
        prompt_cost += cost * usd(share)
        total_gpus = sum(g for g, _ in phases.values())
        for ph, (g, s) in phases.items() if n.start is not None else ():
            acc = phase_acc.setdefault(ph, {"phase": ph, "gpus": 0, "usd_per_hour": Decimal(0), "gpu_hours": 0.0,
                                            "cost_usd": Decimal(0), "_prompt": Decimal(0)})
            frac = Decimal(g) / Decimal(total_gpus)
            if live_at_end:
                acc["gpus"] += g
                acc["usd_per_hour"] += n.price * frac
            acc["gpu_hours"] += float(h) * g
            acc["cost_usd"] += cost * frac
            acc["_prompt"] += cost * frac * usd(s)
    output_cost = cost_total - prompt_cost
    phase_rows = []
    for acc in phase_acc.values():
        acc["prompt_share"] = float(acc.pop("_prompt") / acc["cost_usd"]) if acc["cost_usd"] else None
        phase_rows.append(acc)

    cloud_rows: dict[str, dict[str, Any]] = {}
    for n, row in zip(nodes, node_rows, strict=True):
        c = cloud_rows.setdefault(n.rec.cloud or "?", {"cloud": n.rec.cloud or "?", "nodes": 0, "gpus": 0,
                                                       "usd_per_hour": Decimal(0), "gpu_hours": 0.0,
                                                       "cost_usd": Decimal(0)})
        c["nodes"] += 1 if n.start is not None else 0
        c["gpu_hours"] += row["hours"] * n.rec.gpus
        c["cost_usd"] += row["cost_usd"]
        if n.start is not None and n.stop is None and end == now:
            c["gpus"] += n.rec.gpus
            c["usd_per_hour"] += n.price

    # -- traffic
    usage = _usage_frame(store, dep_id)
    usage = usage[(usage["t"] >= pd.Timestamp(start)) & (usage["t"] <= pd.Timestamp(end))]
    requests, prompt_tok, output_tok = len(usage), int(usage["prompt"].sum()), int(usage["output"].sum())
    seconds = float(hours) * 3600
    billed = [n for n in nodes if _overlap_hours(n, start, end) > 0]
    covers_nodes = f"{len(billed)} node(s) billed in {window}"
    per_1m = lambda c, t: c * MILLION / Decimal(t) if t else None  # noqa: E731

    mean_prompt, mean_output = _workload_means(plan) if plan else (None, None)
    predicted = {}
    if plan and plan.predicted.goodput_rps > 0:
        predicted = _predicted_unit_costs(plan, attr, mean_prompt, mean_output)
    totals = [
        ("spend", cost_total, "$", covers_nodes),
        ("spend on spot", sum((r["cost_usd"] for r in node_rows if r["pricing"] == "spot"), Decimal(0)), "$",
         f"spot nodes in {window}"),
        ("spend on on-demand", sum((r["cost_usd"] for r in node_rows if r["pricing"] == "on-demand"), Decimal(0)),
         "$", f"on-demand nodes in {window}"),
        ("average $/h", cost_total / hours if hours else None, "$/h", f"spend / {float(hours):.3f} h of {window}"),
        ("$/h now", per_hour_now if end == now else Decimal(0), "$/h",
         f"{len(running)} node(s) running at {iso(end)}" if end == now else f"none running after {iso(end)}"),
        ("requests", requests, "requests", f"router usage rows in {window}"),
        ("prompt tokens", prompt_tok, "tokens", f"router counts in {window}"),
        ("output tokens", output_tok, "tokens", f"router counts in {window}"),
    ]
    if requests:
        totals += [
            ("$ per 1M prompt tokens", per_1m(prompt_cost, prompt_tok), "$/1M tokens",
             f"prompt-attributed spend {_money(prompt_cost)} $ / prompt tokens in {window}"),
            ("$ per 1M output tokens", per_1m(output_cost, output_tok), "$/1M tokens",
             f"output-attributed spend {_money(output_cost)} $ / output tokens in {window}"),
            ("$ per 1M tokens", per_1m(cost_total, prompt_tok + output_tok), "$/1M tokens",
             f"all spend / prompt + output tokens in {window}"),
        ]
    else:
        notes.append("no traffic recorded in the window: $/1M tokens are the plan's predictions at full goodput"
                     if plan else "no traffic recorded in the window and no plan: no $/1M tokens")
        totals += [
            ("$ per 1M prompt tokens", predicted.get("prompt"), "$/1M tokens",
             f"predicted by plan v{plan.version} at full goodput (no traffic yet)" if plan else "no plan, no traffic"),
            ("$ per 1M output tokens", predicted.get("output"), "$/1M tokens",
             f"predicted by plan v{plan.version} at full goodput (no traffic yet)" if plan else "no plan, no traffic"),
            ("$ per 1M tokens", predicted.get("all"), "$/1M tokens",
             f"predicted by plan v{plan.version} at full goodput (no traffic yet)" if plan else "no plan, no traffic"),
        ]

    # -- preemptions
    pre_rows = []
    preempts = [p for p in preempts if p.at <= end and (p.serving_at or end) >= start]
    for p in preempts:
        a, b = max(p.at, start), min(p.serving_at or end, end)
        rep = p.replacement
        pre_rows.append({
            "node": p.node.rec.id, "cause": p.cause, "preempted_at": iso(p.at),
            "replacement": rep.rec.id if rep else None,
            "serving_again_at": iso(p.serving_at), "downtime_s": max(0.0, (b - a).total_seconds()),
            "replacement_usd_per_hour": rep.price if rep else None,
            "replacement_cost_usd": rep.price * _overlap_hours(rep, start, end) if rep else None,
        })
    spot_lost = sum(1 for p in preempts if start <= p.at and p.node.rec.status == "preempted")
    totals += [
        ("preemptions", spot_lost, "count", f"nodes preempted (status preempted) in {window}"),
        ("other node losses", sum(1 for p in preempts if start <= p.at) - spot_lost, "count",
         f"nodes lost otherwise (failed, engines down) in {window}"),
        ("downtime", sum(r["downtime_s"] for r in pre_rows), "s",
         "each lost node to its replacement serving (or the window's end), summed, within the window"),
        ("replacement cost", sum((r["replacement_cost_usd"] or Decimal(0) for r in pre_rows), Decimal(0)), "$",
         f"replacement nodes in {window}"),
    ]

    # -- baselines and the estimate
    tables: dict[str, pd.DataFrame] = {}
    series: dict[str, pd.DataFrame] = {}
    base_rows, est_rows = [], []
    if plan:
        if requests and seconds > 0:
            rate, tokens_per_req = requests / seconds, (prompt_tok + output_tok) / requests
            basis = f"observed {rate:.4g} req/s in {window}"
        else:
            rate = plan.predicted.goodput_rps
            tokens_per_req = (mean_prompt or 0) + (mean_output or 0)
            basis = f"plan v{plan.version}'s predicted goodput (no traffic yet)"
        actual = {"usd_per_hour": cost_total / hours if hours else None, "cost_usd": cost_total,
                  "usd_per_1m_tokens": per_1m(cost_total, prompt_tok + output_tok)}
        base_rows, best = _baseline_rows(plan, {}, rate, tokens_per_req, hours, actual if requests else None)
        notes.append(f"baselines priced at {basis}: each plan's $/h scaled by rate / its predicted goodput "
                     "(replicas scaled linearly, same SLO)")
        if best:
            totals.append(("savings vs best baseline", best[1], "fraction",
                           f"1 - ours / {best[0]} $/h per req/s of goodput at the same SLO (plan predictions)"))
        est_rows = _estimate_rows(plan, attr, predicted, mean_prompt, mean_output, cost_total, hours, requests,
                                  prompt_tok, output_tok, prompt_cost, output_cost, window)
        series["unit_cost"] = _unit_cost_series(nodes, usage, start, end, base_rows, attr)
    series["spend"] = _spend_series(nodes, start, end)

    tables["totals"] = _frame("totals", [dict(zip(SCHEMAS["totals"], t, strict=True)) for t in totals])
    tables["nodes"] = _frame("nodes", node_rows)
    tables["phases"] = _frame("phases", phase_rows)
    tables["clouds"] = _frame("clouds", list(cloud_rows.values()))
    tables["preemptions"] = _frame("preemptions", pre_rows)
    tables["baselines"] = _frame("baselines", base_rows)
    tables["estimate"] = _frame("estimate", est_rows)
    return Report(f"thunderops cost report: {dep_id}", dep_id, iso(start), iso(end), tables, notes, series,
                  status=dep.status)


def _plan_instance(plan: Plan | None, instance_id: str):
    if plan is None:
        return None
    try:
        return plan.instance(instance_id)
    except KeyError:
        return None


def _predicted_unit_costs(plan: Plan, attr: Attribution | None, mean_prompt: float | None,
                          mean_output: float | None) -> dict[str, Decimal | None]:
    """$/1M prompt, output and all tokens the plan predicts at full goodput."""
    per_h = usd(plan.cost_per_hour)
    share = usd(attr.plan_share if attr else 0.5)
    rps = plan.predicted.goodput_rps
    out: dict[str, Decimal | None] = {"prompt": None, "output": None, "all": None}
    if mean_prompt:
        out["prompt"] = per_h * share * MILLION / usd(rps * mean_prompt * 3600)
    if mean_output:
        out["output"] = per_h * (1 - share) * MILLION / usd(rps * mean_output * 3600)
    if mean_prompt and mean_output:
        out["all"] = per_h * MILLION / usd(rps * (mean_prompt + mean_output) * 3600)
    return out


def _baseline_rows(plan: Plan, full: dict[str, Plan], rate: float, tokens_per_req: float, hours: Decimal,
                   actual: dict[str, Any] | None) -> tuple[list[dict[str, Any]], tuple[str, float] | None]:
    """Ours and each baseline: $/h per req/s of goodput, scaled to `rate` over `hours`; and the best saving."""
    strategies: list[tuple[str, float, float, int]] = [
        (f"{plan.strategy} (ours, plan v{plan.version})", plan.cost_per_hour, plan.predicted.goodput_rps,
         plan.total_gpus)]
    summary = dict(plan.inputs.get("baselines") or {})
    for name, p in full.items():
        summary[name] = {"cost_per_hour": p.cost_per_hour, "goodput_rps": p.predicted.goodput_rps, "gpus": p.total_gpus}
    for name, b in summary.items():
        try:
            strategies.append((name, float(b["cost_per_hour"]), float(b["goodput_rps"]), int(b.get("gpus") or 0)))
        except (KeyError, TypeError, ValueError):
            raise StateError(f"plan v{plan.version}: baseline {name!r} summary is malformed; re-plan with "
                             "`thunderops plan`") from None
    rows = []
    r = usd(round(rate, 9))
    for name, cost, goodput, gpus in strategies:
        per_rps = usd(cost) / usd(goodput) if goodput > 0 else None
        at_rate = per_rps * r if per_rps is not None else None
        rows.append({"strategy": name, "usd_per_hour": usd(cost), "goodput_rps": goodput, "gpus": gpus,
                     "usd_per_hour_per_rps": per_rps, "rate_rps": float(rate), "usd_per_hour_at_rate": at_rate,
                     "cost_usd": at_rate * hours if at_rate is not None and hours else None,
                     "usd_per_1m_tokens": per_rps * MILLION / usd(tokens_per_req * 3600)
                     if per_rps is not None and tokens_per_req else None})
    ours = rows[0]["usd_per_hour_per_rps"]
    best = None
    for row in rows[1:]:
        b = row["usd_per_hour_per_rps"]
        if ours is not None and b:
            row["ours_saves"] = float(1 - ours / b)
            if best is None or row["ours_saves"] < best[1]:
                best = (row["strategy"], row["ours_saves"])
    if actual is not None:
        rows.insert(1, {"strategy": f"{plan.strategy} (ours, actual)", "usd_per_hour": actual["usd_per_hour"],
                        "gpus": plan.total_gpus, "rate_rps": float(rate),
                        "usd_per_hour_at_rate": actual["usd_per_hour"], "cost_usd": actual["cost_usd"],
                        "usd_per_1m_tokens": actual["usd_per_1m_tokens"]})
    return rows, best


def _estimate_rows(plan: Plan, attr: Attribution | None, predicted: dict[str, Decimal | None],
                   mean_prompt: float | None, mean_output: float | None, cost: Decimal, hours: Decimal,
                   requests: int, prompt_tok: int, output_tok: int, prompt_cost: Decimal, output_cost: Decimal,
                   window: str) -> list[dict[str, Any]]:
    secs = float(hours) * 3600
    p = plan.predicted
    obs = requests > 0 and secs > 0

    def row(metric, pred, seen, unit, note=""):
        ratio = float(seen) / float(pred) if pred not in (None, 0) and seen is not None else None
        return {"metric": metric, "predicted": pred, "observed": seen, "unit": unit, "ratio": ratio, "note": note}

    per_1m = lambda c, t: c * MILLION / Decimal(t) if t else None  # noqa: E731
    return [
        row("$/h", usd(plan.cost_per_hour), cost / hours if hours else None, "$/h",
            f"plan v{plan.version} instances vs spend / hours in {window}"),
        row("requests/s", p.goodput_rps, requests / secs if obs else None, "req/s",
            "predicted: goodput at the SLO (capacity); observed: offered load, so ratio = utilisation"),
        row("output tokens/s", p.tokens_per_s, output_tok / secs if obs else None, "tok/s",
            "predicted at full goodput; observed average"),
        row("prompt tokens/request", mean_prompt, prompt_tok / requests if requests else None, "tokens/request",
            f"workload {plan.inputs.get('workload')!s} vs router counts"),
        row("output tokens/request", mean_output, output_tok / requests if requests else None, "tokens/request",
            f"workload {plan.inputs.get('workload')!s} vs router counts"),
        row("$ per 1M prompt tokens", predicted.get("prompt"), per_1m(prompt_cost, prompt_tok), "$/1M tokens",
            "predicted at full goodput; observed at the actual load (idle capacity costs too)"),
        row("$ per 1M output tokens", predicted.get("output"), per_1m(output_cost, output_tok), "$/1M tokens",
            "predicted at full goodput; observed at the actual load (idle capacity costs too)"),
    ]


# ------------------------------------------------------------------------------------------- plan view


def plan_report(plan: Plan, baselines: dict[str, Plan] | None = None) -> Report:
    """The pre-launch view of a plan: $/h per node, phase and cloud; predicted goodput and $/1M tokens; baselines."""
    attr = attribution(plan)
    mean_prompt, mean_output = _workload_means(plan)
    predicted = _predicted_unit_costs(plan, attr, mean_prompt, mean_output) if plan.predicted.goodput_rps else {}
    covers = f"plan v{plan.version} ({plan.strategy}), {len(plan.instances)} instance(s), before launch"
    nodes, phases, clouds = [], {}, {}
    for inst in plan.instances:
        price = usd(inst.price_per_hour)
        split = attr.instance_phases.get(inst.id) or {"unused": (inst.gpus, 0.0)}
        share = prompt_share(split)
        nodes.append({"node": inst.id, "plan_instance": inst.id, "cloud": inst.cloud, "region": inst.region,
                      "zone": inst.zone, "instance_type": inst.instance_type, "gpus": f"{inst.gpus}x{inst.gpu}",
                      "pricing": "spot" if inst.spot else "on-demand", "usd_per_hour": price,
                      "price_source": f"{inst.source} ({inst.as_of})" if inst.source else "", "status": "planned",
                      "prompt_share": round(share, 6)})
        tot = sum(g for g, _ in split.values()) or 1
        for ph, (g, s) in split.items():
            acc = phases.setdefault(ph, {"phase": ph, "gpus": 0, "usd_per_hour": Decimal(0), "_p": Decimal(0)})
            acc["gpus"] += g
            part = price * Decimal(g) / Decimal(tot)
            acc["usd_per_hour"] += part
            acc["_p"] += part * usd(s)
        c = clouds.setdefault(inst.cloud, {"cloud": inst.cloud, "nodes": 0, "gpus": 0, "usd_per_hour": Decimal(0)})
        c["nodes"] += 1
        c["gpus"] += inst.gpus
        c["usd_per_hour"] += price
    for acc in phases.values():
        p = acc.pop("_p")
        acc["prompt_share"] = float(p / acc["usd_per_hour"]) if acc["usd_per_hour"] else None
    full_per_h = sum((usd(i.price_per_hour) for i in plan.instances), Decimal(0))
    p = plan.predicted
    pred = f"predicted ({p.method}) by plan v{plan.version} at full goodput"
    totals = [
        ("$/h", full_per_h, "$/h", covers),
        ("budget", usd(plan.budget_per_hour), "$/h", "the plan's budget"),
        ("goodput", p.goodput_rps, "req/s", f"{pred}, {_slo_text(plan)}"),
        ("output tokens/s", p.tokens_per_s, "tok/s", pred),
        ("prompt tokens/s", p.goodput_rps * mean_prompt if mean_prompt else None, "tok/s",
         f"{pred} x mean prompt of workload {plan.inputs.get('workload')}"),
        ("$ per 1M prompt tokens", predicted.get("prompt"), "$/1M tokens", pred),
        ("$ per 1M output tokens", predicted.get("output"), "$/1M tokens", pred),
        ("$ per 1M tokens", predicted.get("all"), "$/1M tokens", pred),
    ]
    tokens_per_req = (mean_prompt or 0) + (mean_output or 0)
    rows, best = _baseline_rows(plan, baselines or {}, p.goodput_rps, tokens_per_req, Decimal(0), None)
    if best:
        totals.append(("savings vs best baseline", best[1], "fraction",
                       f"1 - ours / {best[0]} $/h per req/s of goodput at the same SLO (plan predictions)"))
    notes = [f"pre-launch view of plan v{plan.version} for {plan.model}: nothing is spent yet; all figures are "
             "$/h and predictions", attr.note,
             f"baselines at the plan's predicted goodput ({p.goodput_rps:g} req/s): each plan's $/h scaled by rate / "
             "its predicted goodput (replicas scaled linearly, same SLO)"]
    if not rows[1:]:
        notes.append("the plan carries no baselines (re-plan with `thunderops plan --out`, or pass "
                     "`thunderops plan --json --compare` output)")
    tables = {
        "totals": _frame("totals", [dict(zip(SCHEMAS["totals"], t, strict=True)) for t in totals]),
        "nodes": _frame("nodes", nodes), "phases": _frame("phases", list(phases.values())),
        "clouds": _frame("clouds", list(clouds.values())), "preemptions": _frame("preemptions", []),
        "baselines": _frame("baselines", rows), "estimate": _frame("estimate", []),
    }
    return Report(f"thunderops plan report: {plan.model}, {plan.strategy} plan v{plan.version}", None, None, None,
                  tables, notes)


def _slo_text(plan: Plan) -> str:
    s = plan.inputs.get("slo") or {}
    if not s:
        return "SLO not recorded"
    return f"SLO TTFT {s.get('ttft_s')} s / TPOT {s.get('tpot_s')} s at {float(s.get('attainment', 0)):.0%}"


def load_plan_file(path: str | Path) -> tuple[Plan, dict[str, Plan]]:
    """A plan file (`thunderops plan --out`) or the `--json --compare` output ({"plan": ..., "baselines": ...})."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ReportError(f"{path}: cannot read the plan ({e.strerror})") from None
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise ReportError(f"{path}: not valid JSON ({e}); write it with `thunderops plan --out FILE`") from None
    if not isinstance(d, dict):
        raise ReportError(f"{path}: not a plan (a JSON object is expected); write it with `thunderops plan --out FILE`")
    if "plan" in d and isinstance(d["plan"], dict):
        return Plan.from_dict(d["plan"]), {k: Plan.from_dict(v) for k, v in (d.get("baselines") or {}).items()}
    return Plan.from_dict(d), {}


# ------------------------------------------------------------------------------------------ chart data


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


# ---------------------------------------------------------------------------------------- display


def _money(v: Decimal | None, places: Decimal = CENT) -> str:
    return "-" if v is None else f"{v.quantize(places, ROUND_HALF_UP):,}"


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


# ------------------------------------------------------------------------------------------- several


def build_reports(store: Store, deployment: str | None, *, all_: bool = False, since: datetime | None = None,
                  now: datetime | None = None) -> list[Report]:
    if all_:
        deps = [d.id for d in store.deployments()]
        if not deps:
            raise ReportError(f"the state store {store.path} has no deployments yet (`thunderops up` makes one)")
    elif deployment:
        deps = [deployment]
    else:
        raise ReportError("name a DEPLOYMENT, or --all, or --plan plan.json")
    return [deployment_report(store, d, since=since, now=now) for d in deps]


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
