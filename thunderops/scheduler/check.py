"""The final check: the best few candidates (and the baselines) simulated with the discrete-event simulator.

The perf model ranks thousands of candidates; the simulator, slower and closer to the real queues, decides
between the last few. A plan's prediction then says `method="sim"`: goodput is the simulated highest rate meeting
the SLO attainment, latencies are simulated at the target rate (or at that goodput).
"""

from __future__ import annotations

import math
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from typing import TYPE_CHECKING

from thunderops.plan import SLO, Plan, Prediction
from thunderops.workload import Workload

if TYPE_CHECKING:
    from thunderops.perf import PerfModel
    from thunderops.scheduler.harness import Harness
    from thunderops.scheduler.search import Tabu

# Simulated seconds of traffic per tested rate. Goodput is a threshold on a tail statistic, so short runs are
# noisy: one 24-GPU plan measured 30.0-36.2 req/s over 5 seeds at 20 s (std 6.5 %), 31.8-33.5 at 60 s (2 %).
SIM_DURATION_S = 60.0
# With a target rate, whether a plan serves it is its attainment at the rate over this many seeds' runs pooled:
# one 60 s run is a noisy judge of a tail target (a 2-GPU Llama-3.1-8B `coding` replica at 18 req/s met 90 % in 5
# seeds of 6 and 86 % in the sixth).
RATE_SEEDS = 3


def simulate_plan(plan: Plan, workload: Workload, slo: SLO, perf, rate: float | None = None, n: int = 600,
                  seed: int = 0, max_rate: float | None = None, deadline: float | None = None) -> Prediction:
    """Simulated goodput and latencies of a plan (the model's goodput stays in plan.inputs). Goodput is
    bisected down from `max_rate` (default 1.5 x the model's goodput) to 5 %: plans compared with each other
    should share one `max_rate`, so that they are tested at the same rates and rank as their attainment does
    (from their own starting points one plan simulated 30.8 or 32.8 req/s). Raises sim.SimDeadline once
    time.perf_counter() passes `deadline`."""
    from thunderops import sim

    if not plan.groups or not plan.routing:
        return Prediction(method="sim")
    top = max_rate if max_rate is not None else max(plan.predicted.goodput_rps, 1e-3) * 1.5
    g = sim.goodput(plan, workload, slo, n=n, seed=seed, perf=perf, max_rate=top, rel_tol=0.05,
                    min_duration_s=SIM_DURATION_S, deadline=deadline)
    at = rate if rate else g
    if at <= 0:
        return Prediction(method="sim")
    if rate:  # whether the plan serves the rate: attainment over RATE_SEEDS runs as long as goodput's
        count = max(n, min(20_000, math.ceil(rate * SIM_DURATION_S)))
        res = sim.SimResult.pooled([sim.simulate(plan, workload, slo, rate=rate, n=count, seed=seed + k, perf=perf,
                                                 deadline=deadline) for k in range(RATE_SEEDS)])
        if g < rate and res.attainment >= slo.attainment:
            g = rate  # the grid of rates skipped the target, which the plan serves
    else:
        res = sim.simulate(plan, workload, slo, rate=at, n=n, seed=seed, perf=perf, deadline=deadline)
    return Prediction(
        goodput_rps=round(g, 4), tokens_per_s=round(res.output_tokens_per_s, 1),
        ttft_p50=round(res.pct("ttft", 50), 4), ttft_p90=round(res.pct("ttft", 90), 4),
        tpot_p50=round(res.pct("tpot", 50), 5), tpot_p90=round(res.pct("tpot", 90), 5),
        slo_attainment=round(res.attainment, 4), method="sim")


def with_sim(plan: Plan, workload: Workload, slo: SLO, perf, rate: float | None = None, n: int = 600,
             seed: int = 0, max_rate: float | None = None, deadline: float | None = None) -> Plan:
    pred = simulate_plan(plan, workload, slo, perf, rate, n, seed, max_rate, deadline)
    out = replace(plan, predicted=pred, inputs={**plan.inputs, "model_goodput_rps": plan.predicted.goodput_rps})
    return out


def serves_rate(plan: Plan, rate: float) -> bool:
    """Whether the plan serves `rate` req/s: simulated, its attainment at the rate (several seeds pooled) meets
    the SLO's target; by the model alone, its goodput reaches the rate."""
    p = plan.predicted
    if p.method == "sim":
        target = (plan.inputs.get("slo") or {}).get("attainment", 0.9)
        return p.slo_attainment >= target and p.goodput_rps > 0
    return p.goodput_rps >= rate * 0.999


def sim_key(plan: Plan, rate: float | None) -> tuple:
    """Higher is better: with a target rate, meeting it (simulated) and then cheaper; else more goodput."""
    p = plan.predicted
    if rate:
        meets = serves_rate(plan, rate)
        return (meets, -plan.cost_per_hour if meets else p.goodput_rps, p.goodput_rps)
    return (True, p.goodput_rps, -plan.cost_per_hour)


# The final check tests every plan on one grid of rates, from this multiple of the best model goodput among the
# baselines' plans down (ours have been up to 1.4x the best baseline's; a plan meeting the top is reported at it).
GRID_HEADROOM = 3.0
MAX_SIM_WORKERS = 8


def _sim_job(job: tuple) -> Plan:
    return with_sim(*job)


def _can_fork() -> bool:
    """Forked workers, or none. Spawned ones would re-run the caller's script (`thunderops.plan(...)` in a
    script without a `__main__` guard would plan again in each); a fork copies this process, and the workers
    only simulate (no printing, no locks another thread may hold). Linux only (macOS's system frameworks are
    not fork-safe), and not where Ray is connected: its gRPC threads do not survive a fork."""
    if not sys.platform.startswith("linux") or "fork" not in multiprocessing.get_all_start_methods():
        return False
    ray = sys.modules.get("ray")
    return not (ray is not None and getattr(ray, "is_initialized", lambda: False)())


class FinalCheck:
    """The final check's simulations, memoised by state, all on one grid of rates: the baselines' plans (before
    the search, to measure what a simulation costs) and then our finalists. Plans of one batch are simulated
    in parallel, forked processes (as many as there are cores, up to 8; the runs are seeded, so the results
    are the same as one after the other). Use as a context manager: the processes end with it."""

    def __init__(self, h: Harness, wl: Workload, slo: SLO, perf: PerfModel, rate: float | None, n: int, seed: int,
                 inputs: dict, workers: int | None = None) -> None:
        self.h, self.wl, self.slo, self.perf, self.rate, self.n, self.seed = h, wl, slo, perf, rate, n, seed
        self.inputs = inputs
        self.done: dict = {}  # state -> simulated plan
        self.max_rate: float | None = None  # the grid's top, set from the baselines' plans
        self.workers = max(1, min(MAX_SIM_WORKERS, workers if workers is not None else (os.cpu_count() or 1)))
        self.pool: ProcessPoolExecutor | None = None
        self.seconds_per_round = 0.0  # wall time of one plan per worker, as measured

    def __enter__(self) -> FinalCheck:
        if self.workers > 1 and _can_fork():
            import thunderops.sim  # noqa: F401  (imported before the fork: the workers need no import lock)

            self.pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("fork"))
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)
            self.pool = None

    def sim_all(self, items: list[tuple[Plan, tuple]], deadline: float | None = None) -> list[Plan]:
        """Simulate these (plan, state) pairs (states seen before reuse their run), in parallel. Raises
        sim.SimDeadline if they have not all run by `deadline` (a time.perf_counter() value)."""
        todo = list({state: plan for plan, state in items if state not in self.done}.items())
        if todo:
            t = time.perf_counter()
            jobs = [(plan, self.wl, self.slo, self.perf, self.rate, self.n, self.seed, self.max_rate, deadline)
                    for _, plan in todo]
            if self.pool is not None and len(jobs) > 1:
                results = list(self.pool.map(_sim_job, jobs))
            else:
                results = [_sim_job(j) for j in jobs]
            rounds = math.ceil(len(jobs) / (self.workers if self.pool is not None else 1))
            self.seconds_per_round = (time.perf_counter() - t) / rounds
            for (state, _), res in zip(todo, results, strict=True):
                self.done[state] = res
        return [replace(self.done[state], strategy=plan.strategy,
                        inputs={**plan.inputs, "model_goodput_rps": self.done[state].inputs["model_goodput_rps"]})
                for plan, state in items]

    def seconds_for(self, plans: int) -> float:
        """What simulating this many more plans should take, from the runs so far."""
        return self.seconds_per_round * math.ceil(plans / (self.workers if self.pool is not None else 1))

    def ours(self, evs: list, deadline: float | None = None) -> list[Plan]:
        return self.sim_all([(self.h.to_plan(ev, strategy="thunderops", inputs=self.inputs), ev.state)
                             for ev in evs], deadline)

    def baselines(self, plans: dict[str, Plan], base: dict, hexgen_runners: list, tabu: Tabu,
                  deadline: float, sim_deadline: float | None = None) -> tuple[dict[str, Plan], list[Plan]]:
        """Simulate the baselines' plans (HexGen, a search too, by its best few as for ours: a ratio above 1
        never comes from simulating more of our candidates than of theirs). Returns them and the candidates
        for our plan they give: each baseline's plan (ours to take when it simulates better) and, where it
        leaves budget unspent, that plan plus what the rest buys (by `deadline`, a perf_counter value). Raises
        sim.SimDeadline if the simulations have not all run by `sim_deadline`."""
        h, rate = self.h, self.rate
        best = max((p.predicted.goodput_rps for p in plans.values()), default=0.0)
        self.max_rate = GRID_HEADROOM * best if best > 0 else None
        names = list(plans)
        items = [(plans[k], h.prune(base[k]).state) for k in names]
        runners = [h.prune(e) for e in hexgen_runners] if "hexgen" in plans else []
        items += [(h.to_plan(e, strategy="hexgen", inputs=self.inputs), e.state) for e in runners]
        near = []  # with a rate: each baseline's cheaper near miss of its own shape, simulated as ours are
        if rate is not None:
            from thunderops.scheduler.baselines import shaped_like

            for name in names:
                cheaper = [e for e in h.near_misses(plans[name].cost_per_hour, len(h.near))
                           if shaped_like(h, name, e.state)]
                near += [(name, h.prune(e)) for e in cheaper[:1]]
            items += [(h.to_plan(e, strategy=name, inputs=self.inputs), e.state) for name, e in near]
        fills = []
        for name, ev in base.items():
            start = h.prune(ev)
            filled = tabu.fill(start, deadline)
            if filled.state != start.state:
                fills.append((filled, f"{name}+fill"))
        items += [(h.to_plan(ev, strategy="thunderops", inputs={**self.inputs, "found_by": f}), ev.state)
                  for ev, f in fills]
        done = self.sim_all(items, sim_deadline)
        out = dict(zip(names, done[:len(names)], strict=True))
        extra = done[len(names):len(names) + len(runners) + len(near)]  # HexGen's runners-up, the near misses
        for p in extra:
            out[p.strategy] = max([out[p.strategy], p], key=lambda p: sim_key(p, rate))
        cands = [replace(p, strategy="thunderops", inputs={**p.inputs, "found_by": p.strategy})
                 for p in out.values()]
        return out, cands + done[len(names) + len(runners) + len(near):]
