"""The deployment plan: plain data passed between pipeline steps and stored as versioned JSON.

A Plan says which instances to rent, how their GPUs form serving groups (each one model replica with
a phase and a parallel layout), how requests are routed from prefill to decode replicas, and what the
performance model predicts. Nothing here computes; the scheduler makes Plans, later steps read them.

The module is also the notebook entry point: `thunderops.plan(25, "llama-3.1-70b", "coding")` calls it, and it
hands the call to `thunderops.scheduler.plan`.
"""

from __future__ import annotations

import json
import math
import sys
import types
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from thunderops.errors import PlanError

PHASES = ("prefill", "decode", "colocated")
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class SLO:
    """Latency targets: time to first token and time per output token (seconds), met by `attainment` of requests."""

    ttft_s: float = 2.0
    tpot_s: float = 0.1
    attainment: float = 0.9

    def __post_init__(self) -> None:
        if not (self.ttft_s > 0 and self.tpot_s > 0):
            raise PlanError(f"SLO targets must be positive seconds, got ttft={self.ttft_s} tpot={self.tpot_s}")
        if not 0 < self.attainment <= 1:
            raise PlanError(f"SLO attainment must be in (0, 1], got {self.attainment}")


@dataclass
class Instance:
    """One rented (or owned) node. `price_per_hour` is $/h for the whole node at the chosen spot/on-demand rate."""

    id: str
    cloud: str
    region: str
    zone: str
    instance_type: str
    gpu: str
    gpus: int
    spot: bool
    price_per_hour: float
    network_gbps: float | None = None
    source: str = ""
    as_of: str = ""
    host: str | None = None  # address once provisioned (local inventory or a launched cluster)


@dataclass
class Stage:
    """One pipeline stage: `tp` GPUs of one instance holding `layers` consecutive layers."""

    instance: str
    gpu: str
    tp: int
    layers: int
    gpu_ids: list[int] = field(default_factory=list)


@dataclass
class Group:
    """One model replica. Its pipeline stages run in order; `phase` is prefill, decode or colocated."""

    id: str
    phase: str
    stages: list[Stage]

    @property
    def tp(self) -> int:
        """The largest TP degree among stages (stages may differ in a heterogeneous pipeline)."""
        return max(s.tp for s in self.stages)

    @property
    def pp(self) -> int:
        return len(self.stages)

    @property
    def layer_split(self) -> list[int]:
        return [s.layers for s in self.stages]

    @property
    def gpus(self) -> int:
        return sum(s.tp for s in self.stages)

    @property
    def instances(self) -> list[str]:
        return list(dict.fromkeys(s.instance for s in self.stages))


@dataclass
class Route:
    """Fraction of all requests prefilled on `prefill` and decoded on `decode` (fractions sum to 1).

    `kv_compression` is the ratio of transferred to raw KV bytes (1.0 = none, 0.25 = 4-bit)."""

    prefill: str
    decode: str
    fraction: float
    kv_compression: float = 1.0


@dataclass
class Prediction:
    """What the performance model (and the simulator, when it checked) expects of the plan."""

    goodput_rps: float = 0.0
    tokens_per_s: float = 0.0
    ttft_p50: float = 0.0
    ttft_p90: float = 0.0
    tpot_p50: float = 0.0
    tpot_p90: float = 0.0
    slo_attainment: float = 0.0
    method: str = "model"  # "model" (analytic) or "sim" (simulated)


def goodput_change(before: Prediction, after: Prediction) -> str:
    """'8.38 -> 7.45 req/s' for two plans' predicted goodput, each figure marked with how it was found when the
    two differ ('8.38 (simulated) -> 7.45 (model) req/s'): the simulator's check and the model's estimate of
    the same plan can differ by about 20 %, which is no change of the plan."""
    if before.method == after.method:
        return f"{before.goodput_rps:.2f} -> {after.goodput_rps:.2f} req/s"
    name = {"sim": "simulated", "model": "model"}
    return (f"{before.goodput_rps:.2f} ({name.get(before.method, before.method)}) -> "
            f"{after.goodput_rps:.2f} ({name.get(after.method, after.method)}) req/s")


@dataclass
class Plan:
    """A complete deployment plan. `inputs` records what it was made from (model, workload, SLOs, budget, ...)."""

    model: str
    budget_per_hour: float
    cost_per_hour: float
    instances: list[Instance]
    groups: list[Group]
    routing: list[Route]
    predicted: Prediction = field(default_factory=Prediction)
    inputs: dict[str, Any] = field(default_factory=dict)
    bandwidth_gbps: dict[str, dict[str, float]] = field(default_factory=dict)  # instance -> instance -> Gbps
    strategy: str = "thunderops"
    version: int = 1
    schema: int = SCHEMA_VERSION

    def instance(self, instance_id: str) -> Instance:
        for inst in self.instances:
            if inst.id == instance_id:
                return inst
        raise KeyError(instance_id)

    def group(self, group_id: str) -> Group:
        for g in self.groups:
            if g.id == group_id:
                return g
        raise KeyError(group_id)

    def groups_in(self, *phases: str) -> list[Group]:
        return [g for g in self.groups if g.phase in phases]

    @property
    def total_gpus(self) -> int:
        return sum(i.gpus for i in self.instances)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for gd, g in zip(d["groups"], self.groups, strict=True):
            gd.update(tp=g.tp, pp=g.pp, layer_split=g.layer_split, gpus=g.gpus)
        return d

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False)

    def save(self, path: str | Path) -> None:
        """Write atomically (a temp file then rename) so a crash never leaves half a plan."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        try:
            tmp.write_text(self.to_json())
            tmp.replace(path)
        except OSError as e:
            if tmp.parent.is_dir():
                tmp.unlink(missing_ok=True)
            raise PlanError(f"{path}: cannot write the plan ({e.strerror}); pick a file in a writable "
                            "directory") from None

    def check(self) -> Plan:
        """Refuse a plan that does not hold together (a hand-edited or damaged file): money that is not a
        non-negative number, replicas on instances or GPUs the plan does not have, routes to replicas it does
        not have. Returns the plan. Whether a layer split suits the model is `engine_commands`' to judge."""
        def number(x: Any, what: str, low: float = 0.0) -> None:
            if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x) or x < low:
                raise PlanError(f"{what} must be a number >= {low:g}, got {x!r}; re-create the plan with "
                                "`thunderops plan --out`")

        def count(x: Any, what: str, low: int) -> None:
            if isinstance(x, bool) or not isinstance(x, int) or x < low:
                raise PlanError(f"{what} must be a whole number >= {low}, got {x!r}; re-create the plan with "
                                "`thunderops plan --out`")

        number(self.budget_per_hour, "budget_per_hour ($/h)")
        number(self.cost_per_hour, "cost_per_hour ($/h)")
        insts: dict[str, Instance] = {}
        for i in self.instances:
            if i.id in insts:
                raise PlanError(f"instance id {i.id!r} appears twice in the plan; ids must be unique")
            number(i.price_per_hour, f"instance {i.id}: price_per_hour ($/h)")
            count(i.gpus, f"instance {i.id}: gpus", 1)
            insts[i.id] = i
        used: dict[tuple[str, int], str] = {}
        taken: dict[str, int] = {}  # GPUs of each instance the replicas use (whether or not they name ids)
        gids: set[str] = set()
        for g in self.groups:
            if g.id in gids:
                raise PlanError(f"group id {g.id!r} appears twice in the plan; ids must be unique")
            gids.add(g.id)
            if not g.stages:
                raise PlanError(f"group {g.id} has no stages; re-create the plan with `thunderops plan --out`")
            for s in g.stages:
                inst = insts.get(s.instance)
                if inst is None:
                    raise PlanError(f"group {g.id} uses instance {s.instance!r}, which the plan does not have "
                                    f"(instances: {', '.join(insts) or 'none'})")
                if s.gpu != inst.gpu:
                    raise PlanError(f"group {g.id} says instance {inst.id} has {s.gpu} GPUs, the instance says "
                                    f"{inst.gpu}; make them agree")
                count(s.tp, f"group {g.id}: tp", 1)
                count(s.layers, f"group {g.id}: layers", 0)
                taken[inst.id] = taken.get(inst.id, 0) + s.tp
                for k in s.gpu_ids:
                    count(k, f"group {g.id}: gpu id", 0)
                    if k >= inst.gpus:
                        raise PlanError(f"group {g.id} uses GPU {k} of {inst.id}, which has {inst.gpus} "
                                        f"(ids 0-{inst.gpus - 1})")
                    if (inst.id, k) in used and used[(inst.id, k)] != g.id:
                        raise PlanError(f"GPU {k} of {inst.id} is in both {used[(inst.id, k)]} and {g.id}; "
                                        "a GPU serves one replica")
                    used[(inst.id, k)] = g.id
        for iid, n in taken.items():
            if n > insts[iid].gpus:
                raise PlanError(f"the plan's replicas use {n} GPUs of {iid}, which has {insts[iid].gpus}; "
                                "a GPU serves one replica")
        for r in self.routing:
            for role, gid in (("prefill", r.prefill), ("decode", r.decode)):
                if gid not in gids:
                    raise PlanError(f"a route's {role} replica {gid!r} is not a group of the plan "
                                    f"(groups: {', '.join(sorted(gids)) or 'none'})")
            number(r.fraction, f"route {r.prefill}->{r.decode}: fraction")
            number(r.kv_compression, f"route {r.prefill}->{r.decode}: kv_compression")
            if r.fraction > 1 + 1e-9 or not 0 < r.kv_compression <= 1:
                raise PlanError(f"route {r.prefill}->{r.decode}: fraction must be in [0, 1] and kv_compression "
                                f"in (0, 1], got {r.fraction!r} and {r.kv_compression!r}")
        return self

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        try:
            groups = []
            for g in d["groups"]:
                if g["phase"] not in PHASES:
                    raise PlanError(f"group {g.get('id')}: phase must be one of {', '.join(PHASES)}, got {g['phase']!r}")
                groups.append(Group(id=g["id"], phase=g["phase"], stages=[Stage(**s) for s in g["stages"]]))
            return cls(
                model=d["model"],
                budget_per_hour=float(d["budget_per_hour"]),
                cost_per_hour=float(d["cost_per_hour"]),
                instances=[Instance(**i) for i in d["instances"]],
                groups=groups,
                routing=[Route(**r) for r in d.get("routing", [])],
                predicted=Prediction(**d.get("predicted", {})),
                inputs=dict(d.get("inputs", {})),
                bandwidth_gbps={k: dict(v) for k, v in d.get("bandwidth_gbps", {}).items()},
                strategy=d.get("strategy", "thunderops"),
                version=int(d.get("version", 1)),
                schema=int(d.get("schema", SCHEMA_VERSION)),
            ).check()
        except PlanError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise PlanError(f"malformed plan: {type(e).__name__}: {e}; re-create it with `thunderops plan --out`") from None

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise PlanError(f"plan is not valid JSON ({e}); re-create it with `thunderops plan --out`") from None

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise PlanError(f"{path}: cannot read plan ({e.strerror})") from None
        return cls.from_json(text)


class _CallableModule(types.ModuleType):
    """Makes `thunderops.plan` callable whichever way it is reached. Python binds a submodule as its package's
    attribute when the submodule loads, so a function `thunderops.plan` beside this module would turn into the
    module the first time anything imported `thunderops.plan` (the scheduler does): one call would work and the
    next would fail. Setting a module's `__class__` is Python's documented way to customize a module."""

    def __call__(self, *args: Any, **kwargs: Any) -> Plan:
        """Find a deployment plan; the arguments and their defaults are `thunderops.scheduler.plan`'s."""
        from thunderops.scheduler import plan as find_plan

        return find_plan(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
