"""The pre-launch view of a plan file and its baselines (`plan_report`, `load_plan_file`)."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

from thunderops.errors import ReportError
from thunderops.plan import Plan
from thunderops.report.attribution import _workload_means, attribution, prompt_share
from thunderops.report.baselines import _baseline_rows, _predicted_unit_costs
from thunderops.report.model import Report
from thunderops.report.money import SCHEMAS, _frame, usd


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
