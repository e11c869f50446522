"""Upper level: a bandwidth-aware greedy start, a phase designation scan, and a tabu search over procurement,
grouping and phases.

Moves: flip a group's phase; move a unit to another (or a new) group; swap units of two groups; merge two groups;
split one; rent an idle instance (new group, or joined to a group); give an instance back; replace an instance by
another offer. Each iteration samples a neighbourhood, ranks it by a cheap bound, evaluates the best few exactly
(parallel configs + routing LP), and moves to the best non-tabu one (a tabu move is taken when it beats the best
found: aspiration). Recently touched units/instances stay tabu for `tenure` iterations. It stops after `patience`
non-improving iterations, `max_iters`, or the time limit. Deterministic for a seed (unless the time limit cuts).
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from thunderops.scheduler.harness import Evaluation, Harness, State, Unit, canon
from thunderops.specs import get_gpu

Progress = Callable[[float, str], None]


@dataclass
class SearchConfig:
    max_iters: int = 300
    patience: int = 40
    neighbours: int = 16
    exact: int = 3  # neighbours evaluated exactly per iteration
    new_groups: int = 3  # group compositions costed by the perf model per iteration (the expensive part)
    tenure: int = 7
    time_limit: float = 60.0
    elite: int = 5
    phase_split: bool = True  # False: colocated groups only (HexGen-style)
    procure: bool = True  # False: no renting or giving back instances (fixed set)
    moves: tuple[str, ...] | None = None  # restrict the move kinds (e.g. ("flip",) for light rescheduling)
    walks: int = 3  # independent walks from the same starts (`Tabu.walks`), while the time limit allows


# ------------------------------------------------------------------------------ greedy start


def fits_alone(h: Harness, units: tuple[Unit, ...]) -> bool:
    """These units hold a replica in memory (cheap: no capacity computed)."""
    return h.holds(units)


def greedy_groups(h: Harness, instances: Iterable[int]) -> list[tuple[Unit, ...]]:
    """Group the units of these instances: units that hold a replica alone form their own group; the rest are
    clustered greedily by bandwidth (same instance first, then the fastest link) until the group fits."""
    insts = sorted(instances)
    groups: list[tuple[Unit, ...]] = []
    loose: list[Unit] = []
    for i in insts:
        for u in h.units_of[i]:
            if fits_alone(h, (u,)):
                groups.append((u,))
            else:
                loose.append(u)
    while loose:
        grp = [loose.pop(0)]
        while not fits_alone(h, tuple(grp)) and loose:
            members = {u[0] for u in grp}
            k = max(range(len(loose)), key=lambda k: (min(h.gbps(m, loose[k][0]) for m in members), -k))
            grp.append(loose.pop(k))
        if fits_alone(h, tuple(grp)):
            groups.append(tuple(grp))
        else:  # leftovers that never fit join the best-connected group as extra pipeline stages (within the
            # replica limit; else they stay unused)
            members = [{u[0] for u in g} for g in groups]
            ok = [k for k in range(len(groups)) if h.allowed(((groups[k] + tuple(grp), "colocated"),))]
            if ok:
                k = max(ok, key=lambda k: min(h.gbps(m, grp[0][0]) for m in members[k]))
                groups[k] = groups[k] + tuple(grp)
    return groups


def past(deadline: float | None) -> bool:
    """Whether time.perf_counter() is past `deadline` (None: no deadline)."""
    return deadline is not None and time.perf_counter() > deadline


def designate(h: Harness, groups: list[tuple[Unit, ...]], phase_split: bool = True,
              require_split: bool = False, deadline: float | None = None) -> Evaluation:
    """Best phase designation for fixed groups: all colocated, or the best cut of the groups ordered by
    prefill-to-decode capacity ratio (first k prefill, the rest decode), checked with the routing LP. Past
    `deadline` (a time.perf_counter() value) it settles for the best cut found so far (see `along`, `best_of`)."""
    cands: list[State] = [] if require_split and len(groups) >= 2 else [canon((g, "colocated") for g in groups)]
    if phase_split and len(groups) >= 2:
        cfgs = [h.configs(g) for g in groups]
        ratio = [(c["prefill"].capacity + 1e-12) / (c["decode"].capacity + 1e-12) for c in cfgs]
        order = sorted(range(len(groups)), key=lambda k: (-ratio[k], k))

        def cut(k: int) -> State:  # the first k + 1 groups in ratio order prefill, the rest decode
            pre = {order[m] for m in range(k + 1)}
            return canon((g, "prefill" if n in pre else "decode") for n, g in enumerate(groups))

        cands += along(h, len(groups) - 1, cut, deadline=deadline)
    return best_of(h, cands, deadline=deadline)


def best_of(h: Harness, states: list[State], exact: int = 6, deadline: float | None = None) -> Evaluation:
    """Rank by the cheap bound, evaluate the top few exactly, return the best (the first of equals, in the
    order given). The bound is an upper bound of the score, so the top few are evaluated highest bound first
    and one whose bound falls below the best score found is skipped: it cannot win (a large fleet's routing
    LP takes a good part of a second). Past `deadline` no further state is evaluated once one has been."""
    uniq = list(dict.fromkeys(states))
    top = {s: h.objective(h.bound(s), h.cost(s)) for s in uniq}
    if len(uniq) > exact:
        uniq = sorted(uniq, key=lambda s: -top[s])[:exact]
    order = {s: n for n, s in enumerate(uniq)}
    evs: list[Evaluation] = []
    for s in sorted(uniq, key=lambda s: -top[s]):
        if evs and (past(deadline) or top[s] < max(e.score for e in evs)):
            break  # in bound order: every later state's bound is lower still
        evs.append(h.evaluate(s))
    return max(sorted(evs, key=lambda e: order[e.state]), key=lambda e: e.score)


# Up to this many states of a sequence are all ranked by the bound; a longer one is searched coarse to fine.
ALONG_FULL = 40


def along(h: Harness, n: int, make: Callable[[int], State], exact: int = 6,
          deadline: float | None = None) -> list[State]:
    """The `exact` states of the sequence make(0..n-1) with the highest bound among those ranked (in sequence
    order), for `best_of`. Along such a sequence (the cut between prefill and decode groups moving one group at
    a time) the prefill side only gains and the decode side only loses, so the bound rises, then falls. A
    sequence of up to ALONG_FULL states is ranked whole, as before; a longer one (a large fleet: every cut costs
    a bound over all prefill x decode pairs) on an even grid of ALONG_FULL points, then again around the best
    grid point until the steps are single, which ranks O(ALONG_FULL log n) of the n states: its peak, its
    neighbours and the coarser grids' points, not always the next best few of all n. Past `deadline` it ranks
    no more once it has ranked one state (each bound spans all prefill x decode pairs: seconds in all for a
    fleet of hundreds of GPUs)."""
    if n <= exact:
        return [make(k) for k in range(n)]
    score: dict[int, float] = {}
    states: dict[int, State] = {}

    def rank(ks: Iterable[int]) -> bool:
        """Rank these; False if the deadline stopped it."""
        for k in ks:
            if score and past(deadline):
                return False
            if k not in score:
                st = states[k] = make(k)
                score[k] = h.objective(h.bound(st), h.cost(st))
        return True

    lo, hi = 0, n - 1
    while hi - lo + 1 > ALONG_FULL:
        grid = sorted({lo + round(m * (hi - lo) / (ALONG_FULL - 1)) for m in range(ALONG_FULL)})
        if not rank(grid):
            break
        j = max(range(len(grid)), key=lambda m: (score[grid[m]], -m))
        lo, hi = grid[max(0, j - 1)], grid[min(len(grid) - 1, j + 1)]
    else:
        rank(range(lo, hi + 1))
    return [states[k] for k in sorted(sorted(score, key=lambda k: (-score[k], k))[:exact])]  # in sequence order


# ------------------------------------------------------------------------------ tabu search


class Tabu:
    def __init__(self, h: Harness, cfg: SearchConfig, seed: int = 0, progress: Progress | None = None) -> None:
        self.h, self.cfg = h, cfg
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self.progress = progress
        self.phases = ("prefill", "decode", "colocated") if cfg.phase_split else ("colocated",)
        # one template per kind of instance: renting "one more" takes its next idle copy
        self.templates: dict[tuple, list[int]] = defaultdict(list)
        for k, inst in enumerate(h.pool):
            self.templates[(inst.instance_type, inst.cloud, inst.region, inst.zone, inst.spot,
                            inst.price_per_hour)].append(k)
        self.template_keys = list(self.templates)
        self.value = {}
        for key, insts in self.templates.items():
            inst = h.pool[insts[0]]
            spec = get_gpu(inst.gpu)
            self.value[key] = spec.memory_gbps * inst.gpus / max(inst.price_per_hour, 1e-3)
        self.elites: dict[State, Evaluation] = {}
        self.best_split: Evaluation | None = None

    def _pick(self, seq):
        return seq[int(self.rng.integers(len(seq)))]

    def _idle(self, used: set[int], exclude_template: tuple | None = None, spend: float = math.inf,
              copies: bool = False) -> list[int]:
        """Idle instances of one kind to rent: a kind picked with weight by memory bandwidth per $ (decode
        speed per $) among those affordable with `spend` $/h; with `copies`, as many as one replica needs."""
        keys, weights, picks = [], [], []
        for key in self.template_keys:
            if key == exclude_template:
                continue
            pick = self._affordable(key, used, spend, copies)
            if pick:
                keys.append(key)
                picks.append(pick)
                weights.append(self.value[key])
        if not keys:
            return []
        w = np.asarray(weights) / sum(weights)
        return picks[int(self.rng.choice(len(keys), p=w))]

    def _affordable(self, key: tuple, used: set[int], spend: float, copies: bool = True) -> list[int]:
        """Idle instances of kind `key` worth renting with `spend` $/h: one, or with `copies` as many as one
        replica needs; [] when there are too few or they cost too much."""
        idle = [i for i in self.templates[key] if i not in used]
        if not idle:
            return []
        need = self.h.instances_per_replica(idle[0]) if copies else 1
        if need is None or need > len(idle) or need * self.h.pool[idle[0]].price_per_hour > spend + 1e-9:
            return []
        return idle[:need]

    def _template(self, i: int) -> tuple:
        inst = self.h.pool[i]
        return (inst.instance_type, inst.cloud, inst.region, inst.zone, inst.spot, inst.price_per_hour)

    def neighbour(self, state: State) -> tuple[State, tuple] | None:
        """One random move: (new state, tabu attributes)."""
        groups = [list(u) for u, _ in state]
        phases = [ph for _, ph in state]
        used = {u[0] for g in groups for u in g}
        kinds = ["flip", "move", "swap", "merge", "split"]
        if self.cfg.procure:
            kinds += ["add", "add", "remove", "replace"]
        if self.cfg.moves is not None:
            kinds = [k for k in kinds if k in self.cfg.moves]
        if not kinds:
            return None
        kind = self._pick(kinds) if groups else "add"
        n = len(groups)
        if kind == "flip" and n and len(self.phases) > 1:
            k = int(self.rng.integers(n))
            phases[k] = self._pick([p for p in self.phases if p != phases[k]])
            attrs = (("g", groups[k][0]),)
        elif kind == "move" and n:
            k = int(self.rng.integers(n))
            u = groups[k].pop(int(self.rng.integers(len(groups[k]))))
            dest = int(self.rng.integers(n + 1))
            if dest == n or dest == k:
                groups.append([u])
                phases.append(phases[k])
            else:
                groups[dest].append(u)
            attrs = (("u", u),)
        elif kind == "swap" and n >= 2:
            a, b = self.rng.choice(n, 2, replace=False)
            ia, ib = int(self.rng.integers(len(groups[a]))), int(self.rng.integers(len(groups[b])))
            ua, ub = groups[a][ia], groups[b][ib]
            if self.h.pool[ua[0]].gpu == self.h.pool[ub[0]].gpu and self.h.unit_gpus[ua[0]] == self.h.unit_gpus[ub[0]]:
                return None
            groups[a][ia], groups[b][ib] = ub, ua
            attrs = (("u", ua), ("u", ub))
        elif kind == "merge" and n >= 2:
            a, b = sorted(int(x) for x in self.rng.choice(n, 2, replace=False))
            groups[a] += groups.pop(b)
            phases.pop(b)
            attrs = (("g", groups[a][0]),)
        elif kind == "split" and n:
            multi = [k for k in range(n) if len(groups[k]) >= 2]
            if not multi:
                return None
            k = self._pick(multi)
            insts = sorted({u[0] for u in groups[k]})
            if len(insts) >= 2:  # split off one instance's units
                cut = self._pick(insts)
                part = [u for u in groups[k] if u[0] == cut]
            else:
                part = groups[k][len(groups[k]) // 2:]
            groups[k] = [u for u in groups[k] if u not in part]
            groups.append(part)
            phases.append(self._pick(self.phases))
            attrs = (("g", part[0]),)
        elif kind == "add":
            spend = (self.h.budget - self.h.cost(state)) if self.h.budget is not None else math.inf
            join = n > 0 and self.rng.random() < 0.3  # extend an existing group rather than start replicas
            insts = self._idle(used, spend=spend, copies=not join)
            if not insts:
                return None
            units = [u for i in insts for u in self.h.units_of[i]]
            ph = self._pick(self.phases)
            if join:
                groups[int(self.rng.integers(n))] += units
            elif self.h.unit_alone[insts[0]]:
                for u in units:
                    groups.append([u])
                    phases.append(ph)
            else:
                groups.append(units)
                phases.append(ph)
            attrs = tuple(("i", i) for i in insts)
        elif kind == "remove" and used:
            i = self._pick(sorted(used))
            groups = [[u for u in g if u[0] != i] for g in groups]
            attrs = (("i", i),)
        elif kind == "replace" and used:
            i = self._pick(sorted(used))
            spend = (self.h.budget - self.h.cost(state) + self.h.pool[i].price_per_hour
                     if self.h.budget is not None else math.inf)
            picked = self._idle(used, exclude_template=self._template(i), spend=spend)
            if not picked:
                return None
            j = picked[0]
            home = next(k for k, g in enumerate(groups) if any(u[0] == i for u in g))
            groups = [[u for u in g if u[0] != i] for g in groups]
            groups[home] += list(self.h.units_of[j])
            attrs = (("i", i), ("i", j))
        else:
            return None
        new = canon(zip(groups, phases, strict=True))
        if not new or new == state:
            return None
        if not self.h.allowed(new):
            return None
        if self.h.budget is not None and self.h.cost(new) > self.h.budget + 1e-9:
            return None
        return new, attrs

    def _remember(self, ev: Evaluation) -> None:
        if ev.score == -math.inf:
            return
        # the best phase-split candidate too: the simulator may rate splitting higher than the model does
        if any(ph == "prefill" for _, ph in ev.state) and ev.goodput > 0 and \
                (self.best_split is None or ev.score > self.best_split.score):
            self.best_split = ev
        self.elites[ev.state] = ev
        if len(self.elites) > self.cfg.elite:
            worst = min(self.elites.values(), key=lambda e: e.score)
            del self.elites[worst.state]

    def run(self, starts: list[Evaluation], time_limit: float | None = None) -> Evaluation:
        """One walk from the best of `starts` (`time_limit`: seconds, default the config's)."""
        cfg, h = self.cfg, self.h
        limit = cfg.time_limit if time_limit is None else time_limit
        t0 = time.perf_counter()
        for ev in starts:
            self._remember(ev)
        best = cur = max(starts, key=lambda e: e.score)
        tabu: dict[tuple, int] = {}
        stall = 0
        seen: dict[State, Evaluation] = {ev.state: ev for ev in starts}
        designated: set[tuple] = set()
        for it in range(cfg.max_iters):
            elapsed = time.perf_counter() - t0
            if self.progress:
                self.progress(max(it / cfg.max_iters, stall / cfg.patience, elapsed / limit),
                              f"iteration {it}, best {best.goodput:.2f} req/s at {best.cost:.2f} $/h")
            if elapsed > limit or stall >= cfg.patience:
                break
            moves: dict[State, tuple] = {}
            for _ in range(cfg.neighbours):
                mv = self.neighbour(cur.state)
                if mv is not None and mv[0] not in moves:
                    moves[mv[0]] = mv[1]
            # cost new group compositions sparingly: neighbours whose groups are all known are free to rank
            allowance = cfg.new_groups
            for s in list(moves):
                if s in seen:
                    continue
                need = h.unknown(s)
                if need > allowance:
                    del moves[s]
                else:
                    allowance -= need
            # compound move: the best phase cut of the current groups (re-designation), once per grouping
            grouping = tuple(sorted(units for units, _ in cur.state))
            redesign: list[State] = []
            if cfg.phase_split and grouping not in designated and (cfg.moves is None or "flip" in cfg.moves):
                designated.add(grouping)
                ev = designate(h, list(grouping), deadline=t0 + limit)
                seen.setdefault(ev.state, ev)
                self._remember(ev)
                if ev.state != cur.state:
                    moves[ev.state] = ()
                    redesign.append(ev.state)
            if not moves:
                stall += 1
                continue
            ranked = sorted(moves, key=lambda s: -(seen[s].score if s in seen else h.objective(h.bound(s), h.cost(s))))
            ranked = redesign + [s for s in ranked if s not in redesign]
            chosen: Evaluation | None = None
            for s in ranked[:cfg.exact + len(redesign)]:
                if chosen is not None and time.perf_counter() - t0 > limit:
                    break
                ev = seen.get(s) or h.evaluate(s)
                seen[s] = ev
                self._remember(ev)
                is_tabu = any(tabu.get(a, -1) >= it for a in moves[s])
                if is_tabu and ev.score <= best.score:
                    continue
                if chosen is None or ev.score > chosen.score:
                    chosen = ev
            if chosen is None:
                stall += 1
                continue
            for a in moves[chosen.state]:
                tabu[a] = it + cfg.tenure
            cur = chosen
            if cur.score > best.score + 1e-9 * max(1.0, abs(best.score)):
                best, stall = cur, 0
            else:
                stall += 1
        return self.fill(best, t0 + limit)

    def walks(self, starts: list[Evaluation]) -> Evaluation:
        """The best of `cfg.walks` walks from the same starts, each with its own random stream (the first is
        `run`'s), as many as the time limit allows. One walk ends where its moves stall, and where that is
        depends on its draws: one case's plan ranged 25-33 req/s over 4 seeds."""
        cfg, t0 = self.cfg, time.perf_counter()
        best = self.run(starts)
        for k in range(1, cfg.walks):
            left = cfg.time_limit - (time.perf_counter() - t0)
            if left <= 0:
                break
            self.rng = np.random.default_rng([self.seed, k])  # the walk's own stream (`neighbour` draws from it)
            ev = self.run(starts, time_limit=left)
            if ev.score > best.score + 1e-9 * max(1.0, abs(best.score)):
                best = ev
        return best

    def fill(self, best: Evaluation, deadline: float, exact: int = 4) -> Evaluation:
        """Spend what the budget has left: add one more replica of whichever idle kind raises goodput most,
        repeated while it helps. Kinds that fit the money left are ranked by their replica's best capacity per $
        (one perf-model call per new composition, memoised), the best few evaluated with the routing LP. The
        random "rent" move finds such fillers only by luck in a pool of thousands of instances. Stops by
        `deadline` (a time.perf_counter() value)."""
        h = self.h
        if not self.cfg.procure or h.budget is None or h.rate is not None:
            return best
        while time.perf_counter() < deadline:
            used = {u[0] for units, _ in best.state for u in units}
            spend = h.budget - best.cost
            ranked: dict[tuple, tuple[float, tuple]] = {}  # composition -> (capacity per $, units)
            for key in sorted(self.template_keys, key=lambda k: -self.value[k]):
                if time.perf_counter() > deadline:
                    break
                insts = self._affordable(key, used, spend)
                if not insts:
                    continue
                units = tuple(u for i in insts for u in h.units_of[i])
                comp = h.parts(units)[0]
                cost = sum(h.pool[i].price_per_hour for i in insts)
                per_dollar = max(h.config(units, ph).capacity for ph in self.phases) / max(cost, 1e-6)
                if per_dollar > 0 and per_dollar > ranked.get(comp, (0.0, ()))[0]:
                    ranked[comp] = (per_dollar, units)
            chosen = best
            for _, units in sorted(ranked.values(), key=lambda r: -r[0])[:exact]:
                for ph in self.phases:
                    ev = h.evaluate(canon([*best.state, (units, ph)]))
                    self._remember(ev)
                    if ev.score > chosen.score + 1e-9 * max(1.0, abs(chosen.score)):
                        chosen = ev
            if chosen is best:
                return best
            best = chosen
        return best
