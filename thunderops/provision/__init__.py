"""Provisioning: turn a Plan into running nodes. Two providers share one interface:

- `skypilot` (thunderops.provision.skypilot): each plan instance becomes a SkyPilot cluster on a cloud;
- `local` (thunderops.provision.local): machines you already have (or `--emulate`d ones) joined in a Ray cluster.

Later steps (netbench, serve, controller) only see `Node`s: where a plan instance runs and on which ports.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field

from thunderops.errors import ProvisionError
from thunderops.plan import Plan

# Default ports on every node (those of thunderops.serve.vllm.EngineOptions and thunderops.agent). A node
# holding several engines (several groups on one instance) uses engine + k and kv + k for its k-th engine
# (k = 0, 1, ... in plan order); the agent also uses agent + 1 (data) and agent + 2 (iperf3).
ENGINE_PORT = 8100
KV_PORT = 9100  # vLLM NIXL side channel (VLLM_NIXL_SIDE_CHANNEL_PORT) = engine port + 1000
AGENT_PORT = 8790
RAY_PORT = 10000  # engines spanning nodes: one Ray port block per such group (thunderops.serve.ray_cluster)


@dataclass
class Ports:
    engine: int = ENGINE_PORT
    kv: int = KV_PORT
    agent: int = AGENT_PORT
    ray: int = RAY_PORT  # never opened to the internet: a group's nodes use their private network


@dataclass
class Node:
    """A provisioned plan instance.

    `id` is unique across deployments (the store's node id); `instance_id` is the plan's `Instance.id`;
    `cluster_name` is the SkyPilot cluster (or Ray node name for the local provider); `host` is its address."""

    id: str
    deployment: str
    instance_id: str
    cluster_name: str
    host: str | None
    gpu: str
    gpus: int
    status: str
    ports: Ports = field(default_factory=Ports)

    @classmethod
    def from_record(cls, rec) -> Node:  # rec: thunderops.state.NodeRecord
        return cls(
            id=rec.id, deployment=rec.deployment, instance_id=rec.instance_id, cluster_name=rec.cluster_name,
            host=rec.host, gpu=rec.gpu, gpus=rec.gpus, status=rec.status,
            ports=Ports(rec.engine_port or ENGINE_PORT, rec.kv_port or KV_PORT, rec.agent_port or AGENT_PORT),
        )


@dataclass
class ProvisionResult:
    """What `Provider.up` achieved. `plan` is the plan actually provisioned (fallbacks and re-plans may change
    instances); `plan_version` its version in the store. `ok` is False when the plan could not be met.
    `blocked`: offers (cloud, region, zone, instance type, spot) that failed for capacity or timed out;
    `replans`: how many times the plan was re-made without them; `unavailable`: on failure, the GPU types that
    could not be had (empty when something else went wrong)."""

    deployment: str
    plan: Plan
    plan_version: int
    nodes: list[Node]
    ok: bool = True
    message: str = ""
    blocked: list[tuple] = field(default_factory=list)
    replans: int = 0
    unavailable: list[str] = field(default_factory=list)


@dataclass
class DownResult:
    """What `Provider.down` tore down: cluster names, and which of them the store did not know about."""

    deployment: str | None
    terminated: list[str] = field(default_factory=list)
    unrecorded: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


class Provider(abc.ABC):
    """Provisions a plan's instances for a deployment; records intent and outcome in the state store."""

    name: str = ""

    @abc.abstractmethod
    def up(self, deployment: str, plan: Plan, *, keep_partial: bool = False) -> ProvisionResult:
        """Bring up every instance of `plan` (the deployment exists in the store, plan stored as a version)."""

    @abc.abstractmethod
    def status(self, deployment: str) -> list[Node]:
        """The deployment's nodes as they stand now (reconciled with the provider where it can tell)."""

    @abc.abstractmethod
    def down(self, deployment: str | None) -> DownResult:
        """Tear down the deployment's nodes (all thunderops nodes when `deployment` is None). Idempotent."""

    @abc.abstractmethod
    def down_node(self, node_id: str) -> DownResult:
        """Tear down one node (the store's node id) and record it terminated; the controller lets a lost or
        replaced node go with it. Idempotent; raises when the node could not be torn down."""


def stored_version(store, deployment: str, plan: Plan) -> int:
    """The store's version of `plan`: its own when already stored, else a new version. A sub-plan (the
    controller provisioning replacements for some instances of a stored version) is never stored: the
    caller stores the plan that folds them in once they serve."""
    if plan.version in store.plan_versions(deployment):
        return plan.version
    return store.add_plan(deployment, plan)


def is_whole_plan(store, deployment: str, plan: Plan) -> bool:
    """Whether `plan` is the deployment's full plan (not a controller's sub-plan of replacements)."""
    if plan.version not in store.plan_versions(deployment):
        return True
    stored = store.plan(deployment, plan.version)
    return {i.id for i in stored.instances} == {i.id for i in plan.instances}


def get_provider(name: str, **kwargs) -> Provider:
    """The provider called `name` ('skypilot' or 'local')."""
    if name == "skypilot":
        from thunderops.provision.skypilot import SkyPilotProvider

        return SkyPilotProvider(**kwargs)
    if name == "local":
        from thunderops.provision.local import LocalProvider

        return LocalProvider(**kwargs)
    raise ProvisionError(f"unknown provider {name!r}: use --provider skypilot or --provider local")
