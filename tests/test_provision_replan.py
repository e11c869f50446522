"""Block and re-plan: when a GPU type cannot be had (every offer of it within the budget fails for capacity),
`SkyPilotProvider.up` re-plans without the offers that failed, keeps the nodes already up that the new plan
uses, tears down the others and launches the rest. FakeSkyCloud stands in for the clouds behind SkyPilot's
SDK; the scheduler, the store (SQLite) and the provider's threads run for real. The invariant everywhere: the
clusters that exist are exactly the store's live nodes, and none is left after a failure."""

from __future__ import annotations

import functools
import json
import sqlite3

import pytest
from fakes.fake_sky import FakeSkyCloud
from provision_helpers import cheapest, max_concurrent_cost, plan_of
from test_provision_cli import cli, one_line_error

from thunderops.catalog import load_offers
from thunderops.errors import PlanError
from thunderops.provision.skypilot import SkyPilotProvider, _key
from thunderops.scheduler import replan, solve, without_offers
from thunderops.state import Store


@pytest.fixture
def sky(tmp_path) -> FakeSkyCloud:
    return FakeSkyCloud(tmp_path / "fake-sky.json")


def provider(cloud: FakeSkyCloud, **kw) -> SkyPilotProvider:
    kw.setdefault("launch_timeout_s", 10)
    kw.setdefault("cancel_grace_s", 5)
    kw.setdefault("pip_spec", "thunderops[serve]")
    return SkyPilotProvider(Store(), cloud, **kw)


def start(store: Store, dep: str, plan) -> None:
    store.create_deployment(dep, provider="skypilot", model=plan.model, budget_per_hour=plan.budget_per_hour)
    store.add_plan(dep, plan)


def live_clusters(store: Store, dep: str) -> set[str]:
    return {r.cluster_name for r in store.nodes(dep, live_only=True)}


def plan_reasons(store: Store, dep: str) -> list[str]:
    with sqlite3.connect(store.path) as db:
        return [r[0] for r in db.execute("SELECT reason FROM plans WHERE deployment = ? ORDER BY version", (dep,))]


class HandMadeReplan:
    """A re-plan callback returning a fixed plan (so a test knows which nodes the new plan can reuse); it
    records what the provider asked for."""

    def __init__(self, make):
        self.make = make
        self.calls: list[tuple[frozenset, set]] = []

    def __call__(self, plan, blocked, clouds=None):
        self.calls.append((frozenset(blocked), set(clouds or ())))
        return self.make(blocked)


# ------------------------------------------------------------------------------------------ the catalog helper


def test_without_offers_drops_exactly_the_blocked_pricing_of_each_offer():
    offers = load_offers(gpus="L4")
    spot_row = offers[offers["price_spot"].notna()].iloc[0]
    od_row = offers.iloc[-1]
    key = lambda r, spot: (r["cloud"], r["region"], r["zone"], r["instance_type"], spot)  # noqa: E731
    out = without_offers(offers, [key(spot_row, True), key(od_row, False), key(od_row, True)])
    rows = {(r.cloud, r.region, r.zone, r.instance_type): r for r in out.itertuples()}
    kept = rows[key(spot_row, True)[:4]]
    assert kept.price_ondemand == spot_row["price_ondemand"] and kept.price_spot != kept.price_spot  # NaN
    assert key(od_row, False)[:4] not in rows  # neither pricing left: the row goes
    assert len(out) == len(offers) - 1
    assert without_offers(offers, []) is offers


# -------------------------------------------------------------------------------- the provider, real scheduler


def test_an_unavailable_gpu_type_is_planned_around_and_the_deployment_comes_up_within_budget(sky):
    plan = solve(3.0, "llama-2-7b", time_limit=2, spot=True).plan
    gone = max(plan.instances, key=lambda i: i.price_per_hour).gpu
    sky.add_rule(f"gpu={gone};", "capacity", times=10_000)  # no capacity for this type in any region or cloud
    p = provider(sky, max_replans=6)
    start(p.store, "d1", plan)
    result = p.up("d1", plan, replan=functools.partial(replan, time_limit=2))
    assert result.ok, result.message
    assert result.replans >= 1 and gone not in {i.gpu for i in result.plan.instances}
    assert result.plan.cost_per_hour <= plan.budget_per_hour + 1e-9
    assert result.plan.inputs["model"] == plan.inputs["model"] and result.plan.inputs["slo"] == plan.inputs["slo"]
    assert sky.names() == live_clusters(p.store, "d1") == {n.cluster_name for n in result.nodes}
    assert {r.instance_id for r in p.store.nodes("d1", live_only=True)} == {i.id for i in result.plan.instances}
    assert p.store.latest_plan("d1").version == result.plan_version
    replanned = p.store.events("d1", "re-planned")
    assert len(replanned) == result.replans
    assert all(e.payload["unavailable"] == [gone] for e in replanned)
    assert plan_reasons(p.store, "d1")[1] == f"re-planned: {gone} unavailable"
    # every blocked offer is one that failed, and no re-plan chose one of them again
    failed = {(r.cloud, r.region, r.zone, r.instance_type, r.spot) for r in p.store.nodes("d1") if r.gpu == gone}
    assert set(map(tuple, replanned[-1].payload["blocked"])) == failed == set(result.blocked)
    # the type is set aside in each pricing that failed, everywhere: no re-plan picks it there again, so
    # at most one re-plan per pricing (spot, then on-demand) however many offers the type has
    assert result.replans <= 2
    for e in replanned:
        new = p.store.plan("d1", e.payload["after"])
        aside = {(a["gpu"], a["spot"]) for a in e.payload["set_aside"]}
        assert aside and {(gone, spot) for *_, spot in failed} >= aside
        assert not {_key(i) for i in new.instances} & set(map(tuple, e.payload["blocked"]))
        assert not {(i.gpu, i.spot) for i in new.instances} & aside
    assert max_concurrent_cost(p.store.nodes("d1")) <= plan.budget_per_hour + 1e-9
    launches = sky.read()["launches"]
    assert len(launches) == len(set(launches))  # no cluster launched twice
    p.down("d1")
    assert sky.names() == set()


# ----------------------------------------------------------------------- the provider, hand-made re-plans


def a10g_plan():
    """a100 (on-demand), l4 (spot), a10g (on-demand): Ampere or newer, so the engines' dtype is plan-wide bf16."""
    return [("a100", cheapest("A100-80GB", 1, cloud="gcp"), False), ("l4", cheapest("L4", 1, cloud="aws", spot=True), True),
            ("a10g", cheapest("A10G", 1, cloud="aws"), False)]


def test_nodes_up_that_the_new_plan_uses_are_kept_and_the_others_torn_down(sky):
    rows = a10g_plan()
    a100_row, l40s_row = rows[0][1], cheapest("L40S", 1, cloud="aws")
    budget = a100_row["price_ondemand"] + l40s_row["price_ondemand"] + rows[2][1]["price_ondemand"] + 0.3
    plan = plan_of(rows, budget=budget)
    # the new plan: the same A100 offer (kept under its new id), an L40S instead of the A10G, and no L4
    again = HandMadeReplan(lambda blocked: plan_of([("x-a100", a100_row, False), ("x-l40s", l40s_row, False)],
                                                   budget=budget))
    sky.add_rule("gpu=A10G;", "capacity", times=10_000)
    p = provider(sky)
    start(p.store, "d1", plan)
    result = p.up("d1", plan, replan=again)
    assert result.ok, result.message
    assert result.replans == 1 and [n.instance_id for n in result.nodes] == ["x-a100", "x-l40s"]
    blocked, clouds = again.calls[0]
    tried = {(r.cloud, r.region, r.zone, r.instance_type, r.spot) for r in p.store.nodes("d1") if r.gpu == "A10G"}
    assert len(tried) >= 2 and not any(k[4] for k in tried)  # it fell back within the type before re-planning
    # the re-plan goes without what failed and without every other on-demand A10G offer (any node size)
    a10g = load_offers(gpus="A10G")
    assert blocked == tried | {(r.cloud, r.region, r.zone if isinstance(r.zone, str) else "", r.instance_type, False)
                                for r in a10g.itertuples()}
    assert clouds == sky.enabled_clouds()
    launches = sky.read()["launches"]
    assert [n for n in launches if "a100" in n] == ["to-d1-a100-1"]  # kept: launched once, never again
    a100 = p.store.node("to-d1-a100-1")
    assert a100.status == "ready" and a100.instance_id == "x-a100"  # mapped onto the new plan's instance
    assert result.nodes[0].cluster_name == "to-d1-a100-1" and result.plan.instance("x-a100").host == a100.host
    l4 = p.store.node("to-d1-l4-1")
    assert l4.status == "terminated" and l4.terminated_at  # not in the new plan: torn down and recorded
    assert sky.names() == live_clusters(p.store, "d1") == {"to-d1-a100-1", result.nodes[1].cluster_name}
    assert p.store.plan_versions("d1") == [1, 2] and result.plan_version == 2
    assert plan_reasons(p.store, "d1") == ["", "re-planned: A10G unavailable"]
    ev = p.store.events("d1", "re-planned")[0].payload
    assert ev["kept"] == {"x-a100": "to-d1-a100-1"} and ev["released"] == ["to-d1-l4-1"]
    assert (ev["before"], ev["after"]) == (1, 2)
    assert p.store.deployment("d1").status == "up"
    assert max_concurrent_cost(p.store.nodes("d1")) <= budget + 1e-9
    p.down("d1")
    assert sky.names() == set()


def test_a_node_whose_engines_would_change_is_replaced_not_kept(sky):
    """A T4 in a plan makes every engine float16; once the re-plan drops it, the A100's engine command line
    changes, and the only way this provider starts engines is the node's launch: so it is relaunched."""
    a100_row, t4_row = cheapest("A100-80GB", 1, cloud="gcp"), cheapest("T4", 1, cloud="aws")
    budget = a100_row["price_ondemand"] + t4_row["price_ondemand"] + 0.2
    plan = plan_of([("a100", a100_row, False), ("t4", t4_row, False)], budget=budget)
    again = HandMadeReplan(lambda blocked: plan_of([("y-a100", a100_row, False)], budget=budget))
    sky.add_rule("gpu=T4;", "capacity", times=10_000)
    p = provider(sky)
    start(p.store, "d1", plan)
    result = p.up("d1", plan, replan=again)
    assert result.ok, result.message
    assert p.store.node("to-d1-a100-1").status == "terminated"
    assert [n.cluster_name for n in result.nodes] == ["to-d1-y-a100-1"]
    assert sky.names() == live_clusters(p.store, "d1") == {"to-d1-y-a100-1"}
    assert max_concurrent_cost(p.store.nodes("d1")) <= budget + 1e-9
    p.down("d1")


def next_type(budget: float, types: list[str]):
    """A re-plan that keeps the A100 and picks the cheapest single-GPU offer of the first of `types` that
    the blocked offers leave any of (none of them ever comes up)."""
    def make(blocked):
        for gpu in types:
            left = without_offers(load_offers(gpus=gpu), blocked)
            left = left[(left["gpus_per_node"] == 1) & left["price_ondemand"].notna()].sort_values("price_ondemand")
            if len(left):
                return plan_of([("a100", cheapest("A100-80GB", 1, cloud="gcp"), False), (gpu.lower(), left.iloc[0], False)],
                               budget=budget)
        raise PlanError("nothing left")

    return make


@pytest.mark.parametrize("keep_partial", [False, True])
def test_the_replan_limit_ends_in_one_line_and_keep_partial_keeps_what_came_up(sky, keep_partial):
    types = ["L4", "A10G", "L40S"]  # Ampere or newer: the A100's engine command line stays the same
    a100_row, l4_row = cheapest("A100-80GB", 1, cloud="gcp"), cheapest("L4", 1, cloud="aws")
    budget = a100_row["price_ondemand"] + cheapest("A10G", 1)["price_ondemand"] + 0.05
    plan = plan_of([("a100", a100_row, False), ("l4", l4_row, False)], budget=budget)
    again = HandMadeReplan(next_type(budget, types))
    for gpu in types:
        sky.add_rule(f"gpu={gpu};", "capacity", times=10_000)
    p = provider(sky, max_replans=2)
    start(p.store, "d1", plan)
    result = p.up("d1", plan, keep_partial=keep_partial, replan=again)
    assert not result.ok and result.replans == 2 and len(again.calls) == 2
    assert result.unavailable == ["L40S"]  # L4 then A10G were set aside and planned around; L40S is the last
    assert "\n" not in result.message and "L40S unavailable after 2 re-plan(s)" in result.message
    assert result.message.endswith("; set aside: A10G on-demand, L4 on-demand")  # what the re-plans went without
    tried = {(r.cloud, r.region, r.zone, r.instance_type, r.spot) for r in p.store.nodes("d1") if r.gpu in types}
    assert set(result.blocked) == tried and {r.gpu for r in p.store.nodes("d1")} == {"A100-80GB", *types}
    assert "tried and blocked: aws/" in result.message
    assert [n for n in sky.read()["launches"] if "a100" in n] == ["to-d1-a100-1"]  # kept through both re-plans
    assert p.store.deployment("d1").status == "failed"
    if keep_partial:  # as documented: the nodes that came up stay (and the store says so)
        assert [n.cluster_name for n in result.nodes] == ["to-d1-a100-1"]
        assert sky.names() == live_clusters(p.store, "d1") == {"to-d1-a100-1"}
        p.down("d1")
    assert sky.names() == set() and live_clusters(p.store, "d1") == set()


def test_no_replan_callback_gives_up_as_before(sky):
    a100_row, t4_row = cheapest("A100-80GB", 1, cloud="gcp"), cheapest("T4", 1, cloud="aws")
    plan = plan_of([("a100", a100_row, False), ("t4", t4_row, False)], slack=0.05)
    sky.add_rule("gpu=T4;", "capacity", times=10_000)
    p = provider(sky)
    start(p.store, "d1", plan)
    result = p.up("d1", plan)
    assert not result.ok and result.replans == 0 and "re-plan" not in result.message
    assert p.store.plan_versions("d1") == [1] and sky.names() == set()


def test_a_replan_that_finds_nothing_tears_everything_down(sky):
    rows = a10g_plan()
    plan = plan_of(rows, slack=0.2)

    def nothing(plan, blocked, clouds=None):
        raise PlanError("no plan meets the SLO")

    sky.add_rule("gpu=A10G;", "capacity", times=10_000)
    p = provider(sky)
    start(p.store, "d1", plan)
    result = p.up("d1", plan, replan=nothing)
    assert not result.ok and result.unavailable == ["A10G"]
    assert "re-planning without A10G failed: no plan meets the SLO" in result.message
    assert sky.names() == set() and live_clusters(p.store, "d1") == set()


# ------------------------------------------------------------------------------------------------- the CLI


@pytest.fixture
def cloud(sky, monkeypatch):
    import os

    from test_provision_cli import TESTS

    monkeypatch.setenv("FAKE_SKY_STATE", str(sky.path))
    monkeypatch.setenv("THUNDEROPS_SKY_ADAPTER", "fakes.fake_sky:FakeSkyCloud")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    return sky


def test_cli_replan_limit_is_one_line_exit_2_with_nothing_left_running(cloud, tmp_path):
    plan = plan_of([("l4", cheapest("L4", 1, cloud="aws", spot=True), True)], budget=1.0)
    plan.inputs = {"model": "llama-2-7b", "workload": "conversation", "spot": True, "time_limit": 1.0,
                   "max_replica_nodes": 8}  # what `thunderops plan --out` records (a short search)
    path = tmp_path / "plan.json"
    plan.save(path)
    cloud.add_rule("to-", "capacity", times=100_000)  # nothing can be had anywhere
    proc = cli("up", "--plan", str(path), "--name", "nocap", "--no-serve", "--json")
    one_line_error(proc, "unavailable after 2 re-plan(s)", "tried and blocked:", "everything launched was torn down")
    assert cloud.names() == set()
    recs = Store().nodes("nocap")
    assert recs and {r.status for r in recs} == {"terminated"}
    assert Store().deployment("nocap").status == "failed"
    assert len(Store().events("nocap", "re-planned")) == 2
    assert json.loads(cli("status", "nocap", "--json").stdout)["deployments"][0]["cost_per_hour"] == 0


def test_cli_up_plans_around_an_unavailable_gpu_type(cloud, tmp_path):
    plan = plan_of([("l4", cheapest("L4", 1, cloud="aws", spot=True), True)], budget=1.0)
    plan.inputs = {"model": "llama-2-7b", "workload": "conversation", "spot": True, "time_limit": 1.0,
                   "max_replica_nodes": 8}
    path = tmp_path / "plan.json"
    plan.save(path)
    cloud.add_rule("gpu=L4;", "capacity", times=100_000)  # no L4 anywhere
    proc = cli("up", "--plan", str(path), "--name", "around", "--no-serve", "--json", "--max-replans", "8")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["replans"] >= 1 and out["cost_per_hour"] <= 1.0 + 1e-9
    store = Store()
    final = store.latest_plan("around")
    assert "L4" not in {i.gpu for i in final.instances} and final.version == out["plan_version"]
    assert cloud.names() == live_clusters(store, "around") and len(cloud.names()) == len(final.instances)
    assert json.loads(cli("down", "around", "--json").stdout)["unrecorded"] == []
    assert cloud.names() == set()
    one_line_error(cli("up", "--plan", str(path), "--max-replans", "-1", "--dry-run"), "--max-replans")
