"""The evaluation harness every strategy shares (our search and the baselines): a pool of instances, how each is
cut into units, the lower level (parallel configs + routing LP) and the conversion of a solution into a Plan.

A *state* is a tuple of groups; a group is `(units, phase)` with `units` a sorted tuple of `(instance index,
slot)`. An instance's GPUs are cut into equal units (the smallest TP block that holds a replica on its own, or the
whole instance when none does); instances with no unit in any group are not rented.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from thunderops.errors import PlanError
from thunderops.perf import PerfModel
from thunderops.plan import SLO, Group, Instance, Plan, Prediction, Route, Stage
from thunderops.scheduler import route as lp
from thunderops.scheduler.parallel import PHASES, GroupConfig, ParallelPlanner, engine_can_serve, valid_tps
from thunderops.scheduler.procure import MAX_REPLICA_NODES, NO_NODE_LIMIT, min_nodes_for_replica
from thunderops.scheduler.topology import Topology
from thunderops.specs import get_gpu
from thunderops.workload import Workload

Unit = tuple[int, int]
GroupT = tuple[tuple[Unit, ...], str]
State = tuple[GroupT, ...]

KV_COMPRESSION = 0.25  # 4-bit KV for transfer only (ThunderServe): a quarter of the bf16 bytes
KV_STEPS = 16  # a prompt token's KV transfer time is rounded up to a power of 2^(1/KV_STEPS) seconds (memo key)
# Concurrent KV transfers share a link (processor sharing): at utilisation u a transfer takes 1 / (1 - u) times
# as long. A route loads its link to the u of these that serves it best (more u: more requests/s over the link,
# less TTFT left to prefill in).
LINK_UTILISATIONS = (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)
# The router's smooth weighted round robin (`serve.pick`) spaces each replica's arrivals: a replica taking a share f
# of the requests (among prefill and colocated replicas) gets about every (1/f)-th of them, gaps with a squared
# coefficient of variation of about f, not a Poisson stream's 1. Shares are estimated from the capacities (the
# balanced routing spreads load by capacity), rounded up to a power of two (never optimistic) and floored at
# 1 / MAX_SPREAD: each distinct value costs a group a capacity computation (tens of ms for a colocated one), and the
# queueing gain flattens out. A replica that takes no traffic (no capacity) spaces nobody's arrivals.
MAX_SPREAD = 8

# With a target rate, plans the model rates at this share of the rate or more but cheaper than what meets it are
# kept for the simulator to judge: the model errs by 10-30 % for pools of replicas (low for `coding`), and a
# cheaper plan it rejects may serve the rate. NEAR_MISSES bounds how many are kept (the most goodput per $).
NEAR_MISS = 0.8
NEAR_MISSES = 64
# bound() is memoised by state (the tabu walk ranks a state's neighbours, `along` a fleet's phase cuts, then
# `best_of` ranks them again); past this many entries the memo starts over
BOUND_MEMO = 50_000


class PairLink(NamedTuple):
    """How one prefill group's KV reaches one decode group: over the slowest instance pair between them."""

    link: tuple[int, int]  # the instance pair (sorted): pairs of groups crossing the same one share it
    src: int  # the sending instance (its NIC's egress is shared by all its links)
    dst: int  # the receiving instance (its NIC's ingress likewise)
    gbps: float
    rate_raw: float  # requests/s the link carries when busy with raw KV only
    rate_comp: float  # ... with compressed KV only (0: no network hop, nothing to compress)
    t_raw: float  # one prompt's transfer alone at the attainment quantile, raw
    t_comp: float  # ... compressed


def canon(groups: Iterable[tuple[Iterable[Unit], str]]) -> State:
    """Canonical, hashable form: units sorted in each group, empty groups dropped, groups sorted."""
    out = [(tuple(sorted(u)), ph) for u, ph in groups if u]
    return tuple(sorted(out))


@dataclass
class Evaluation:
    state: State
    score: float
    goodput: float  # requests/s at the SLO (perf model + routing LP)
    cost: float  # $/h of the instances the state uses
    configs: list[GroupConfig] = field(default_factory=list)
    solution: lp.RouteSolution | None = None
    roles: dict[str, list[int]] = field(default_factory=dict)  # phase -> group indices in LP order


class Harness:
    """Pool + models + objective. `budget` is $/h (None: no limit); `rate` switches the objective to the
    cheapest plan that serves it."""

    def __init__(self, pool: list[Instance], perf: PerfModel, workload: Workload, slo: SLO,
                 topology: Topology | None = None, budget: float | None = None, rate: float | None = None,
                 granularity: str = "auto", max_replica_nodes: int | None = MAX_REPLICA_NODES) -> None:
        self.pool = pool
        if max_replica_nodes is not None and max_replica_nodes < 1:
            raise PlanError(f"--max-replica-nodes must be at least 1, got {max_replica_nodes}")
        self.max_replica_nodes = max_replica_nodes
        if granularity == "auto":  # single GPUs where the search space stays small, else replica-sized blocks
            granularity = "gpu" if sum(i.gpus for i in pool) <= 16 else "replica"
        if granularity not in ("gpu", "replica"):
            raise ValueError(f"granularity must be auto, gpu or replica, got {granularity!r}")
        self.granularity = granularity
        self.perf, self.workload, self.slo = perf, workload, slo
        self.topo = topology or Topology()
        self.budget, self.rate = budget, rate
        self.parallel = ParallelPlanner(perf, workload, slo)
        self._pre: dict[tuple, float] = {}
        self.fixed: dict[tuple[Unit, ...], dict[str, GroupConfig]] = {}
        self._unit_memo: dict[tuple[str, int], int] = {}
        self.unit_gpus = [self._unit_size(i) for i in pool]
        self.units_of = [[(k, s) for s in range(inst.gpus // self.unit_gpus[k])] for k, inst in enumerate(pool)]
        self._per_replica: dict[tuple[str, int], int] = {}
        self._holds_memo: dict[tuple[str, int], bool] = {}
        self.unit_alone = [self._holds((inst.gpu, self.unit_gpus[k])) for k, inst in enumerate(pool)]
        self._bw: dict[tuple[int, int], float] = {}
        self._pair: dict[tuple[tuple[int, ...], tuple[int, ...]], tuple] = {}
        self._route: dict[tuple, tuple[float, float]] = {}
        self._nic: dict[int, float] = {}
        self._spread: dict[tuple, float] = {}
        self._configs: dict[tuple[Unit, ...], dict[str, GroupConfig]] = {}
        self._rows: dict[tuple, dict[tuple[int, ...], tuple]] = {}  # problem()'s pairs, by prefill group
        self._bounds: dict[tuple, float] = {}  # bound() by state
        self.mean_prompt = workload.mean_prompt
        self.q_prompt = workload.percentile("prompt", slo.attainment * 100)
        self.evaluations = 0
        self.near: dict[State, Evaluation] = {}  # with a rate: near misses (see NEAR_MISS)
        # KV transfer kinds the routing LP may use: both for a new plan; a running deployment's connector allows
        # one (NIXL sends raw KV, LMCache compresses all of it)
        self.kv_raw = self.kv_comp = True

    # ------------------------------------------------------------------ units and groups

    def _unit_size(self, inst: Instance) -> int:
        key = (inst.gpu, inst.gpus)
        if self.granularity == "gpu":
            return 1
        if key not in self._unit_memo:
            size = inst.gpus
            spec = get_gpu(inst.gpu)
            for t in valid_tps(self.perf.model.heads, inst.gpus):
                if inst.gpus % t == 0 and self.perf.split_layers([(spec, t)], "decode") is not None:
                    size = t
                    break
            self._unit_memo[key] = size
        return self._unit_memo[key]

    def _holds(self, key: tuple[str, int]) -> bool:
        """Whether `gpus` GPUs of this type (one TP stage, or stages of the widest valid TP) hold a replica."""
        if key not in self._holds_memo:
            gpu, n = key
            tps = [t for t in valid_tps(self.perf.model.heads, n) if n % t == 0]
            t = max(tps) if tps else 1
            stages = [(get_gpu(gpu), t)] * (n // t)
            self._holds_memo[key] = len(stages) <= self.perf.model.layers and \
                self.perf.split_layers(stages, "decode") is not None
        return self._holds_memo[key]

    def holds(self, units: tuple[Unit, ...]) -> bool:
        """Whether these units' memory holds a replica (widest TP per instance, layers by the perf model's
        split): a cheap check, no capacity computed."""
        parts, _, _ = self.parts(units)
        key = ("group", parts)
        if key not in self._holds_memo:
            tps = self.parallel.group_tps(tuple(n for _, n in parts))  # one TP for every stage (vLLM)
            t = tps[0] if tps else 1
            stages = [(get_gpu(gpu), t) for gpu, n in parts for _ in range(n // t)]
            self._holds_memo[key] = len(stages) <= self.perf.model.layers and \
                self.perf.split_layers(stages, "decode") is not None
        return self._holds_memo[key]

    def instances_per_replica(self, k: int) -> int | None:
        """How many instances like pool[k] one replica needs (memory only; 1 when one holds several), None when
        more than the replica limit."""
        inst = self.pool[k]
        key = (inst.gpu, inst.gpus)
        if key not in self._per_replica:
            self._per_replica[key] = min_nodes_for_replica(self.perf, inst.gpu, inst.gpus,
                                                           self.max_replica_nodes or NO_NODE_LIMIT)
        return self._per_replica[key]

    def cost(self, state: State) -> float:
        return sum(self.pool[i].price_per_hour for i in self.instances_of(state))

    @staticmethod
    def instances_of(state: State) -> list[int]:
        return sorted({u[0] for units, _ in state for u in units})

    def parts(self, units: tuple[Unit, ...]) -> tuple[tuple[tuple[str, int], ...], float, list[int]]:
        """(GPU, GPUs) per instance in pipeline order, the slowest link between them, and the instance order."""
        counts = Counter(u[0] for u in units)
        order = sorted(counts, key=lambda k: (self.pool[k].gpu, -counts[k], k))
        parts = tuple((self.pool[k].gpu, counts[k] * self.unit_gpus[k]) for k in order)
        link = min((self.gbps(a, b) for a, b in zip(order, order[1:], strict=False)), default=math.inf)
        return parts, link, order

    def config(self, units: tuple[Unit, ...], phase: str) -> GroupConfig:
        return self.configs(units)[phase]

    def configs(self, units: tuple[Unit, ...]) -> dict[str, GroupConfig]:
        fixed = self.fixed.get(units)
        if fixed is not None:
            return fixed
        hit = self._configs.get(units)
        if hit is None:  # the planner memoises by composition; this skips working out the composition again
            parts, link, _ = self.parts(units)
            hit = self._configs[units] = self.parallel.configs(parts, link)
        return hit

    def unknown(self, state: State) -> int:
        """How many groups of a state would need a new perf-model evaluation."""
        n = 0
        for units, ph in state:
            if units in self.fixed:
                continue
            parts, link, _ = self.parts(units)
            n += not self.parallel.known(parts, link, ph)
        return n

    def fix_layout(self, units: tuple[Unit, ...], layout, phases: tuple[str, ...] = PHASES) -> None:
        """Pin a group's layout (weights already loaded): every phase uses it, capacities from the perf model;
        `phases`: those its running engine can serve (`serve.vllm.engine_phases`), the others get 0."""
        caps = {ph: self.perf.capacity(layout, ph, self.workload, self.slo)
                if ph in phases and self.perf.fits(layout) and engine_can_serve(layout.pp, ph) else 0.0
                for ph in PHASES}
        self.fixed[tuple(sorted(units))] = {ph: GroupConfig(ph, c, layout, ()) for ph, c in caps.items()}
        self._route.clear()  # what was worked out from the group's searched configs no longer holds
        self._rows.clear()
        self._bounds.clear()

    def gbps(self, a: int, b: int) -> float:
        key = (a, b) if a <= b else (b, a)
        v = self._bw.get(key)
        if v is None:
            v = self._bw[key] = self.topo.gbps(self.pool[a], self.pool[b])
        return v

    def pair_links(self, src: tuple[int, ...], dst: tuple[int, ...]) -> PairLink:
        """KV transfer between two groups: every stage's KV crosses some instance pair, the slowest bounds it."""
        key = (src, dst)
        hit = self._pair.get(key)
        if hit is not None:
            return hit
        bw, a, b = min((self.gbps(a, b), a, b) for a in src for b in dst)
        mean = max(1, int(self.mean_prompt))
        t_raw = self.perf.kv_transfer_time(int(self.q_prompt), bw, 1.0)
        cap_raw = 1.0 / self.perf.kv_transfer_time(mean, bw, 1.0)
        link = (a, b) if a <= b else (b, a)
        if set(src) == set(dst):
            out = PairLink(link, a, b, bw, cap_raw, 0.0, t_raw, float("inf"))
        else:
            out = PairLink(link, a, b, bw, cap_raw, 1.0 / self.perf.kv_transfer_time(mean, bw, KV_COMPRESSION),
                           t_raw, self.perf.kv_transfer_time(int(self.q_prompt), bw, KV_COMPRESSION))
        self._pair[key] = out
        return out

    def nic_gbps(self, k: int) -> float:
        """Instance k's network (Gbps each way), shared by all its links to other instances."""
        v = self._nic.get(k)
        if v is None:
            v = self._nic[k] = self.topo.nic_gbps(self.pool[k])
        return v

    @staticmethod
    def arrival_scvs(phases: list[str], capacities: list[float]) -> list[float]:
        """Each group's squared coefficient of variation of its arrival gaps under the router (1.0 for decode
        groups, which are not queued by arrivals): its share of the prefill/colocated capacity (see MAX_SPREAD)."""
        total = sum(c for ph, c in zip(phases, capacities, strict=True) if ph != "decode" and c > 0)
        out = []
        for ph, c in zip(phases, capacities, strict=True):
            if ph == "decode" or c <= 0 or c >= total:
                out.append(1.0)
            else:  # the share rounded up to a power of two, no smaller than 1 / MAX_SPREAD
                out.append(max(2.0 ** math.ceil(math.log2(c / total) - 1e-9), 1.0 / MAX_SPREAD))
        return out

    def spread(self, cfg: GroupConfig, scv: float) -> float:
        """A prefill or colocated group's capacity when its arrivals come with gaps of this SCV (the group's
        layout is chosen at Poisson arrivals and kept)."""
        if scv >= 1 or cfg.layout is None or cfg.capacity <= 0 or cfg.phase == "decode":
            return cfg.capacity
        key = (cfg.layout, cfg.phase, scv)
        hit = self._spread.get(key)
        if hit is None:
            slo = self.parallel.prefill_slo if cfg.phase == "prefill" else self.slo
            hit = self._spread[key] = max(cfg.capacity, self.perf.capacity(cfg.layout, cfg.phase, self.workload,
                                                                          slo, arrival_scv=scv))
        return hit

    def kv_route(self, units: tuple[Unit, ...], link_rate: float, transfer_s: float,
                 scv: float = 1.0) -> tuple[float, float]:
        """For a prefill group sending KV over a link that carries `link_rate` requests/s when fully busy, each
        taking `transfer_s` alone: (requests/s the route may put on the link, the prefill group's capacity for
        them), at the link utilisation of LINK_UTILISATIONS that serves the most."""
        if link_rate <= 0:
            return 0.0, 0.0
        key = (units, link_rate, transfer_s, scv)
        hit = self._route.get(key)
        if hit is None:
            per_token = transfer_s / max(self.q_prompt, 1.0)  # pair_links times the attainment quantile's prompt
            for u in LINK_UTILISATIONS:
                o = (u * link_rate, self.prefill_capacity(units, per_token / (1 - u), scv))
                if hit is None or (min(o), o) > (min(hit), hit):
                    hit = o
                if o[1] < min(hit):  # capacity only falls with u: no later option can reach the best
                    break
            self._route[key] = hit
        return hit

    def prefill_capacity(self, units: tuple[Unit, ...], kv_s_per_token: float, scv: float = 1.0) -> float:
        """Prefill capacity (requests/s) when each request's KV transfer takes `kv_s_per_token` seconds per
        prompt token out of its TTFT (arrival gaps of SCV `scv`): a short prompt's transfer is short, so the
        attainment quantile's transfer is not charged to every prompt."""
        cfg = self.config(units, "prefill")
        if cfg.layout is None or cfg.capacity <= 0 or not math.isfinite(kv_s_per_token):
            return 0.0
        if kv_s_per_token > 0:  # up to the next step of a geometric grid: few distinct memo keys, never optimistic
            kv_s_per_token = 2.0 ** (math.ceil(math.log2(kv_s_per_token) * KV_STEPS) / KV_STEPS)
        key = (cfg.layout, kv_s_per_token, scv)
        hit = self._pre.get(key)
        if hit is None:
            hit = self._pre[key] = self.perf.capacity(cfg.layout, "prefill", self.workload, self.slo, arrival_scv=scv,
                                                      kv_s_per_token=kv_s_per_token)
        return hit

    # ------------------------------------------------------------------ scoring

    def problem(self, state: State, network: bool = True
                ) -> tuple[lp.RouteProblem, list[GroupConfig], dict[str, list[int]]]:
        """The routing LP of a state. Without `network`, the links and NICs that pairs share are left out
        (`shares` is None): what `bound` needs, at half the work."""
        configs = [self.config(units, ph) for units, ph in state]
        scvs = self.arrival_scvs([ph for _, ph in state], [cfg.capacity for cfg in configs])
        caps = [self.spread(cfg, scv) for cfg, scv in zip(configs, scvs, strict=True)]
        roles: dict[str, list[int]] = defaultdict(list)
        for k, (_, ph) in enumerate(state):
            roles[ph].append(k)
        insts = [tuple(sorted({u[0] for u in units})) for units, _ in state]
        P, D = roles["prefill"], roles["decode"]
        # per pair: (link rate, prefill capacity for it), raw and compressed; filled by index at the end
        raw, comp = np.zeros((len(P), len(D))), np.zeros((len(P), len(D)))
        pre_raw, pre_comp = np.zeros((len(P), len(D))), np.zeros((len(P), len(D)))
        cells: list[tuple[int, int]] = []
        raw_cells: list[tuple[float, float]] = []
        comp_cells: list[tuple[float, float]] = []
        # shared network resources: each link (weight 1), each sending NIC and each receiving NIC (weight
        # link / NIC Gbps) carry the pairs through them
        shares: list[tuple[int, int, int, float]] = []
        resources: dict[tuple, int] = {}
        live = [(b, insts[j]) for b, j in enumerate(D) if configs[j].capacity > 0]
        zero = (0.0, 0.0)
        for a, i in enumerate(P):
            if configs[i].capacity <= 0 or not live:
                continue
            units, scv, src = state[i][0], scvs[i], insts[i]
            # this prefill group's pairs seen before, by the decode group's instances: (link, raw, compressed)
            row = self._rows.setdefault((units, scv, self.kv_raw, self.kv_comp), {})
            for b, dst in live:
                hit = row.get(dst)
                if hit is None:
                    pl = self.pair_links(src, dst)
                    r = c = zero
                    if self.kv_raw or pl.rate_comp <= 0:  # a hop inside one node has nothing to compress
                        r = self.kv_route(units, pl.rate_raw, pl.t_raw, scv)
                    if self.kv_comp:
                        c = self.kv_route(units, pl.rate_comp, pl.t_comp, scv)
                    hit = row[dst] = (pl, r, c)
                pl, r, c = hit
                if network:
                    shares.append((resources.setdefault(("link", pl.link), len(resources)), a, b, 1.0))
                    if pl.src != pl.dst:
                        for end, k in (("out", pl.src), ("in", pl.dst)):
                            w = min(1.0, pl.gbps / self.nic_gbps(k))
                            shares.append((resources.setdefault((end, k), len(resources)), a, b, w))
                cells.append((a, b))
                raw_cells.append(r)
                comp_cells.append(c)
        if cells:
            at = tuple(np.array(cells).T)
            raw[at], pre_raw[at] = np.array(raw_cells).T
            comp[at], pre_comp[at] = np.array(comp_cells).T
        coo = tuple(np.array(c) for c in zip(*shares, strict=True)) if shares else None
        prob = lp.RouteProblem(
            np.array([caps[i] for i in P]), np.array([caps[j] for j in D]),
            np.array([caps[c] for c in roles["colocated"]]), raw, comp, pre_raw, pre_comp, coo)
        return prob, configs, dict(roles)

    def bound(self, state: State) -> float:
        """A quick upper bound on goodput (no LP): prefill and decode sides each capped by their links. Never
        below what `evaluate` finds, so a state whose bound is below a score in hand need not be evaluated."""
        key = (state, self.kv_raw, self.kv_comp)
        hit = self._bounds.get(key)
        if hit is None:
            if len(self._bounds) >= BOUND_MEMO:
                self._bounds.clear()
            hit = self._bounds[key] = self._bound(state)
        return hit

    def _bound(self, state: State) -> float:
        prob, _, _ = self.problem(state, network=False)
        total = float(prob.colocated.sum())
        if len(prob.prefill) and len(prob.decode):
            pr, pc = prob.pair_prefill()
            # a pair's raw + compressed requests/s, whatever the mix: within the larger of its prefill capacities
            # (the prefill row) and of its link rates (the link row), over the kinds of transfer it may use
            ok_r, ok_c = (prob.link_raw > 0) & (pr > 0), (prob.link_comp > 0) & (pc > 0)
            link = np.minimum(np.maximum(np.where(ok_r, pr, 0.0), np.where(ok_c, pc, 0.0)),
                              np.maximum(np.where(ok_r, prob.link_raw, 0.0), np.where(ok_c, prob.link_comp, 0.0)))
            p = np.minimum(np.maximum(pr, pc).max(axis=1), link.sum(axis=1)).sum()
            d = np.minimum(prob.decode, link.sum(axis=0)).sum()
            total += min(p, d)
        return total

    def allowed(self, state: State) -> bool:
        """Deployment limits every strategy obeys: no replica spans more than `max_replica_nodes` instances, nor
        instances of different clouds or regions (a spanning engine runs on a Ray cluster of its nodes, which
        must reach each other on their private network: `thunderops.serve.ray_cluster`)."""
        limit = self.max_replica_nodes
        for units, _ in state:
            insts = {u[0] for u in units}
            if len(insts) == 1:
                continue
            if limit is not None and len(insts) > limit:
                return False
            if len({(self.pool[i].cloud, self.pool[i].region) for i in insts}) > 1:
                return False
        return True

    def objective(self, goodput: float, cost: float) -> float:
        """Higher is better. With a target rate: meeting it first, then cheaper; else more goodput, then cheaper."""
        if self.budget is not None and cost > self.budget + 1e-9:
            return -math.inf
        if self.rate is not None:
            if goodput >= self.rate * (1 - 1e-6):
                return 1e9 - cost
            return goodput - 1e-6 * cost
        return goodput - 1e-6 * cost

    def evaluate(self, state: State) -> Evaluation:
        self.evaluations += 1
        cost = self.cost(state)
        if self.budget is not None and cost > self.budget + 1e-9 or not self.allowed(state):
            return Evaluation(state, -math.inf, 0.0, cost)
        prob, configs, roles = self.problem(state)
        sol = lp.solve(prob)
        ev = Evaluation(state, self.objective(sol.total, cost), sol.total, cost, configs, sol, roles)
        if self.rate is not None and NEAR_MISS * self.rate <= ev.goodput < self.rate * (1 - 1e-6):
            self._near_miss(ev)
        return ev

    def _near_miss(self, ev: Evaluation) -> None:
        self.near[ev.state] = ev
        if len(self.near) > NEAR_MISSES:
            worst = min(self.near.values(), key=lambda e: e.goodput / max(e.cost, 1e-9))
            del self.near[worst.state]

    def near_misses(self, cheaper_than: float, count: int) -> list[Evaluation]:
        """With a target rate: up to `count` plans the model rates just below it that cost less than
        `cheaper_than` $/h, the most goodput first, one per price (the simulator decides whether they serve it)."""
        by_cost: dict[float, Evaluation] = {}
        for ev in self.near.values():
            if ev.cost < cheaper_than - 1e-6:
                key = round(ev.cost, 6)
                if key not in by_cost or ev.goodput > by_cost[key].goodput:
                    by_cost[key] = ev
        return sorted(by_cost.values(), key=lambda e: (-e.goodput, e.cost))[:count]

    def prune(self, ev: Evaluation) -> Evaluation:
        """Drop groups the routing leaves idle (and so instances serving nothing): same goodput, less $/h."""
        sol, roles = ev.solution, ev.roles
        if sol is None or ev.goodput <= 0:
            return ev
        flow = {}
        for a, i in enumerate(roles.get("prefill", [])):
            flow[i] = sol.raw[a].sum() + sol.comp[a].sum()
        for b, j in enumerate(roles.get("decode", [])):
            flow[j] = sol.raw[:, b].sum() + sol.comp[:, b].sum()
        for c, k in enumerate(roles.get("colocated", [])):
            flow[k] = sol.colocated[c]
        busy = [g for k, g in enumerate(ev.state) if flow.get(k, 0.0) > 1e-9]
        # a group that holds no replica or meets no SLO can never take traffic: dropping it changes nothing
        # else, so it goes even where dropping every idle group costs goodput (in the model an idle replica
        # with capacity still takes a share of the arrivals, spacing the others' wider)
        able = [g for g, cfg in zip(ev.state, ev.configs, strict=True) if cfg.layout is not None and cfg.capacity > 0]
        for kept in (busy, able):
            if len(kept) == len(ev.state) or not kept:
                continue
            new = self.evaluate(canon(kept))
            if new.goodput >= ev.goodput * (1 - 1e-9) and new.score >= ev.score:
                return new
        return ev

    # ------------------------------------------------------------------ plans

    def to_plan(self, ev: Evaluation, strategy: str = "thunderops", inputs: dict | None = None) -> Plan:
        """The Plan of an evaluated state: instances, groups with stages and GPU ids, balanced routing."""
        state = ev.state
        used = self.instances_of(state)
        instances = [self.pool[i] for i in used]
        groups: list[Group] = []
        gid = [f"g{k}" for k in range(len(state))]
        for k, ((units, ph), cfg) in enumerate(zip(state, ev.configs, strict=True)):
            _, _, order = self.parts(units)
            stages: list[Stage] = []
            li = 0
            lay = cfg.layout
            by_inst = defaultdict(list)
            for inst, slot in units:
                g = self.unit_gpus[inst]
                by_inst[inst].extend(range(slot * g, slot * g + g))
            for pos, inst in enumerate(order):
                ids = sorted(by_inst[inst])
                tp = cfg.tps[pos] if cfg.tps else len(ids)
                for s in range(len(ids) // tp):
                    layers = lay.stages[li].layers if lay is not None else 0
                    stages.append(Stage(self.pool[inst].id, self.pool[inst].gpu, tp, layers, ids[s * tp:(s + 1) * tp]))
                    li += 1
            groups.append(Group(gid[k], ph, stages))
        routing = self.routing(ev, gid)
        from thunderops.serve.vllm import kv_transfer_for

        # the serving step's connector, decided once per deployment (later versions keep it)
        inputs = {**(inputs or {}), "kv_transfer": kv_transfer_for(groups, routing)}
        plan = Plan(
            model=self.perf.model.name,
            budget_per_hour=float(self.budget) if self.budget is not None else round(sum(i.price_per_hour for i in self.pool), 4),
            cost_per_hour=round(ev.cost, 4),
            instances=instances,
            groups=groups,
            routing=routing,
            predicted=self.predict(ev, groups),
            inputs=dict(inputs or {}),
            bandwidth_gbps=self.topo.matrix(instances),
            strategy=strategy,
        )
        return plan

    def routing(self, ev: Evaluation, gid: list[str]) -> list[Route]:
        """Routing fractions: the LP spreads the target rate (or the goodput) evenly over the replicas.
        A colocated replica's route names it as both prefill and decode."""
        routing: list[Route] = []
        if ev.solution is None or ev.goodput <= 0:
            return routing
        prob, _, roles = self.problem(ev.state)
        target = min(self.rate, ev.goodput) if self.rate else ev.goodput
        sol = lp.balance(prob, target * (1 - 1e-9))
        P, D, C = roles.get("prefill", []), roles.get("decode", []), roles.get("colocated", [])
        tot = sol.total or 1.0
        for a, i in enumerate(P):
            for b, j in enumerate(D):
                if sol.raw[a, b] > 0:
                    routing.append(Route(gid[i], gid[j], float(sol.raw[a, b] / tot), 1.0))
                if sol.comp[a, b] > 0:
                    routing.append(Route(gid[i], gid[j], float(sol.comp[a, b] / tot), KV_COMPRESSION))
        for c, i in enumerate(C):
            if sol.colocated[c] > 0:
                routing.append(Route(gid[i], gid[i], float(sol.colocated[c] / tot), 1.0))
        return routing

    def predict(self, ev: Evaluation, groups: list[Group]) -> Prediction:
        """Model prediction: goodput from the LP; latencies at light load (prefill pass + KV transfer for TTFT,
        one decode step at batch 1 for TPOT), weighted over replicas by capacity."""
        if ev.goodput <= 0:
            return Prediction(method="model")
        wl = self.workload
        p50, p90 = wl.percentile("prompt", 50), wl.percentile("prompt", 90)
        ctx = int(wl.mean_prompt + wl.mean_output / 2)
        ttft50, ttft90, tpot = [], [], []
        weights_p, weights_d = [], []
        for (_, ph), cfg in zip(ev.state, ev.configs, strict=True):
            if cfg.layout is None or cfg.capacity <= 0:
                continue
            if ph in ("prefill", "colocated"):
                ttft50.append(self.perf.prefill_time(cfg.layout, [int(p50)]))
                ttft90.append(self.perf.prefill_time(cfg.layout, [int(p90)]))
                weights_p.append(cfg.capacity)
            if ph in ("decode", "colocated"):
                tpot.append(self.perf.decode_step_time(cfg.layout, 1, ctx))
                weights_d.append(cfg.capacity)
        def avg(xs, w):
            return (float(np.average(xs, weights=w)) if xs else 0.0)
        return Prediction(
            goodput_rps=round(ev.goodput, 4),
            tokens_per_s=round(ev.goodput * wl.mean_output, 1),
            ttft_p50=round(avg(ttft50, weights_p), 4), ttft_p90=round(avg(ttft90, weights_p), 4),
            tpot_p50=round(avg(tpot, weights_d), 5), tpot_p90=round(max(tpot, default=0.0), 5),
            slo_attainment=self.slo.attainment, method="model")
