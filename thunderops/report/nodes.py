"""What the state store says about a deployment's nodes: billed time per node, router usage, and losses.

Preemptions and other losses come from the controller (thunderops/controller/): a lost node has status
`preempted` (or `failed`) and `terminated_at`; the `reschedule` event lists lost plan instances; `reprovision-start`
maps each lost instance to its replacement instance and `reprovisioned` (same key) says when the replacement
serves. Downtime runs from the loss to that moment (or the replacement's launch, or the window's end). Without
those events, a lost node's replacement is the first node launched after it went on the same plan instance, else
of the same GPU type.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pandas as pd

from thunderops.errors import StateError
from thunderops.report.money import _hours, _ts, usd
from thunderops.state import NodeRecord, Store

LOSS_KIND = "reschedule"  # the controller's decision on lost nodes: payload {"lost": {instance id: why}}
REPLACE_KIND = "reprovision-start"  # payload {"key": K, "replacements": {lost instance id: {"id": new id, ...}}}
SERVED_KIND = "reprovisioned"  # payload {"key": K}: the replacements serve from this event's ts
NOTICE = timedelta(minutes=2)  # a replacement may be launched on a preemption notice, before the node goes


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
