"""Plans built from real catalog offers, for the provisioning tests."""

from __future__ import annotations

from datetime import UTC, datetime

from thunderops.catalog import load_offers
from thunderops.plan import Group, Instance, Plan, Stage
from thunderops.provision.skypilot import offer_instance
from thunderops.state import NodeRecord


def cheapest(gpu: str, gpus: int, *, cloud: str | None = None, spot: bool = False, skip: int = 0):
    """The `skip`-th cheapest offer row for `gpus` x `gpu` (optionally on one cloud)."""
    df = load_offers(clouds=cloud, gpus=gpu, spot=spot or None)
    df = df[df["gpus_per_node"] == gpus]
    return df.iloc[skip]


def plan_of(rows: list[tuple[str, object, bool]], model: str = "llama-2-7b", budget: float | None = None,
            slack: float = 0.0) -> Plan:
    """A colocated plan with one group per instance: rows are (instance id, offer row, spot)."""
    insts: list[Instance] = []
    for inst_id, row, spot in rows:
        base = Instance(id=inst_id, cloud="", region="", zone="", instance_type="", gpu=str(row["gpu"]),
                        gpus=int(row["gpus_per_node"]), spot=spot, price_per_hour=0.0)
        insts.append(offer_instance(base, row, spot))
    cost = sum(i.price_per_hour for i in insts)
    groups = [Group(id=f"g{k}", phase="colocated",
                    stages=[Stage(instance=i.id, gpu=i.gpu, tp=i.gpus, layers=32, gpu_ids=list(range(i.gpus)))])
              for k, i in enumerate(insts)]
    return Plan(model=model, budget_per_hour=budget if budget is not None else cost + slack, cost_per_hour=cost,
                instances=insts, groups=groups, routing=[])


def max_concurrent_cost(nodes: list[NodeRecord]) -> float:
    """The highest $/h ever billed at once, from the store's launch/termination times (nodes still up count
    until now). Termination times are recorded after the cloud confirms, so this over-estimates, never under."""
    now = datetime.now(UTC).isoformat()
    points = []
    for n in nodes:
        if n.launched_at:
            points.append((n.launched_at, 1, n.price_per_hour))
            points.append((n.terminated_at or now, 0, -n.price_per_hour))
    total = best = 0.0
    for _, _, delta in sorted(points, key=lambda p: (p[0], -p[1])):
        total += delta
        best = max(best, total)
    return best
