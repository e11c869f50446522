"""Discrete-event simulator of a deployment plan: requests arrive (a workload's Poisson process or a trace),
are routed by the plan's fractions (with the router's own picker, `serve.pick`), batched at prefill replicas
under a token budget, have their KV cache sent over the pair's link (shared by concurrent transfers, as are the
two nodes' NICs), and decode with continuous batching bounded by KV capacity; colocated replicas run
vLLM-style chunked-prefill steps. Step times come from the perf model.

Accounting: a request's first token is out when its prompt is prefilled and (phase-split) its KV has reached
the decode replica; TTFT is that time minus arrival; TPOT is the rest of its generation time divided by the
remaining output tokens (decode queueing included); e2e is arrival to last token.

Speed: decode replicas advance in closed form between events (B sequences for k steps with context growing
by B per step costs k*a(B) + c*(k*C + B*k(k-1)/2)), so events scale with requests, not with tokens.
"""

from __future__ import annotations

import heapq
import math
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from thunderops.errors import PlanError, WorkloadError
from thunderops.perf import (
    Layout,
    PerfModel,
    Work,
    layout_of,
    nic_gbps,
    pair_gbps,
    prefill_work,
)
from thunderops.plan import SLO, Plan, Route
from thunderops.serve.pick import Picker, PromptWeights
from thunderops.specs import get_gpu
from thunderops.workload import Requests, Workload, check_rate

LINK_LATENCY_S = 50e-6  # per KV transfer (connection setup amortised; RDMA-class)


@dataclass
class SimResult:
    """Per-request latencies (s) and the run's summary. Rejected requests (KV never fits) count as SLO misses."""

    rate: float
    requests: int
    duration_s: float
    ttft: np.ndarray = field(repr=False)
    tpot: np.ndarray = field(repr=False)
    e2e: np.ndarray = field(repr=False)
    output_tokens: np.ndarray = field(repr=False)
    prompt_tokens: np.ndarray = field(repr=False)
    rejected: int
    slo: SLO
    mean_decode_batch: float = 0.0  # time-average sequences decoding, summed over replicas (engine clocks)

    @property
    def ok(self) -> np.ndarray:
        return (self.ttft <= self.slo.ttft_s) & (self.tpot <= self.slo.tpot_s)

    @property
    def attainment(self) -> float:
        return float(self.ok.mean()) if self.requests else 0.0

    @property
    def output_tokens_per_s(self) -> float:
        done = np.isfinite(self.e2e)
        return float(self.output_tokens[done].sum() / self.duration_s) if self.duration_s > 0 else 0.0

    @property
    def total_tokens_per_s(self) -> float:
        done = np.isfinite(self.e2e)
        tokens = self.output_tokens[done].sum() + self.prompt_tokens[done].sum()
        return float(tokens / self.duration_s) if self.duration_s > 0 else 0.0

    def pct(self, which: str, q: float) -> float:
        x = getattr(self, which)
        x = x[np.isfinite(x)]
        return float(np.percentile(x, q)) if len(x) else math.inf

    @classmethod
    def pooled(cls, runs: list[SimResult]) -> SimResult:
        """Independent runs of one plan at one rate (other seeds) as one sample: their requests together."""
        cat = lambda name: np.concatenate([getattr(r, name) for r in runs])  # noqa: E731
        dur = sum(r.duration_s for r in runs)
        return cls(rate=sum(r.rate * r.duration_s for r in runs) / dur if dur > 0 else runs[0].rate,
                   requests=sum(r.requests for r in runs), duration_s=dur, ttft=cat("ttft"), tpot=cat("tpot"),
                   e2e=cat("e2e"), output_tokens=cat("output_tokens"), prompt_tokens=cat("prompt_tokens"),
                   rejected=sum(r.rejected for r in runs), slo=runs[0].slo,
                   mean_decode_batch=sum(r.mean_decode_batch * r.duration_s for r in runs) / dur if dur > 0 else 0.0)

    def summary(self) -> dict:
        out = {"rate_rps": round(self.rate, 4), "requests": self.requests, "rejected": self.rejected,
               "duration_s": round(self.duration_s, 3), "slo_attainment": round(self.attainment, 4),
               "output_tokens_per_s": round(self.output_tokens_per_s, 1),
               "total_tokens_per_s": round(self.total_tokens_per_s, 1)}
        for which in ("ttft", "tpot", "e2e"):
            for q in (50, 90, 99):
                out[f"{which}_p{q}_s"] = round(self.pct(which, q), 4)
        return out


# ---------------------------------------------------------------------------------------------- engines


class _Network:
    """KV transfers in flight over shared resources: links, and each node's NIC (egress and ingress). A
    transfer moves at the smallest fair share among the resources it crosses (a resource's bytes/s over the
    transfers on it): processor sharing per resource, a lower bound of max-min fairness across them."""

    __slots__ = ("bw", "active", "count", "t_last", "version", "_rates")

    def __init__(self, bytes_per_s: dict[tuple, float]):
        self.bw = bytes_per_s
        self.active: dict[int, list] = {}  # rid -> [bytes left, resources]
        self.count: dict[tuple, int] = dict.fromkeys(bytes_per_s, 0)
        self.t_last = 0.0
        self.version = 0
        self._rates: list[float] | None = None  # each active transfer's bytes/s, until one starts or ends

    def rates(self) -> list[float]:
        """Bytes/s of each transfer in flight, in `active`'s order."""
        if self._rates is None:
            bw, count = self.bw, self.count
            self._rates = [min(bw[r] / count[r] for r in res) for _, res in self.active.values()]
        return self._rates

    def progress(self, now: float) -> None:
        dt = now - self.t_last
        if self.active and dt > 0:
            for item, rate in zip(self.active.values(), self.rates(), strict=True):
                item[0] -= rate * dt
        self.t_last = now

    def add(self, rid: int, nbytes: float, resources: tuple) -> None:
        self.active[rid] = [nbytes, resources]
        self._rates = None
        for r in resources:
            self.count[r] += 1

    def remove(self, rid: int) -> None:
        self._rates = None
        for r in self.active.pop(rid)[1]:
            self.count[r] -= 1

    def next_finish(self, now: float) -> float:
        return now + min(max(0.0, item[0]) / rate for item, rate in zip(self.active.values(), self.rates(),
                                                                         strict=True))


class _Prefill:
    """A prefill replica: FIFO queue, batches up to its token budget, one batch in the pipeline at a time
    (the next starts after the slowest stage's interval)."""

    __slots__ = ("layout", "budget", "queue", "busy")

    def __init__(self, layout: Layout, budget: int):
        self.layout = layout
        self.budget = budget
        self.queue: deque[int] = deque()
        self.busy = False


class _Engine:
    """A decode or colocated replica with continuous batching."""

    __slots__ = ("layout", "colocated", "kv_cap", "max_seqs", "budget", "kv_used", "running", "B", "C", "steps",
                 "t_state", "version", "waiting", "pf_queue", "prefilling", "base", "c_kv", "stepping", "b_time")

    def __init__(self, layout: Layout, colocated: bool, kv_cap: int, max_seqs: int, budget: int, c_kv: float):
        self.layout = layout
        self.colocated = colocated
        self.kv_cap = kv_cap
        self.max_seqs = max_seqs
        self.budget = budget  # tokens per step (chunked prefill)
        self.kv_used = 0
        self.running: list[tuple[int, int]] = []  # heap of (finish step, rid)
        self.B = 0
        self.C = 0.0
        self.steps = 0
        self.t_state = 0.0
        self.version = 0
        self.waiting: deque[int] = deque()
        self.pf_queue: deque[int] = deque()  # colocated: requests waiting for prefill
        self.prefilling: list[list[int]] = []  # colocated: [rid, tokens done]
        self.base: dict[int, float] = {}
        self.c_kv = c_kv
        self.stepping = False
        self.b_time = 0.0  # integral of the decode batch size over time (Little's law checks)


class SimDeadline(Exception):
    """A simulation ran past its deadline (a time.perf_counter() value) and was stopped."""


class Simulator:
    """One simulation of a plan. Use `simulate()`; this class holds the state of a single run."""

    def __init__(self, plan: Plan, perf: PerfModel, slo: SLO, routing: list[Route] | None = None):
        self.plan, self.perf, self.slo = plan, perf, slo
        self.routes = routing if routing is not None else (plan.routing or default_routing(plan, perf))
        if not self.routes:
            raise PlanError("the plan has no routes and no groups to serve requests; re-create it with "
                            "`thunderops plan`")
        groups = {g.id: g for g in plan.groups}
        self.layouts: dict[str, Layout] = {}
        for r in self.routes:
            for gid in (r.prefill, r.decode):
                if gid not in groups:
                    raise PlanError(f"route {r.prefill}->{r.decode} names unknown group {gid!r}")
                if gid not in self.layouts:
                    layout = layout_of(plan, groups[gid], perf)
                    perf.require_fit(layout, f"group {gid}")
                    self.layouts[gid] = layout
            same = r.prefill == r.decode
            pp_, dp_ = groups[r.prefill].phase, groups[r.decode].phase
            if (same and pp_ != "colocated") or (not same and (pp_, dp_) != ("prefill", "decode")):
                raise PlanError(f"route {r.prefill}->{r.decode} joins a {pp_} and a {dp_} group; a route goes "
                                "from a prefill group to a decode group, or from a colocated group to itself")
        fr = np.array([r.fraction for r in self.routes], dtype=float)
        if (fr < 0).any() or fr.sum() <= 0:
            raise PlanError("route fractions must be non-negative and sum to more than 0")
        self.prefill_ids: list[str] = []
        # gid -> (colocated, kv capacity, max seqs, token budget, KV cost per token)
        self.engine_spec: dict[str, tuple] = {}
        self.base_memo: dict[str, dict[int, float]] = {}
        for r in self.routes:
            if r.prefill == r.decode:
                self._engine_spec(r.prefill, True)
            else:
                if r.prefill not in self.prefill_ids:
                    self.prefill_ids.append(r.prefill)
                self._engine_spec(r.decode, False)
        self.link_bw: dict[tuple, float] = {}  # shared network resource -> bytes/s
        self.route_link: list[tuple | None] = [self._link_for(r) for r in self.routes]

    def _engine_spec(self, gid: str, colocated: bool) -> None:
        if gid in self.engine_spec:
            return
        layout = self.layouts[gid]
        probe = 1 << 20
        c_kv = (self.perf.decode_step_time(layout, 1, probe) - self.perf.decode_step_time(layout, 1, 0)) / probe
        budget, seqs = self.perf.batch_limits(layout)
        self.engine_spec[gid] = (colocated, self.perf.kv_capacity_tokens(layout), seqs * layout.pp, budget, c_kv)
        self.base_memo[gid] = {}

    def _reset(self) -> None:
        """Fresh queues, engines and links for one run (static checks and step-time memos are kept)."""
        self.prefills = {gid: _Prefill(self.layouts[gid], self.perf.batch_limits(self.layouts[gid])[0])
                         for gid in self.prefill_ids}
        self.engines = {}
        for gid, (colocated, cap, seats, budget, c_kv) in self.engine_spec.items():
            eng = _Engine(self.layouts[gid], colocated, cap, seats, budget, c_kv)
            eng.base = self.base_memo[gid]
            self.engines[gid] = eng
        self.net = _Network(self.link_bw)
        self.picker = Picker([(r.prefill, r.decode, r.fraction) for r in self.routes])
        self.inflight: dict[str, float] = {}  # replica -> load the router has in flight there (request-equivalents)
        self.weights = PromptWeights()

    def _link_for(self, r: Route) -> tuple | None:
        """The network resources a route's KV crosses: the slowest instance pair between the two groups (the
        first in the plan's instance order on ties, as the scheduler picks it) and, between two nodes, the
        sender's NIC egress and the receiver's NIC ingress."""
        if r.prefill == r.decode or r.prefill not in self.prefill_ids:
            return None
        pg, dg = self.plan.group(r.prefill), self.plan.group(r.decode)
        order = {inst.id: k for k, inst in enumerate(self.plan.instances)}
        best, src, dst = math.inf, None, None
        for a in pg.instances:
            for b in dg.instances:
                bw = pair_gbps(self.plan, a, b)
                if a == b:  # GPUs of one node: NVLink/PCIe, GB/s bidirectional -> Gbit/s one way
                    gpu = get_gpu(self.plan.instance(a).gpu) if _has(self.plan, a) else None
                    bw = gpu.intra_link_gbps / 2 * 8 if gpu else math.inf
                if (bw, order.get(a, 0), order.get(b, 0)) < (best, order.get(src, 0), order.get(dst, 0)):
                    best, src, dst = bw, a, b
        if src is None or math.isinf(best):
            return None
        link = ("link", *sorted((src, dst)))
        self.link_bw[link] = min(self.link_bw.get(link, math.inf), best * 1e9 / 8)
        if src == dst:
            return (link,)
        nics = (("out", src), ("in", dst))
        for nic in nics:
            self.link_bw[nic] = nic_gbps(self.plan, nic[1]) * 1e9 / 8
        return (link, *nics)

    # -- the run

    def run(self, reqs: Requests, give_up: bool = False, deadline: float | None = None) -> SimResult:
        """Replay these requests; each arrival gets its route from the router's picker (deterministic).
        With `give_up`, stop as soon as more requests have surely missed the SLO than its attainment target
        allows (the run's attainment is then below target, its other figures partial): a rate the plan cannot
        sustain fails in a fraction of the events. Raises SimDeadline once time.perf_counter() passes
        `deadline`."""
        if deadline is not None and time.perf_counter() > deadline:
            raise SimDeadline("simulation not started: its deadline has passed")
        self._reset()
        n = len(reqs)
        route_of = np.full(n, -1, dtype=np.int64)
        self.arrival = reqs.arrival.astype(float)
        self.prompt = reqs.prompt.astype(np.int64)
        self.output = reqs.output.astype(np.int64)
        self.first = np.full(n, math.inf)
        self.finish = np.full(n, math.inf)
        self.route_of = route_of
        self.held = [1.0] * n  # what each request weighs at the replica holding it (serve.pick)
        self.rejected = 0
        self.events: list = []
        self.seq = 0
        push = self._push
        for rid in range(n):
            push(self.arrival[rid], 0, rid)
        events = self.events
        handlers = (self._on_arrival, self._on_prefill_done, self._on_prefill_free, self._on_link,
                    self._on_kv_ready, self._on_engine)
        allowed = (1.0 - self.slo.attainment) * n if give_up else math.inf
        count = 0
        while events:
            t, _, kind, data = heapq.heappop(events)
            handlers[kind](t, data)
            count += 1
            if count % 2048 == 0:
                if allowed < n and self._surely_missed(t) > allowed:
                    break
                if deadline is not None and time.perf_counter() > deadline:
                    raise SimDeadline(f"simulation stopped at its deadline after {count} events")
        done = np.isfinite(self.finish)
        ttft = self.first - self.arrival
        gen = np.maximum(self.output - 1, 1)
        tpot = np.full(n, math.inf)  # unfinished (rejected) requests miss; no inf - inf
        tpot[done] = np.where(self.output[done] > 1, (self.finish[done] - self.first[done]) / gen[done], 0.0)
        e2e = self.finish - self.arrival
        end = float(self.finish[done].max()) if done.any() else float(self.arrival[-1])
        duration = max(end - float(self.arrival[0]), 1e-9)
        batch = sum(e.b_time for e in self.engines.values()) / duration
        rate = (n - 1) / max(float(self.arrival[-1] - self.arrival[0]), 1e-9) if n > 1 else 0.0
        return SimResult(rate, n, duration, ttft, tpot, e2e, self.output, self.prompt, self.rejected, self.slo,
                         batch)

    def _surely_missed(self, now: float) -> int:
        """Requests that miss the SLO whatever happens after `now`: no first token by arrival + TTFT target
        (rejected ones included), or finished with a TPOT above target."""
        late = np.minimum(self.first, now) - self.arrival > self.slo.ttft_s
        gen = np.maximum(self.output - 1, 1)
        done = np.isfinite(self.finish) & (self.output > 1)
        slow = np.zeros_like(done)
        slow[done] = (self.finish[done] - self.first[done]) / gen[done] > self.slo.tpot_s
        return int(np.count_nonzero(late | slow))

    def _hold(self, gid: str, k: float) -> None:
        self.inflight[gid] = self.inflight.get(gid, 0) + k

    def _streams(self, rid: int, gid: str) -> None:
        """The request's first token is out: from now on it weighs 1 at `gid`, which streams the rest."""
        self._hold(gid, 1.0 - self.held[rid])
        self.held[rid] = 1.0

    def _done(self, rid: int, t: float) -> None:
        """The request's stream ends at `t` (inf: rejected, its KV never fits): the router lets go of it."""
        if math.isinf(t):
            self.rejected += 1
        else:
            self.finish[rid] = t
        self._hold(self.routes[self.route_of[rid]].decode, -self.held[rid])

    def _push(self, t: float, kind: int, data) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, kind, data))

    def _on_arrival(self, t: float, rid: int) -> None:
        ri = self.route_of[rid] = self.picker.pick(self.inflight)
        route = self.routes[ri]
        w = self.held[rid] = self.weights.weight(self.prompt[rid])  # the router sizes the prompt as it picks
        self._hold(route.prefill, w)
        eng = self.engines.get(route.prefill)
        if eng is not None and eng.colocated:
            eng.pf_queue.append(rid)
            self._wake(eng, t)
            return
        p = self.prefills[route.prefill]
        p.queue.append(rid)
        if not p.busy:
            self._start_prefill(p, t)

    # -- prefill replicas

    def _start_prefill(self, p: _Prefill, t: float) -> None:
        budget = p.budget
        batch, tokens = [], 0
        while p.queue and (not batch or tokens + self.prompt[p.queue[0]] <= budget):
            rid = p.queue.popleft()
            batch.append(rid)
            tokens += int(self.prompt[rid])
        work = prefill_work(self.prompt[batch])
        latency = self.perf.pass_time(p.layout, work)
        interval = latency if p.layout.pp == 1 else self.perf.interval_time(p.layout, work)
        p.busy = True
        self._push(t + latency, 1, batch)
        self._push(t + interval, 2, p)

    def _on_prefill_free(self, t: float, p: _Prefill) -> None:
        p.busy = False
        if p.queue:
            self._start_prefill(p, t)

    def _on_prefill_done(self, t: float, batch: list[int]) -> None:
        net = self.net
        net.progress(t)
        sent = False
        for rid in batch:
            ri = self.route_of[rid]
            route = self.routes[ri]  # the router has the prefill's answer: it sends the decode request
            self._hold(route.prefill, -self.held[rid])
            self.held[rid] = 1.0
            self._hold(route.decode, 1.0)
            key = self.route_link[ri]
            if key is None:
                self._on_kv_ready(t, rid)
                continue
            net.add(rid, float(self.prompt[rid]) * self.perf.model.kv_bytes_per_token * route.kv_compression, key)
            sent = True
        if sent:  # one next-finish event for the whole batch's transfers
            net.version += 1
            self._push(net.next_finish(t), 3, net.version)

    def _on_link(self, t: float, version: int) -> None:
        net = self.net
        if version != net.version:
            return
        net.progress(t)
        for rid in [rid for rid, item in net.active.items() if item[0] <= 1.0]:
            net.remove(rid)
            self._push(t + LINK_LATENCY_S, 4, rid)
        if net.active:
            net.version += 1
            self._push(net.next_finish(t), 3, net.version)

    def _on_kv_ready(self, t: float, rid: int) -> None:
        self.first[rid] = t
        if self.output[rid] <= 1:
            self._done(rid, t)
            return
        eng = self.engines[self.routes[self.route_of[rid]].decode]
        eng.waiting.append(rid)
        self._wake(eng, t)

    # -- decode / colocated engines

    def _step_base(self, eng: _Engine, b: int) -> float:
        v = eng.base.get(b)
        if v is None:
            v = eng.base[b] = self.perf.decode_step_time(eng.layout, b, 0)
        return v

    def _steps_by(self, eng: _Engine, elapsed: float) -> int:
        """Whole decode steps completed `elapsed` seconds after the state time (B, C fixed)."""
        a, c, B, C = self._step_base(eng, eng.B), eng.c_kv, eng.B, eng.C
        qa, qb = c * B / 2, a + c * C - c * B / 2
        if qa <= 0:
            return int(elapsed / qb) if qb > 0 else 0
        k = (-qb + math.sqrt(qb * qb + 4 * qa * elapsed)) / (2 * qa)
        return max(0, int(k + 1e-9))

    def _time_for(self, eng: _Engine, k: int) -> float:
        a = self._step_base(eng, eng.B)
        return k * a + eng.c_kv * (k * eng.C + eng.B * k * (k - 1) / 2)

    def _advance(self, eng: _Engine, k: int) -> None:
        dt = self._time_for(eng, k)
        eng.b_time += eng.B * dt
        eng.t_state += dt
        eng.steps += k
        eng.C += eng.B * k

    def _wake(self, eng: _Engine, t: float) -> None:
        """New work arrived: bring the engine to its next step boundary, admit, and plan the next event."""
        if eng.stepping:
            return  # a chunked-prefill step is in flight; its end re-plans
        if eng.B > 0 and t > eng.t_state:
            # finish the step in progress, then re-plan from that boundary
            k = self._steps_by(eng, t - eng.t_state) + 1
            self._advance(eng, k)
            self._retire(eng)
        elif eng.B == 0:
            eng.t_state = max(eng.t_state, t)
        self._plan(eng)

    def _retire(self, eng: _Engine) -> None:
        while eng.running and eng.running[0][0] <= eng.steps:
            _, rid = heapq.heappop(eng.running)
            self._done(rid, eng.t_state)
            eng.B -= 1
            ctx = int(self.prompt[rid] + self.output[rid])
            eng.C -= ctx - 1
            eng.kv_used -= ctx

    def _admit(self, eng: _Engine) -> None:
        while eng.waiting and eng.B < eng.max_seqs:
            rid = eng.waiting[0]
            need = int(self.prompt[rid] + self.output[rid])
            if need > eng.kv_cap:
                eng.waiting.popleft()
                self._done(rid, math.inf)
                continue
            if eng.kv_used + need > eng.kv_cap:
                break
            eng.waiting.popleft()
            self._join(eng, rid, need)

    def _join(self, eng: _Engine, rid: int, need: int) -> None:
        """Start decoding: output-1 more steps (the first token came with the prefill)."""
        eng.kv_used += need
        eng.B += 1
        eng.C += float(self.prompt[rid])
        heapq.heappush(eng.running, (eng.steps + int(self.output[rid]) - 1, rid))

    def _plan(self, eng: _Engine) -> None:
        self._admit(eng)
        eng.version += 1
        if eng.colocated and (eng.pf_queue or eng.prefilling):
            self._mixed_step(eng)
            return
        if eng.B == 0:
            return
        k = eng.running[0][0] - eng.steps
        self._push(eng.t_state + self._time_for(eng, k), 5, (eng, eng.version, k))

    def _on_engine(self, t: float, data) -> None:
        eng, version, k = data
        if version != eng.version:
            return
        if eng.stepping:
            self._end_mixed_step(eng, k, t)
            return
        self._advance(eng, k)
        eng.t_state = t
        self._retire(eng)
        self._plan(eng)

    # -- colocated: chunked prefill steps

    def _mixed_step(self, eng: _Engine) -> None:
        """One step carrying every running sequence plus up to (budget - B) prompt tokens (vLLM's chunked
        prefill): prompts start in FIFO order when seats and KV allow."""
        budget = eng.budget
        while eng.pf_queue and eng.B + len(eng.prefilling) < eng.max_seqs:
            rid = eng.pf_queue[0]
            need = int(self.prompt[rid] + self.output[rid])
            if need > eng.kv_cap:
                eng.pf_queue.popleft()
                self._done(rid, math.inf)
                continue
            if eng.kv_used + need > eng.kv_cap:
                break
            eng.pf_queue.popleft()
            eng.kv_used += need
            eng.prefilling.append([rid, 0])
        room = budget - eng.B
        tokens, pairs, finishing, plan = 0, 0.0, 0, []
        for item in eng.prefilling:
            if room <= 0:
                break
            rid, done = item
            left = int(self.prompt[rid]) - done
            take = min(left, room)
            room -= take
            tokens += take
            pairs += ((done + take) * (done + take + 1) - done * (done + 1)) / 2
            finishing += take == left
            plan.append((item, take))
        if not plan and eng.B == 0:
            return  # nothing fits (KV full with prompts waiting is impossible when B == 0 unless rejected)
        dt = self.perf.mixed_step_time(eng.layout, Work(tokens=tokens, attn_pairs=pairs, logit_rows=finishing),
                                       eng.B, eng.C)
        eng.stepping = True
        self._push(eng.t_state + dt, 5, (eng, eng.version, plan))

    def _end_mixed_step(self, eng: _Engine, plan, t: float) -> None:
        eng.stepping = False
        eng.b_time += eng.B * (t - eng.t_state)
        eng.t_state = t
        self._advance_one(eng)
        finished = []
        for item, take in plan:
            item[1] += take
            if item[1] >= self.prompt[item[0]]:
                finished.append(item)
        for item in finished:
            eng.prefilling.remove(item)
            rid = item[0]
            self.first[rid] = eng.t_state
            self._streams(rid, self.routes[self.route_of[rid]].decode)
            if self.output[rid] <= 1:
                self._done(rid, eng.t_state)
                eng.kv_used -= int(self.prompt[rid] + self.output[rid])
                continue
            eng.B += 1
            eng.C += float(self.prompt[rid])
            heapq.heappush(eng.running, (eng.steps + int(self.output[rid]) - 1, rid))
        self._retire(eng)
        self._plan(eng)

    def _advance_one(self, eng: _Engine) -> None:
        eng.steps += 1
        eng.C += eng.B


def _has(plan: Plan, instance_id: str) -> bool:
    try:
        plan.instance(instance_id)
        return True
    except KeyError:
        return False


# ---------------------------------------------------------------------------------------------- API


def default_routing(plan: Plan, perf: PerfModel, workload: Workload | None = None,
                    slo: SLO | None = None) -> list[Route]:
    """Routes for a plan without any: colocated groups serve alone; every prefill group feeds every decode
    group; fractions in proportion to capacities (or to GPUs when no workload is given)."""
    def weight(g, phase):
        if workload is None:
            return float(g.gpus)
        return perf.capacity(layout_of(plan, g, perf), phase, workload, slo or SLO()) or 1e-9

    routes = [Route(g.id, g.id, weight(g, "colocated")) for g in plan.groups_in("colocated")]
    pre, dec = plan.groups_in("prefill"), plan.groups_in("decode")
    if pre and dec:
        wp = {g.id: weight(g, "prefill") for g in pre}
        wd = {g.id: weight(g, "decode") for g in dec}
        served = min(sum(wp.values()), sum(wd.values()))
        for p in pre:
            for d in dec:
                routes.append(Route(p.id, d.id, served * wp[p.id] / sum(wp.values()) * wd[d.id] / sum(wd.values())))
    total = sum(r.fraction for r in routes)
    return [Route(r.prefill, r.decode, r.fraction / total, r.kv_compression) for r in routes] if total > 0 else []


def requests_for(workload: Workload, rate: float | None, n: int, seed: int) -> Requests:
    """The requests a run replays: a trace's (time-scaled to `rate`), or a preset's Poisson sample."""
    if rate is not None:
        check_rate(rate)
    if workload.trace is not None and len(workload.trace) == 0:
        raise WorkloadError("the trace holds no requests; pass a trace file with at least 2 rows")
    return workload.sample(n, seed=seed, rate=rate)


def slo_of(plan: Plan, ttft_s: float | None = None, tpot_s: float | None = None,
           attainment: float | None = None) -> SLO:
    """The SLO to judge a plan by: explicit values, else what the plan was made for (plan.inputs['slo']),
    else SLO()'s defaults."""
    given = plan.inputs.get("slo") if isinstance(plan.inputs.get("slo"), dict) else {}
    base = SLO()
    return SLO(ttft_s if ttft_s is not None else float(given.get("ttft_s", base.ttft_s)),
               tpot_s if tpot_s is not None else float(given.get("tpot_s", base.tpot_s)),
               attainment if attainment is not None else float(given.get("attainment", base.attainment)))


def simulate(plan: Plan, workload: Workload, slo: SLO, rate: float | None = None, n: int = 2000, seed: int = 0,
             perf: PerfModel | None = None, routing: list[Route] | None = None,
             deadline: float | None = None) -> SimResult:
    """Simulate `n` requests of `workload` (at `rate` req/s, default the workload's own) through `plan`.
    `deadline`: a time.perf_counter() value past which the run stops with SimDeadline."""
    if n <= 0:
        raise WorkloadError(f"number of requests must be positive, got {n}")
    perf = perf or PerfModel(plan.model)
    sim = Simulator(plan, perf, slo, routing)
    return sim.run(requests_for(workload, rate, n, seed), deadline=deadline)


def goodput(plan: Plan, workload: Workload, slo: SLO, n: int = 1000, seed: int = 0, perf: PerfModel | None = None,
            routing: list[Route] | None = None, rel_tol: float = 0.03, max_rate: float | None = None,
            min_duration_s: float = 20.0, max_requests: int = 20_000, deadline: float | None = None) -> float:
    """The highest request rate (req/s) at which the plan meets the SLO attainment target, by bracketing and
    bisection over simulated rates to `rel_tol` (0.0 when even a trickle misses it). `max_rate` caps the
    search (returned as is when the plan meets it); without it the search starts from the perf model's
    capacity estimate. Each run lasts at least `min_duration_s` of simulated time (up to `max_requests`):
    a run of a few seconds starts from empty queues and passes rates the plan cannot sustain. Raises
    SimDeadline once time.perf_counter() passes `deadline`."""
    perf = perf or PerfModel(plan.model)
    sim_routing = routing if routing is not None else (plan.routing or default_routing(plan, perf, workload, slo))
    sim = Simulator(plan, perf, slo, sim_routing)  # validates once; each rate is a fresh run

    def meets(rate: float) -> bool:
        count = max(n, min(max_requests, math.ceil(rate * min_duration_s)))
        run = sim.run(requests_for(workload, rate, count, seed), give_up=True, deadline=deadline)
        return run.attainment >= slo.attainment

    lo = 0.0
    if max_rate is not None:  # a cap: the answer is at most max_rate
        hi = max(max_rate, 1e-3)
        if meets(hi):
            return hi
    else:
        hi = max(_capacity_guess(plan, perf, workload, slo, sim_routing) or workload.rate, 1e-3)
        for _ in range(12):  # bracket: grow until it fails, shrink until it passes
            if meets(hi):
                lo, hi = hi, hi * 2
            else:
                break
        else:
            return lo
    if lo == 0.0:
        x = hi
        for _ in range(12):
            x /= 2
            if meets(x):
                lo = x
                break
            hi = x
        else:
            return 0.0
    while hi - lo > rel_tol * lo:
        mid = (lo + hi) / 2
        if meets(mid):
            lo = mid
        else:
            hi = mid
    return lo


def _capacity_guess(plan: Plan, perf: PerfModel, workload: Workload, slo: SLO, routes: list[Route]) -> float:
    """Analytic upper estimate of the plan's goodput from the perf model's per-replica capacities."""
    groups = {g.id: g for g in plan.groups}
    caps = {}
    for gid in {r.prefill for r in routes} | {r.decode for r in routes}:
        g = groups[gid]
        layout = layout_of(plan, g, perf)
        if g.phase == "colocated":
            caps[gid] = perf.capacity(layout, "colocated", workload, slo)
        else:
            caps[gid] = perf.capacity(layout, g.phase, workload, slo)
    load: dict[str, float] = {}
    for r in routes:
        load[r.prefill] = load.get(r.prefill, 0.0) + r.fraction
        if r.decode != r.prefill:
            load[r.decode] = load.get(r.decode, 0.0) + r.fraction
    rates = [caps[g] / f for g, f in load.items() if f > 0]
    return min(rates) if rates else 0.0


def homogeneous_plan(model: str, gpu: str, prefill: tuple[int, int] = (0, 1), decode: tuple[int, int] = (0, 1),
                     colocated: tuple[int, int] = (0, 1), gpus_per_node: int = 8, network_gbps: float = 100.0,
                     price_per_gpu_hour: float = 0.0, pp: int = 1) -> Plan:
    """A hand-made plan of one GPU type: (replicas, TP) per phase, each replica `pp` stages over nodes of
    `gpus_per_node` GPUs, layers split evenly; routes by GPU share (for tests, benchmarks and examples)."""
    from thunderops.plan import Group, Instance, Stage
    from thunderops.specs import get_model

    m = get_model(model)
    instances: list[Instance] = []
    groups: list[Group] = []
    free: list[list] = []  # [instance id, next free gpu]

    def take(tp: int) -> tuple[str, list[int]]:
        for slot in free:
            if gpus_per_node - slot[1] >= tp:
                ids = list(range(slot[1], slot[1] + tp))
                slot[1] += tp
                return slot[0], ids
        iid = f"n{len(instances)}"
        instances.append(Instance(iid, "fake", "local", "local-a", f"{gpus_per_node}x{gpu}", gpu, gpus_per_node,
                                  False, price_per_gpu_hour * gpus_per_node, network_gbps, "hand-made", "n/a"))
        free.append([iid, tp])
        return iid, list(range(tp))

    split = [m.layers // pp + (1 if i < m.layers % pp else 0) for i in range(pp)]
    for phase, (count, tp) in (("prefill", prefill), ("decode", decode), ("colocated", colocated)):
        for k in range(count):
            stages = []
            for layers in split:
                iid, ids = take(tp)
                stages.append(Stage(iid, gpu, tp, layers, ids))
            groups.append(Group(f"{phase[0]}{k}", phase, stages))
    plan = Plan(model=m.name, budget_per_hour=0.0, cost_per_hour=sum(i.price_per_hour for i in instances),
                instances=instances, groups=groups, routing=[], strategy="hand-made")
    return plan
