"""Routing tables and replica picking (in process; the HTTP paths are in test_serve.py)."""

from __future__ import annotations

import collections

import pytest
from test_serve_plans import pd_plan

from thunderops.plan import Route
from thunderops.serve.router import Replica, Router, RouterConfig, RoutingError, RoutingTable

URLS = {g: f"http://127.0.0.1:{9000 + i}" for i, g in enumerate(["p0", "p1", "d0", "d1"])}


def router(fractions=(0.4, 0.1, 0.2, 0.3)) -> Router:
    return Router(RoutingTable.from_plan(pd_plan(fractions), URLS), RouterConfig(api_key="k", served_models=["m"]))


def picks(r: Router, n: int, exclude=frozenset()) -> collections.Counter:
    return collections.Counter((route.prefill, route.decode) for route, _, _ in (r.pick(set(exclude)) for _ in range(n)))


def test_idle_picks_follow_the_plan_fractions_exactly():
    seen = picks(router(), 1000)
    assert seen == {("p0", "d0"): 400, ("p0", "d1"): 100, ("p1", "d0"): 200, ("p1", "d1"): 300}


def test_load_above_a_replicas_share_moves_picks_away_from_it():
    r = router((0.25, 0.25, 0.25, 0.25))
    r.load.update({"p0": 5, "p1": 5, "d0": 40, "d1": 0})  # d0 holds far more than its half
    seen = picks(r, 1000)
    to_d0 = seen[("p0", "d0")] + seen[("p1", "d0")]
    assert to_d0 < 350  # clearly under its planned 50%
    r.load.update({"p0": 10, "p1": 10, "d0": 10, "d1": 10})  # load in proportion: fractions hold
    seen = picks(r, 1000)
    assert abs(seen[("p0", "d0")] - 250) <= 2


def test_a_prefill_replica_behind_gets_fewer_picks_while_decodes_are_busy():
    """Prefill load counts among prefill replicas: three mean prompts queued at p0 and none at p1 steer new
    requests to p1 even while hundreds of streams run at the decode replicas."""
    r = router((0.25, 0.25, 0.25, 0.25))
    r.load.update({"p0": 3, "p1": 0, "d0": 200, "d1": 200})
    seen = picks(r, 1000)
    assert seen[("p0", "d0")] + seen[("p0", "d1")] < 400  # planned: 500
    r.load.update({"p0": 0})
    seen = picks(r, 1000)
    assert abs(seen[("p0", "d0")] + seen[("p0", "d1")] - 500) <= 2


def test_one_long_prompt_weighs_like_many_short_ones():
    """Load is in request-equivalents: one prompt 8x the mean at p0 steers picks away from it as eight
    mean prompts would, where a request count would see one request against one."""
    from thunderops.serve.pick import PromptWeights

    w = PromptWeights()
    for _ in range(99):
        w.weight(1000)
    long, short = w.weight(8000), w.weight(1000)
    assert long > 7 * short
    to_p0 = {}
    for name, held in (("weights", (long, short)), ("counts", (1, 1))):
        r = router((0.25, 0.25, 0.25, 0.25))
        r.load.update({"p0": held[0], "p1": held[1]})
        seen = picks(r, 1000)
        to_p0[name] = seen[("p0", "d0")] + seen[("p0", "d1")]
    assert to_p0["counts"] == 500 and to_p0["weights"] < 350  # planned: 500


def test_prompt_weights_are_relative_and_add_back_to_zero():
    from thunderops.serve.pick import MAX_WEIGHT, WEIGHT_STEP, PromptWeights

    w = PromptWeights()
    assert w.weight(500) == 1.0  # the first prompt is the mean
    sizes = [37, 4000, 1, 123456789, 900, 0, 2500] * 50
    got = [w.weight(s) for s in sizes]
    assert all(WEIGHT_STEP <= g <= MAX_WEIGHT for g in got)
    assert max(got) == MAX_WEIGHT and min(got) == WEIGHT_STEP
    total = 0.0
    for g in got:
        total += g
    for g in reversed(got):
        total -= g
    assert total == 0.0  # multiples of a power of two: the router's books return exactly to zero
    # the unit cancels: characters or tokens give the same weights
    a, b = PromptWeights(), PromptWeights()
    assert [a.weight(s) for s in (100, 300, 50)] == [b.weight(4 * s) for s in (100, 300, 50)]


@pytest.mark.parametrize("body,size", [
    ({"prompt": "abcd" * 10}, 40),
    ({"prompt": list(range(10))}, 40),  # token ids, CHARS_PER_TOKEN each
    ({"prompt": ["ab", "cde"]}, 5),
    ({"prompt": [[1, 2], [3]]}, 12),
    ({"messages": [{"role": "system", "content": "be brief"},
                   {"role": "user", "content": [{"type": "text", "text": "hello"},
                                                {"type": "image_url", "image_url": {"url": "x"}}]}]}, 13),
    ({"model": "m"}, 0),
    ({"prompt": None, "messages": "not a list"}, 10),
    ({"prompt": [[[[[[["deep"]]]]]]]}, 0),  # nesting no API has is not walked (no recursion limit to hit)
])
def test_prompt_size_reads_both_apis(body, size):
    from thunderops.serve.router import prompt_size

    assert prompt_size(body) == size


def test_unhealthy_and_excluded_replicas_are_skipped():
    r = router()
    r.healthy["d1"] = False
    assert set(picks(r, 100)) == {("p0", "d0"), ("p1", "d0")}
    assert set(picks(r, 100, exclude={"p0"})) == {("p1", "d0")}


def test_set_routing_swaps_the_table():
    r = router()
    old = r.table
    r.set_routing(old.without(["p0"]))
    assert r.table.version == old.version + 1
    assert {route.prefill for route, _, _ in (r.pick() for _ in range(50))} == {"p1"}


def test_from_plan_without_routes_spreads_over_all_pairs():
    plan = pd_plan()
    plan.routing = []
    t = RoutingTable.from_plan(plan, URLS)
    assert len(t.routes) == 4 and all(abs(x.fraction - 0.25) < 1e-9 for x in t.routes)


@pytest.mark.parametrize("table,msg", [
    ({"replicas": [{"id": "a", "url": "http://x:1"}], "routes": [{"prefill": "a", "decode": "b", "fraction": 1}]},
     "unknown replica 'b'"),
    ({"replicas": [{"id": "a", "url": "http://x:1"}], "routes": [{"prefill": "a", "decode": "a", "fraction": 0}]},
     "sum to 0"),
    ({"replicas": [{"id": "a", "url": "http://x:1"}], "routes": []}, "no routes"),
    ({"replicas": [{"url": "http://x:1"}], "routes": []}, "malformed routing table"),
])
def test_bad_tables_raise_routing_error(table, msg):
    with pytest.raises(RoutingError, match=msg):
        RoutingTable.from_dict(table)


def test_missing_urls_and_keys_are_user_errors():
    with pytest.raises(RoutingError, match="no URL for group"):
        RoutingTable.from_plan(pd_plan(), {"p0": "http://x:1"})
    t = RoutingTable({"a": Replica("a", "http://x:1")}, (Route("a", "a", 1.0),))
    with pytest.raises(RoutingError, match="API key"):
        Router(t, RouterConfig(api_key="", served_models=["m"]))


def test_table_round_trips_through_json():
    t = RoutingTable.from_plan(pd_plan(), URLS, version=7)
    again = RoutingTable.from_dict(t.to_dict())
    assert again == t


def test_split_gives_one_sequence_per_sample_and_prompt_with_distinct_seeds():
    from thunderops.serve.fanout import SplitError, split

    assert split({"prompt": "a", "n": 1}, chat=False) is None
    assert split({"prompt": ["a"]}, chat=False) is None and split({"prompt": [1, 2, 3]}, chat=False) is None
    seqs = split({"prompt": ["a", [5, 6]], "n": 2, "seed": 10, "max_tokens": 3}, chat=False)
    assert [(q.index, q.prompt, q.body["prompt"], q.body["seed"]) for q in seqs] == [
        (0, 0, "a", 10), (1, 0, "a", 11), (2, 1, [5, 6], 10), (3, 1, [5, 6], 11)]
    assert all("n" not in q.body and q.body["max_tokens"] == 3 for q in seqs)
    chat = split({"messages": [{"role": "user", "content": "x"}], "n": 3}, chat=True)
    assert [q.index for q in chat] == [0, 1, 2] and all("seed" not in q.body for q in chat)
    with pytest.raises(SplitError, match="at most 256"):
        split({"prompt": ["a", "b"], "n": 129}, chat=False)
