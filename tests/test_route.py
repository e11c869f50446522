"""The routing LP on cases small enough to check by hand, plus feasibility on random ones."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from thunderops.scheduler.route import RouteProblem, balance, solve

INF_LINK = 1e9


def prob(prefill, decode, colocated=(), link_raw=None, link_comp=None, **kw) -> RouteProblem:
    P, D = len(prefill), len(decode)
    lr = np.full((P, D), INF_LINK) if link_raw is None else np.asarray(link_raw, float)
    lc = np.zeros((P, D)) if link_comp is None else np.asarray(link_comp, float)
    return RouteProblem(np.asarray(prefill, float), np.asarray(decode, float), np.asarray(colocated, float),
                        lr, lc, **kw)


def test_unconstrained_links_give_min_of_sides_plus_colocated():
    s = solve(prob([3.0, 1.0], [2.0, 2.5], [1.5]))
    assert s.total == pytest.approx(4.0 + 1.5)
    assert s.raw.sum(axis=1) == pytest.approx([3.0, 1.0])  # prefill is the bottleneck: both saturated
    assert np.all(s.raw.sum(axis=0) <= np.array([2.0, 2.5]) + 1e-9)


def test_slow_link_is_routed_around():
    # prefill 0 can only reach decode 1 fast; decode 0 is reachable at 0.5 req/s only
    s = solve(prob([4.0], [3.0, 1.0], link_raw=[[0.5, INF_LINK]]))
    assert s.total == pytest.approx(1.5)
    assert s.raw[0, 0] == pytest.approx(0.5)
    assert s.raw[0, 1] == pytest.approx(1.0)


def test_compression_used_only_where_it_pays():
    fast = solve(prob([10.0], [10.0], link_raw=[[20.0]], link_comp=[[80.0]]))
    assert fast.raw[0, 0] == pytest.approx(10.0) and fast.comp[0, 0] == 0.0
    # raw carries 2 req/s, 4-bit carries 8: x/2 + y/8 <= 1 with x + y maximal -> all 8 compressed
    slow = solve(prob([10.0], [10.0], link_raw=[[2.0]], link_comp=[[8.0]]))
    assert slow.total == pytest.approx(8.0)
    assert slow.comp[0, 0] == pytest.approx(8.0)
    # raw forbidden (too slow for the TTFT), compressed allowed
    only = solve(prob([10.0], [10.0], link_raw=[[0.0]], link_comp=[[5.0]]))
    assert only.raw[0, 0] == 0.0 and only.comp[0, 0] == pytest.approx(5.0)


def test_pair_specific_prefill_capacity():
    # routing to decode 1 leaves the prefill more TTFT (faster link): 3 req/s there, 1 req/s towards decode 0
    s = solve(prob([5.0], [5.0, 5.0], prefill_raw=np.array([[1.0, 3.0]])))
    assert s.total == pytest.approx(3.0)
    assert s.raw[0, 1] == pytest.approx(3.0)


def links(ids) -> tuple:
    """COO shares for pairs on links given by id (weight 1 each)."""
    ids = np.asarray(ids)
    i, j = np.indices(ids.shape)
    return ids.ravel(), i.ravel(), j.ravel(), np.ones(ids.size)


def test_pairs_crossing_one_link_share_it():
    # one prefill, two decode replicas on the same node: both pairs cross the same 4 req/s link
    apart = solve(prob([10.0], [5.0, 5.0], link_raw=[[4.0, 4.0]]))
    assert apart.total == pytest.approx(8.0)
    shared = solve(prob([10.0], [5.0, 5.0], link_raw=[[4.0, 4.0]], shares=links([[0, 0]])))
    assert shared.total == pytest.approx(4.0)
    # a pair on another link is not held back by the shared one
    mixed = solve(prob([10.0, 10.0], [5.0, 5.0, 5.0], link_raw=np.full((2, 3), 4.0),
                       shares=links([[0, 0, 1], [2, 2, 1]])))
    assert mixed.total == pytest.approx(4.0 + 4.0 + 4.0)  # links 0, 2 and 1, each full
    assert balance(prob([10.0], [5.0, 5.0], link_raw=[[4.0, 4.0]], shares=links([[0, 0]])), 3.0).total \
        == pytest.approx(3.0)


def test_a_nic_caps_the_links_through_it():
    # one prefill node sending to two decode nodes over two 4 req/s links: its NIC is shared by both
    two_links = links([[0, 1]])
    nic = (np.array([2, 2]), np.array([0, 0]), np.array([0, 1]))
    same = tuple(np.concatenate([a, b]) for a, b in zip(two_links, (*nic, np.array([1.0, 1.0])), strict=True))
    assert solve(prob([10.0], [5.0, 5.0], link_raw=[[4.0, 4.0]], shares=same)).total == pytest.approx(4.0)
    # a NIC of 1.5x the link speed: each link loads it by 2/3 of its own use
    wide = tuple(np.concatenate([a, b]) for a, b in zip(two_links, (*nic, np.full(2, 1 / 1.5)), strict=True))
    s = solve(prob([10.0], [5.0, 5.0], link_raw=[[4.0, 4.0]], shares=wide))
    assert s.total == pytest.approx(6.0)
    assert s.raw.max() <= 4.0 + 1e-9  # and neither link beyond its own rate
    # compressed KV loads the NIC less: raw 4 req/s or 4-bit 16 req/s per link, NIC as fast as a link
    comp = solve(prob([20.0], [10.0, 10.0], link_raw=[[4.0, 4.0]], link_comp=[[16.0, 16.0]], shares=same))
    assert comp.total == pytest.approx(16.0)


def test_no_pairs_no_colocated_is_zero():
    s = solve(prob([2.0], []))
    assert s.total == 0.0


def test_balance_spreads_load_evenly():
    p = prob([], [], [1.0, 3.0])
    b = balance(p, 2.0)
    assert b.total == pytest.approx(2.0)
    assert b.colocated == pytest.approx([0.5, 1.5])  # both at 50 % utilisation


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(1, 4), st.integers(0, 2), st.integers(0, 10_000))
def test_random_solutions_feasible_and_bounded(P, D, C, seed):
    rng = np.random.default_rng(seed)
    p = prob(rng.uniform(0, 5, P), rng.uniform(0, 5, D), rng.uniform(0, 2, C),
             rng.uniform(0, 4, (P, D)), rng.uniform(0, 16, (P, D)))
    s = solve(p)
    flow = s.raw + s.comp
    assert np.all(flow.sum(axis=1) <= p.prefill + 1e-6)
    assert np.all(flow.sum(axis=0) <= p.decode + 1e-6)
    with np.errstate(divide="ignore", invalid="ignore"):
        use = np.where(p.link_raw > 0, s.raw / p.link_raw, 0) + np.where(p.link_comp > 0, s.comp / p.link_comp, 0)
    assert np.all(use <= 1 + 1e-6)
    assert np.all(s.raw[p.link_raw == 0] == 0) and np.all(s.comp[p.link_comp == 0] == 0)
    bound = min(p.prefill.sum(), p.decode.sum(), np.maximum(p.link_raw, p.link_comp).sum()) + p.colocated.sum()
    assert s.total <= bound + 1e-6
    # with unlimited links the LP reaches the bound exactly (max-flow = min-cut)
    free = solve(prob(p.prefill, p.decode, p.colocated))
    assert free.total == pytest.approx(min(p.prefill.sum(), p.decode.sum()) + p.colocated.sum(), rel=1e-6)
