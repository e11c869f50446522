"""The cost report of a deployment from the state store (`deployment_report`), and of several (`build_reports`)."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pandas as pd

from thunderops.errors import ReportError
from thunderops.plan import Plan
from thunderops.report.attribution import Attribution, _workload_means, attribution, prompt_share
from thunderops.report.baselines import _baseline_rows, _predicted_unit_costs
from thunderops.report.model import Report
from thunderops.report.money import MILLION, SCHEMAS, _frame, _hours, _money, _ts, iso, usd
from thunderops.report.nodes import _nodes, _overlap_hours, _preemptions, _usage_frame
from thunderops.report.series import _spend_series, _unit_cost_series
from thunderops.state import Store


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
