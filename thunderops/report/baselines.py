"""A plan's predictions priced: $/1M tokens at full goodput, and ours and the baseline plans at a request rate."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from thunderops.errors import StateError
from thunderops.plan import Plan
from thunderops.report.attribution import Attribution
from thunderops.report.money import MILLION, usd


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
