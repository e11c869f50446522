"""The routing (orchestration) LP: how many requests/s go from each prefill replica to each decode replica.

Variables per prefill/decode pair: `raw` (full-precision KV transfer) and `comp` (KV compressed for transfer,
e.g. 4-bit). Constraints: a replica's routed load stays within its capacity, and the KV traffic over each shared
network resource within it: a link carries the pairs that cross it (raw and compressed requests share it at their
byte cost), a node's NIC the pairs of all its links.
Colocated replicas serve whole requests.
Solved with scipy's HiGHS. A second LP (`balance`) spreads a given rate so that the busiest replica is as idle as
possible, which is how the plan's routing fractions are chosen.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linprog
from scipy.sparse import coo_matrix

# Compressed transfers cost accuracy; prefer raw KV whenever the link allows it.
COMPRESSION_PENALTY = 1e-3


@dataclass
class RouteProblem:
    """Capacities in requests/s. `prefill[i]`: prefill replica i's capacity; `decode[j]`, `colocated[c]` alike.
    `link_raw[i, j]` / `link_comp[i, j]`: requests/s the (i, j) link carries when every request sends raw /
    compressed KV; 0 forbids that kind of transfer (e.g. too slow for the TTFT SLO).
    Optional `prefill_raw[i, j]` / `prefill_comp[i, j]`: prefill i's capacity for requests whose KV then goes
    to j that way (the transfer eats into the TTFT budget, so slower links leave less time to prefill);
    default: `prefill[i]` for every pair.
    Optional `shares`: shared network resources as COO entries `(resource, i, j, weight)`: pair (i, j) loads
    resource r by `weight` x its own link use (raw / link_raw + comp / link_comp), and each resource carries at
    most 1. Pairs crossing one link share it at weight 1; a node's NIC carries all its links' pairs at weight
    link / NIC bandwidth. Default: every pair its own link (a pair without entries is bounded by nothing else)."""

    prefill: np.ndarray
    decode: np.ndarray
    colocated: np.ndarray
    link_raw: np.ndarray
    link_comp: np.ndarray
    prefill_raw: np.ndarray | None = None
    prefill_comp: np.ndarray | None = None
    shares: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None

    def pair_prefill(self) -> tuple[np.ndarray, np.ndarray]:
        base = np.broadcast_to(np.asarray(self.prefill, float)[:, None], (len(self.prefill), len(self.decode)))
        pr = base if self.prefill_raw is None else np.minimum(self.prefill_raw, base)
        pc = base if self.prefill_comp is None else np.minimum(self.prefill_comp, base)
        return pr, pc


@dataclass
class RouteSolution:
    total: float  # requests/s served
    raw: np.ndarray  # (P, D) requests/s with raw KV
    comp: np.ndarray  # (P, D) requests/s with compressed KV
    colocated: np.ndarray  # (C,) requests/s


def _pair_vars(prob: RouteProblem) -> tuple[np.ndarray, np.ndarray, int]:
    """Indices (i, j) of the pair variables worth having (both sides non-zero, some link)."""
    P, D = len(prob.prefill), len(prob.decode)
    if P == 0 or D == 0:
        return np.zeros(0, int), np.zeros(0, int), 0
    pr, pc = prob.pair_prefill()
    ok = prob.decode[None, :] > 0
    ii, jj = np.nonzero(ok & (((prob.link_raw > 0) & (pr > 0)) | ((prob.link_comp > 0) & (pc > 0))))
    return ii, jj, len(ii)


def _constraints(prob: RouteProblem, ii: np.ndarray, jj: np.ndarray, extra_col: bool):
    """Rows: prefill capacity, decode capacity, shared network use. Columns: raw pairs, comp pairs, colocated[, u].

    With `extra_col`, the right-hand capacities move into the matrix as `-cap * u` (utilisation form)."""
    P, D, C = len(prob.prefill), len(prob.decode), len(prob.colocated)
    n = len(ii)
    ncol = 2 * n + C + (1 if extra_col else 0)
    rows, cols, vals, b = [], [], [], []
    r = 0
    k = np.arange(n)
    pr, pc = prob.pair_prefill()
    pr, pc = pr[ii, jj] if n else np.zeros(0), pc[ii, jj] if n else np.zeros(0)
    lr = prob.link_raw[ii, jj] if n else np.zeros(0)
    lc = prob.link_comp[ii, jj] if n else np.zeros(0)
    has_r, has_c = (lr > 0) & (pr > 0), (lc > 0) & (pc > 0)
    # prefill i, as utilisation: sum_j raw_ij / Praw_ij + comp_ij / Pcomp_ij <= 1
    rows += [ii[has_r] + r, ii[has_c] + r]
    cols += [k[has_r], k[has_c] + n]
    vals += [1.0 / pr[has_r], 1.0 / pc[has_c]]
    cap_rows = [(r + i, 1.0) for i in range(P)]
    r += P
    rows += [jj + r, jj + r]
    cols += [k, k + n]
    vals += [np.ones(n), np.ones(n)]
    cap_rows += [(r + j, prob.decode[j]) for j in range(D)]
    r += D
    # colocated c: z_c <= C_c
    cidx = np.arange(C)
    rows.append(cidx + r)
    cols.append(2 * n + cidx)
    vals.append(np.ones(C))
    cap_rows += [(r + c, prob.colocated[c]) for c in range(C)]
    r += C
    # resource l (a link, a NIC): sum over its pairs of weight x (raw / Lraw + comp / Lcomp) <= 1
    if prob.shares is None:
        res, pair, w = k, k, np.ones(n)
    else:
        pos = np.full((P, D), -1)
        pos[ii, jj] = k
        rid, si, sj, sw = (np.asarray(a) for a in prob.shares)
        pair = pos[si.astype(int), sj.astype(int)] if len(rid) else np.zeros(0, int)
        keep = pair >= 0
        res = np.unique(rid[keep], return_inverse=True)[1].reshape(-1)
        pair, w = pair[keep], sw[keep].astype(float)
    on_r, on_c = has_r[pair], has_c[pair]
    rows += [res[on_r] + r, res[on_c] + r]
    cols += [pair[on_r], pair[on_c] + n]
    vals += [w[on_r] / lr[pair[on_r]], w[on_c] / lc[pair[on_c]]]
    link_rows = r
    r += int(res.max()) + 1 if len(res) else 0
    b = np.zeros(r)
    for row, cap in cap_rows:
        b[row] = cap
    b[link_rows:] = 1.0
    if extra_col:  # x - cap * u <= 0 for replicas (links keep their hard limit)
        u = ncol - 1
        for row, cap in cap_rows:
            rows.append(np.array([row]))
            cols.append(np.array([u]))
            vals.append(np.array([-cap]))
            b[row] = 0.0
    A = coo_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(r, ncol)).tocsr()
    # variables that may not be used at all: forbidden transfer kinds
    ub = np.full(ncol, np.inf)
    ub[:n][~has_r] = 0.0
    ub[n:2 * n][~has_c] = 0.0
    return A, b, ub


def _unpack(prob: RouteProblem, ii, jj, x: np.ndarray) -> RouteSolution:
    P, D, C = len(prob.prefill), len(prob.decode), len(prob.colocated)
    n = len(ii)
    raw, comp = np.zeros((P, D)), np.zeros((P, D))
    raw[ii, jj] = x[:n]
    comp[ii, jj] = x[n:2 * n]
    z = np.asarray(x[2 * n:2 * n + C], dtype=float)
    raw[raw < 1e-9] = 0.0
    comp[comp < 1e-9] = 0.0
    z[z < 1e-9] = 0.0
    return RouteSolution(float(raw.sum() + comp.sum() + z.sum()), raw, comp, z)


def solve(prob: RouteProblem) -> RouteSolution:
    """Maximise requests/s served (raw KV preferred to compressed at equal throughput)."""
    ii, jj, n = _pair_vars(prob)
    C = len(prob.colocated)
    if n + C == 0:
        P, D = len(prob.prefill), len(prob.decode)
        return RouteSolution(0.0, np.zeros((P, D)), np.zeros((P, D)), np.zeros(C))
    A, b, ub = _constraints(prob, ii, jj, extra_col=False)
    c = np.concatenate([-np.ones(n), -(1.0 - COMPRESSION_PENALTY) * np.ones(n), -np.ones(C)])
    res = linprog(c, A_ub=A, b_ub=b, bounds=np.column_stack([np.zeros(len(ub)), ub]), method="highs")
    if res.status != 0:  # always feasible (x = 0); anything else is a solver failure worth surfacing
        raise RuntimeError(f"routing LP failed: {res.message}")
    return _unpack(prob, ii, jj, res.x)


def balance(prob: RouteProblem, rate: float) -> RouteSolution:
    """Route exactly `rate` requests/s (at most what `solve` can serve) minimising the busiest replica's
    utilisation, so that spare capacity is spread evenly instead of some replicas idling."""
    ii, jj, n = _pair_vars(prob)
    C = len(prob.colocated)
    if n + C == 0 or rate <= 0:
        return solve(prob)
    A, b, ub = _constraints(prob, ii, jj, extra_col=True)
    ncol = A.shape[1]
    c = np.zeros(ncol)
    c[-1] = 1.0
    c[n:2 * n] = COMPRESSION_PENALTY / max(rate, 1e-9)  # still prefer raw KV
    a_eq = np.zeros((1, ncol))
    a_eq[0, :2 * n + C] = 1.0
    bounds = np.column_stack([np.zeros(ncol), ub])
    res = linprog(c, A_ub=A, b_ub=b, A_eq=a_eq, b_eq=[rate], bounds=bounds, method="highs")
    if res.status != 0:
        return solve(prob)
    return _unpack(prob, ii, jj, res.x)
