"""Procurement: turn catalog offers into a pool of instances the search may rent, under a $/h budget.

The catalog has hundreds of offers; most are dominated (the same GPU and node size dearer elsewhere). We keep the
cheapest few per (GPU, GPUs per node, spot) and, of each, as many copies as the budget could pay for (capped),
cheapest first, so "rent one more of these" is always "take the next idle copy".
"""

from __future__ import annotations

import math

import pandas as pd

from thunderops.errors import PlanError
from thunderops.perf import PerfModel
from thunderops.plan import SLO, Instance
from thunderops.scheduler.parallel import valid_tps
from thunderops.specs import get_gpu
from thunderops.workload import Workload


def _slug(name: str) -> str:
    return "".join(c for c in name.lower() if c.isalnum())


# A replica spanning more instances is one more way to lose it (a spot preemption or a failure of any of them
# takes the whole pipeline down) and one more network hop per token. Wider limits also grow the pool of offers
# (more small-GPU kinds qualify), which the search then explores more thinly.
MAX_REPLICA_NODES = 4
NO_NODE_LIMIT = 64  # "no limit": the most nodes per replica the memory checks look at


def min_nodes_for_replica(perf: PerfModel, gpu: str, gpus_per_node: int,
                          max_nodes: int = MAX_REPLICA_NODES) -> int | None:
    """Fewest nodes of this kind that hold one replica (TP inside a node, PP across), or None."""
    spec = get_gpu(gpu)
    tps = [t for t in valid_tps(perf.model.heads, gpus_per_node) if gpus_per_node % t == 0]
    if not tps:
        return None
    for n in range(1, max_nodes + 1):
        for t in sorted(tps, reverse=True):
            stages = [(spec, t)] * (n * gpus_per_node // t)
            if len(stages) <= perf.model.layers and perf.split_layers(stages, "decode") is not None:
                return n
    return None


def prune_offers(offers: pd.DataFrame, spot: bool | None, keep: int = 2) -> pd.DataFrame:
    """One row per (offer, pricing) with a `price` column; the cheapest `keep` per (GPU, GPUs/node, spot).

    spot=True: spot prices only; False: on-demand only; None: both (spot rows where a spot price exists)."""
    frames = []
    if spot is not True:
        od = offers.copy()
        od["spot"], od["price"] = False, od["price_ondemand"]
        frames.append(od)
    if spot is not False:
        sp = offers[offers["price_spot"].notna()].copy()
        sp["spot"], sp["price"] = True, sp["price_spot"]
        frames.append(sp)
    df = pd.concat(frames, ignore_index=True)
    df = df[df["price"] > 0].sort_values(["price", "cloud", "region", "zone", "instance_type"], kind="stable")
    return df.groupby(["gpu", "gpus_per_node", "spot"], sort=False).head(keep).reset_index(drop=True)


def build_pool(offers: pd.DataFrame, perf: PerfModel, budget: float, spot: bool | None = None, keep: int = 2,
               max_copies: int = 64, max_nodes_per_replica: int = MAX_REPLICA_NODES) -> list[Instance]:
    """Instances the search may rent: for each kept offer that can form a replica from at most
    `max_nodes_per_replica` of its nodes, copies up to what the budget pays for (at most `max_copies`)."""
    pruned = prune_offers(offers, spot, keep)
    pool: list[Instance] = []
    counters: dict[str, int] = {}
    usable: dict[tuple[str, int], int | None] = {}
    for row in pruned.itertuples(index=False):
        key = (row.gpu, int(row.gpus_per_node))
        if key not in usable:
            usable[key] = min_nodes_for_replica(perf, row.gpu, int(row.gpus_per_node), max_nodes_per_replica)
        if usable[key] is None or row.price * usable[key] > budget + 1e-9:
            continue
        copies = min(max_copies, int(math.floor(budget / row.price + 1e-9)))
        for _ in range(copies):
            stem = f"{_slug(row.gpu)}x{int(row.gpus_per_node)}{'-spot' if row.spot else ''}"
            counters[stem] = counters.get(stem, 0) + 1
            pool.append(Instance(
                id=f"{stem}-{counters[stem]}", cloud=row.cloud, region=row.region, zone=row.zone or "",
                instance_type=row.instance_type, gpu=row.gpu, gpus=int(row.gpus_per_node), spot=bool(row.spot),
                price_per_hour=float(row.price),
                network_gbps=None if pd.isna(row.network_gbps) else float(row.network_gbps),
                source=row.source, as_of=row.as_of,
            ))
    return pool


# With a target rate and no budget, the search may spend up to this multiple of what the cheapest single kind of
# offer needs to serve the rate alone: room for the mixes and phase splits that do it cheaper, and for the perf
# model's error (the rate's near misses are judged by the simulator).
RATE_HEADROOM = 1.5


def budget_for_rate(offers: pd.DataFrame, perf: PerfModel, workload: Workload, slo: SLO, rate: float,
                    spot: bool | None = None, max_nodes: int = MAX_REPLICA_NODES, max_copies: int = 64) -> float:
    """A $/h ceiling for the search when the user gives a rate and no budget: RATE_HEADROOM x the cheapest
    $/h at which one kind of offer serves `rate` alone, as colocated replicas (the smallest TP that holds the
    model inside a node, or a pipeline over the fewest nodes), by the perf model. A kind that would need more
    than `max_copies` nodes is out of reach; when every kind is, the ceiling is what `max_copies` nodes of the
    kind serving the most with them cost."""
    best, widest = None, None
    for row in prune_offers(offers, spot, keep=1).itertuples(index=False):
        g = int(row.gpus_per_node)
        n = min_nodes_for_replica(perf, row.gpu, g, max_nodes)
        if n is None:
            continue
        spec = get_gpu(row.gpu)
        tps = sorted(t for t in valid_tps(perf.model.heads, g) if g % t == 0)
        link = float(row.network_gbps) if not pd.isna(row.network_gbps) else 10.0
        layout, per_unit = None, 1.0  # a unit: one node, or the n nodes of a pipeline
        if n == 1:  # the smallest TP that holds a replica: gpus/tp replicas per node
            for t in tps:
                layout = perf.split_layers([(spec, t)], "colocated")
                if layout is not None:
                    per_unit = g / t
                    break
        if layout is None:
            layout = perf.split_layers([(spec, tps[-1])] * (n * g // tps[-1]), "colocated", pp_link_gbps=link)
        cap = perf.capacity(layout, "colocated", workload, slo) * per_unit if layout is not None else 0.0
        if cap <= 0:
            continue
        nodes = n * math.ceil(rate / cap)
        if nodes <= max_copies:
            cost = nodes * float(row.price)
            best = cost if best is None else min(best, cost)
        elif best is None:  # out of this kind's reach: remember what its most nodes would cost and serve
            most = max_copies // n * n
            if most and (widest is None or most // n * cap > widest[1]):
                widest = (most * float(row.price), most // n * cap)
    if best is None and widest is not None:  # no kind serves the rate alone: the one that comes closest
        best = widest[0]
    if best is None:  # the model fits nowhere (check_budget says so), or no kind meets the SLO colocated alone
        cheapest = cheapest_replica_cost(offers, perf, spot, max_nodes)
        return math.inf if cheapest is None else 8 * cheapest
    return RATE_HEADROOM * best


def cheapest_replica_cost(offers: pd.DataFrame, perf: PerfModel, spot: bool | None = None,
                          max_nodes: int = MAX_REPLICA_NODES) -> float | None:
    """$/h of the cheapest single replica any one offer can form (None when the model fits nowhere)."""
    best = None
    pruned = prune_offers(offers, spot, keep=1)
    for row in pruned.itertuples(index=False):
        n = min_nodes_for_replica(perf, row.gpu, int(row.gpus_per_node), max_nodes=max_nodes)
        if n is not None and (best is None or n * row.price < best):
            best = n * row.price
    return best


def check_budget(offers: pd.DataFrame, perf: PerfModel, budget: float, spot: bool | None,
                 max_nodes: int = MAX_REPLICA_NODES) -> None:
    """Raise a one-line PlanError when no offer can host the model on `max_nodes` nodes per replica, or the
    budget cannot pay for a replica."""
    if not budget > 0:
        raise PlanError(f"budget must be a positive $/h figure, got {budget}")
    cheapest = cheapest_replica_cost(offers, perf, spot, max_nodes)
    if cheapest is None:
        gpus = ", ".join(sorted(offers["gpu"].unique()))
        raise PlanError(f"{perf.model.name} ({perf.model.weight_bytes / 1e9:.0f} GB) fits no offered GPU even on "
                        f"{max_nodes} nodes per replica ({gpus}); widen --clouds/--regions, raise --max-replica-nodes "
                        "or pick a smaller model")
    if cheapest > budget + 1e-9:
        raise PlanError(f"budget {budget:g} $/h is too small for one replica of {perf.model.name}; "
                        f"the cheapest feasible budget is {math.ceil(cheapest * 100) / 100:.2f} $/h")
