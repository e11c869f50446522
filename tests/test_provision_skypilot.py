"""The SkyPilot provider against FakeSkyCloud (the cloud side of SkyPilot's SDK): parallel launches, fallbacks
within the budget, and fault injection at every step. The invariant everywhere: after `down`, the clusters
that exist but should not == 0, and the store tells what happened."""

from __future__ import annotations

import pytest
from fakes.fake_sky import FakeSkyCloud
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from provision_helpers import cheapest, max_concurrent_cost, plan_of

from thunderops.errors import ProvisionError, StateError
from thunderops.provision.skypilot import SkyPilotProvider
from thunderops.provision.tasks import cluster_name, cluster_prefix
from thunderops.state import Store


@pytest.fixture
def cloud(tmp_path) -> FakeSkyCloud:
    return FakeSkyCloud(tmp_path / "fake-sky.json")


def provider(cloud, **kw) -> SkyPilotProvider:
    kw.setdefault("launch_timeout_s", 10)
    kw.setdefault("cancel_grace_s", 5)
    return SkyPilotProvider(Store(), cloud, **kw)


def three_node_plan(**kw):
    return plan_of([("a100", cheapest("A100-80GB", 1, cloud="gcp"), False),
                    ("l4", cheapest("L4", 1, cloud="aws", spot=True), True),
                    ("t4", cheapest("T4", 1, cloud="aws"), False)], **kw)


def start(store: Store, dep: str, plan) -> None:
    store.create_deployment(dep, provider="skypilot", model=plan.model, budget_per_hour=plan.budget_per_hour)
    store.add_plan(dep, plan)


def test_parallel_launch_records_intent_and_outcome_then_down_leaves_nothing(cloud):
    p = provider(cloud)
    plan = three_node_plan()
    start(p.store, "d1", plan)
    result = p.up("d1", plan)
    assert result.ok, result.message
    assert [n.instance_id for n in result.nodes] == ["a100", "l4", "t4"]
    assert all(n.host and n.status == "ready" for n in result.nodes)
    assert cloud.names() == {cluster_name("d1", i, 1) for i in ("a100", "l4", "t4")}
    recs = p.store.nodes("d1")
    assert {r.status for r in recs} == {"ready"} and all(r.launched_at for r in recs)
    assert p.store.cost_per_hour("d1") == pytest.approx(plan.cost_per_hour)
    assert p.store.deployment("d1").status == "up"
    infra = {c["infra"] for c in cloud.read()["clusters"].values()}
    assert any(i.startswith("gcp/us-central1/") for i in infra)
    down = p.down("d1")
    assert sorted(down.terminated) == sorted(r.cluster_name for r in recs) and down.unrecorded == []
    assert cloud.names() == set()
    assert {r.status for r in p.store.nodes("d1")} == {"terminated"}
    assert p.down("d1").terminated == []  # idempotent
    assert p.store.deployment("d1").status == "down"


def test_down_node_tears_down_one_cluster_and_keeps_the_others(cloud):
    p = provider(cloud)
    plan = three_node_plan()
    start(p.store, "d1", plan)
    nodes = {n.instance_id: n for n in p.up("d1", plan).nodes}
    p.store.update_node(nodes["l4"].id, status="preempted")  # the controller marks a lost node first
    assert p.down_node(nodes["l4"].id).terminated == [nodes["l4"].cluster_name]
    assert cloud.names() == {nodes["a100"].cluster_name, nodes["t4"].cluster_name}
    rec = p.store.node(nodes["l4"].id)
    assert rec.status == "preempted" and rec.terminated_at  # why it ended is kept; billing stopped
    assert p.down_node(nodes["l4"].id).terminated == []  # gone from SkyPilot's list: nothing to do
    assert p.down_node(nodes["a100"].id).terminated and p.store.node(nodes["a100"].id).status == "terminated"
    assert p.down_node(nodes["a100"].id).terminated == []  # idempotent
    assert cloud.names() == {nodes["t4"].cluster_name}
    assert [e.payload["node"] for e in p.store.events("d1", "node-down")] == [nodes["l4"].id, nodes["a100"].id]
    # a node recorded as terminated (the controller records a lost node before letting it go) whose cluster
    # SkyPilot still lists is torn down all the same
    p.store.update_node(nodes["t4"].id, status="terminated")
    assert p.down_node(nodes["t4"].id).terminated == [nodes["t4"].cluster_name]
    assert cloud.names() == set()
    p.down("d1")
    assert cloud.names() == set()


def test_capacity_failure_falls_back_to_next_offer_within_budget_and_stores_a_new_plan_version(cloud):
    plan = three_node_plan(slack=5.0)
    target = plan.instance("a100")
    cloud.add_rule(f"{target.zone} {target.instance_type}", "capacity", times=1)
    p = provider(cloud)
    start(p.store, "d1", plan)
    result = p.up("d1", plan)
    assert result.ok, result.message
    moved = result.plan.instance("a100")
    assert (moved.region, moved.zone) != (target.region, target.zone) or moved.spot != target.spot
    assert moved.gpu == target.gpu and moved.gpus == target.gpus
    assert result.plan.cost_per_hour <= plan.budget_per_hour
    assert p.store.plan_versions("d1") == [1, 2] and result.plan_version == 2
    changed = p.store.events("d1", kind="plan-changed")[0].payload
    assert changed == {"before": 1, "after": 2}
    assert len(p.store.events("d1", kind="fallback")) == 1
    assert cloud.names() == {n.cluster_name for n in result.nodes}
    assert max_concurrent_cost(p.store.nodes("d1")) <= plan.budget_per_hour + 1e-9
    p.down("d1")
    assert cloud.names() == set()


def test_fallbacks_stop_at_the_budget_then_give_up_and_tear_everything_down(cloud):
    plan = three_node_plan(slack=0.05)  # room for a slightly dearer L4 spot zone or two, not more
    l4 = plan.instance("l4")
    cloud.add_rule("to-d1-l4-", "capacity", times=100)  # every attempt for this node fails
    cloud.set(launch_delay_s=0.3)
    p = provider(cloud, max_attempts=50)
    start(p.store, "d1", plan)
    result = p.up("d1", plan)
    assert not result.ok and "l4" in result.message and "within" in result.message
    assert cloud.names() == set()
    assert p.store.deployment("d1").status == "failed"
    assert p.store.nodes("d1", live_only=True) == []
    tried = [r for r in p.store.nodes("d1") if r.instance_id == "l4"]
    assert len(tried) >= 2  # it did fall back before giving up
    others = plan.cost_per_hour - l4.price_per_hour
    assert all(r.price_per_hour + others <= plan.budget_per_hour + 1e-9 for r in tried)
    assert max_concurrent_cost(p.store.nodes("d1")) <= plan.budget_per_hour + 1e-9


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(slack=st.sampled_from([0.0, 0.05, 0.3, 2.0]),
       failures=st.dictionaries(st.sampled_from(["a100", "l4", "t4"]),
                                st.tuples(st.sampled_from(["capacity", "capacity_partial", "hang"]),
                                          st.integers(1, 4)), max_size=3))
def test_no_sequence_of_fallbacks_goes_above_the_budget(tmp_path_factory, slack, failures):
    cloud = FakeSkyCloud(tmp_path_factory.mktemp("sky") / "fake-sky.json")
    for inst, (action, times) in failures.items():
        cloud.add_rule(f"to-d1-{inst}-", action, times=times)
    p = SkyPilotProvider(Store(tmp_path_factory.mktemp("home") / "state.db"), cloud, launch_timeout_s=0.3,
                         cancel_grace_s=2, max_attempts=20)
    plan = three_node_plan(slack=slack)
    start(p.store, "d1", plan)
    result = p.up("d1", plan)
    nodes = p.store.nodes("d1")
    assert max_concurrent_cost(nodes) <= plan.budget_per_hour + 1e-9
    assert result.ok or cloud.names() == set()
    if result.ok:
        assert result.plan.cost_per_hour <= plan.budget_per_hour + 1e-9
        assert cloud.names() == {n.cluster_name for n in result.nodes}
    p.down("d1")
    assert cloud.names() == set()


def test_keep_partial_keeps_the_nodes_that_came_up(cloud):
    plan = three_node_plan()
    cloud.add_rule("t4", "capacity", times=100)
    p = provider(cloud, max_attempts=2)
    start(p.store, "d1", plan)
    result = p.up("d1", plan, keep_partial=True)
    assert not result.ok
    assert {n.instance_id for n in result.nodes} == {"a100", "l4"}
    assert cloud.names() == {n.cluster_name for n in result.nodes}
    p.down("d1")
    assert cloud.names() == set()


def test_a_hung_launch_is_cancelled_torn_down_and_replaced(cloud):
    plan = three_node_plan(slack=5.0)
    cloud.add_rule(cluster_name("d1", "t4", 1), "hang")
    p = provider(cloud, launch_timeout_s=1.0)
    start(p.store, "d1", plan)
    result = p.up("d1", plan)
    assert result.ok, result.message
    assert cluster_name("d1", "t4", 1) not in cloud.names()
    first = p.store.node(cluster_name("d1", "t4", 1))
    assert first.status == "terminated" and "TimeoutError" in first.error
    assert result.nodes[2].cluster_name == cluster_name("d1", "t4", 2)
    p.down("d1")
    assert cloud.names() == set()


def test_sdk_exception_mid_parallel_launches_cancels_the_others_and_leaves_nothing(cloud):
    plan = three_node_plan(slack=5.0)
    cloud.add_rule(cluster_name("d1", "l4", 1), "error")  # the cluster is created, then the SDK raises
    cloud.add_rule(cluster_name("d1", "a100", 1), "hang")  # still launching when the error comes
    p = provider(cloud, launch_timeout_s=30)
    start(p.store, "d1", plan)
    result = p.up("d1", plan)
    assert not result.ok and "SDK exploded" in result.message
    assert cloud.names() == set()  # given up cleanly: nothing left, even before an explicit down
    assert {r.status for r in p.store.nodes("d1")} == {"terminated"}
    assert p.down("d1").terminated == []


def test_a_half_made_cluster_after_a_capacity_error_is_torn_down(cloud):
    plan = three_node_plan(slack=5.0)
    cloud.add_rule(cluster_name("d1", "a100", 1), "capacity_partial")
    p = provider(cloud)
    start(p.store, "d1", plan)
    assert p.up("d1", plan).ok
    assert cluster_name("d1", "a100", 1) not in cloud.names()
    assert cluster_name("d1", "a100", 1) in cloud.read()["downs"]


def test_down_finds_clusters_the_store_never_recorded(cloud):
    p = provider(cloud)
    plan = three_node_plan()
    start(p.store, "d1", plan)
    assert p.up("d1", plan).ok
    # a crash between launch and record: the cloud has a cluster of ours the store does not know
    cloud.launch(cluster_name("d1", "ghost", 1), {"resources": {}}, lambda _s: None)
    cloud.launch(cluster_name("zz", "ghost", 1), {"resources": {}}, lambda _s: None)  # deployment lost too
    cloud.launch("someone-else", {"resources": {}}, lambda _s: None)  # not ours: left alone
    down = p.down("d1")
    assert down.unrecorded == [cluster_name("d1", "ghost", 1)]
    assert cloud.names() == {cluster_name("zz", "ghost", 1), "someone-else"}
    with pytest.raises(StateError):  # a deployment the store never heard of is a typo, not a cloud query
        p.down("zz")
    assert p.down(None).unrecorded == [cluster_name("zz", "ghost", 1)]  # --all finds every cluster of ours
    assert cloud.names() == {"someone-else"}
    assert cluster_prefix(None) == "to-"


def test_missing_credentials_and_over_budget_plans_are_refused_before_any_launch(cloud):
    cloud.set(enabled=["gcp"])
    p = provider(cloud)
    plan = three_node_plan()
    start(p.store, "d1", plan)
    with pytest.raises(ProvisionError, match=r"no credentials for aws.*sky check aws"):
        p.up("d1", plan)
    cloud.set(enabled=["gcp", "aws"])
    plan.budget_per_hour = plan.cost_per_hour - 0.5
    with pytest.raises(ProvisionError, match=r"above its budget"):
        p.up("d1", plan)
    assert cloud.read()["launches"] == []


def test_status_reports_what_the_cloud_says_happened_to_ready_nodes(cloud):
    p = provider(cloud)
    plan = three_node_plan()
    start(p.store, "d1", plan)
    assert p.up("d1", plan).ok
    with cloud._state() as s:  # the clouds' doing, outside thunderops: a spot VM preempted, a VM deleted
        s["clusters"][cluster_name("d1", "l4", 1)]["status"] = "STOPPED"
        del s["clusters"][cluster_name("d1", "t4", 1)]
    assert {n.instance_id: n.status for n in p.status("d1")} == {"a100": "ready", "l4": "preempted",
                                                                 "t4": "missing"}
    p.down("d1")
    assert cloud.names() == set()


def test_unknown_deployment_is_a_one_line_error(cloud):
    p = provider(cloud)
    with pytest.raises(StateError, match="unknown deployment 'nope'"):
        p.down("nope")
    with pytest.raises(StateError):
        p.status("nope")


def test_replacements_for_a_running_deployment_store_no_plan_and_never_touch_the_running_nodes(cloud):
    """The controller provisions a sub-plan (replacements) within the budget headroom; the plan that folds
    them in is its to store. A failed replacement is torn down alone; the running nodes stay."""
    import copy

    p = provider(cloud)
    plan = three_node_plan(slack=5.0)
    start(p.store, "d1", plan)
    first = p.up("d1", plan)
    assert first.ok
    running = cloud.names()
    sub = copy.deepcopy(p.store.latest_plan("d1"))
    sub.instances = [i for i in sub.instances if i.id == "t4"]  # same id again: a relaunch of that node
    sub.groups, sub.routing = [], []
    sub.cost_per_hour = sub.instances[0].price_per_hour
    sub.budget_per_hour = sub.cost_per_hour + 1.0
    cloud.add_rule(cluster_name("d1", "t4", 2), "capacity")  # forces a fallback inside the sub-plan
    res = p.up("d1", sub, keep_partial=True)
    assert res.ok and res.nodes[0].cluster_name == cluster_name("d1", "t4", 3)
    assert p.store.plan_versions("d1") == [1]  # nothing stored for a sub-plan
    assert running < cloud.names()
    cloud.add_rule("to-d1-t4-", "error")
    res = p.up("d1", sub)  # fails and gives up: only its own launch goes
    assert not res.ok
    assert running | {cluster_name("d1", "t4", 3)} == cloud.names()
    assert p.store.deployment("d1").status == "up"
    p.down("d1")
    assert cloud.names() == set()
