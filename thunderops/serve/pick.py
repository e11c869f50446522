"""How a request gets its (prefill, decode) replica pair. The router picks with this; the simulator replays the
same picker, so a plan's simulated latencies come from the arrival pattern its replicas will really see.

Smooth weighted round robin (nginx's algorithm) over the routing fractions: over any window a route gets its
fraction of picks to within one, and each replica sees its requests evenly spaced rather than as a random
(Poisson) thinning of the stream, which halves or better a busy prefill replica's queueing. Each route's weight
is divided by 1 + the load ratio of each of its replicas: the replica's in-flight requests over its share of
what is in flight at the replicas of its role (prefill replicas among prefill replicas; decode and colocated
ones among those). A replica that runs behind (slower than planned, or stuck on a long prompt) so gets fewer
new requests until it catches up. Per role because a decode replica holds a request for its whole generation
and a prefill replica for a fraction of a second: against everything in flight, a prefill replica's queue
would always look empty.

Load is counted in request-equivalents, not requests: while its prompt waits for or runs through prefill, a
request weighs its prompt's size over the mean prompt's (`PromptWeights`), and 1 once its tokens stream. A
replica handed one 8k-token prompt so looks busy for as long as its prefill takes, not like one with a single
short prompt: on long-tailed prompt lengths (the Azure `coding` trace) the simulator serves 2-33 % more at the
same TTFT target than with counts (a 4-prefill/2-decode H200 plan for Llama-3.1-70B, `docs/serve.md`).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

WEIGHT_STEP = 1 / 64  # weights are multiples of this: sums of them add and subtract back to exactly 0
MAX_WEIGHT = 64.0  # one prompt counts as at most this many mean prompts
MEAN_WINDOW = 1000  # the mean prompt follows the last ~this many prompts (an exponential average)


class PromptWeights:
    """A prompt's weight in request-equivalents: its size over the running mean of the prompts seen so far
    (each counted at most MAX_WEIGHT means), rounded to WEIGHT_STEP (at least one step, at most MAX_WEIGHT).
    The unit does not matter (tokens, characters) as long as every prompt is sized alike."""

    def __init__(self) -> None:
        self.mean = 0.0
        self.seen = 0

    def weight(self, size: float) -> float:
        """Weigh a new prompt of `size` (and count it into the mean)."""
        # per request on the router's hot path and the simulator's: plain comparisons, no min/max calls
        size = float(size) if size > 0 else 0.0
        self.seen += 1
        top = MAX_WEIGHT * self.mean
        # an outlier enters the mean at its capped weight: one huge prompt must not make all others look tiny
        capped = top if 0 < top < size else size
        self.mean += (capped - self.mean) / (self.seen if self.seen < MEAN_WINDOW else MEAN_WINDOW)
        if self.mean <= 0:
            return 1.0
        w = round(size / self.mean / WEIGHT_STEP) * WEIGHT_STEP
        return WEIGHT_STEP if w < WEIGHT_STEP else MAX_WEIGHT if w > MAX_WEIGHT else w


class Picker:
    """Picks among `pairs` = [(prefill id, decode id, fraction), ...] (colocated: prefill id == decode id).
    Routes with fraction 0 are never picked. Holds only the round-robin counters: in-flight loads and
    health belong to the caller (they outlive a routing table)."""

    def __init__(self, pairs: Sequence[tuple[str, str, float]]) -> None:
        total = sum(f for _, _, f in pairs if f > 0)
        self.index = [k for k, (_, _, f) in enumerate(pairs) if f > 0]  # pick k -> position in `pairs`
        self.prefill = [pairs[k][0] for k in self.index]
        self.decode = [pairs[k][1] for k in self.index]
        self.weights = [pairs[k][2] / total for k in self.index] if total > 0 else []
        self.share: dict[str, float] = {}  # replica -> its fraction of all requests
        for p, d, w in zip(self.prefill, self.decode, self.weights, strict=True):
            self.share[p] = self.share.get(p, 0.0) + w
            if d != p:
                self.share[d] = self.share.get(d, 0.0) + w
        self.current = [0.0] * len(self.index)
        self.prefill_only = sorted({p for p, d in zip(self.prefill, self.decode, strict=True) if p != d})
        self.holding = sorted(set(self.decode))  # decode and colocated replicas: their shares sum to 1
        split = sum(self.share[r] for r in self.prefill_only)
        for r in self.prefill_only:  # a prefill replica's share among prefill replicas
            self.share[r] /= split

    def pick(self, inflight: Mapping[str, float], healthy: Mapping[str, bool] | None = None,
             exclude: Collection[str] = ()) -> int:
        """The position in `pairs` of the next route, or -1 when every route is excluded or unhealthy.
        `inflight`: load in flight per replica in request-equivalents (prompts in prefill weighted by
        `PromptWeights`, streams 1 each)."""
        get, share = inflight.get, self.share
        factor: dict[str, float] = {}  # 1 / (1 + load) per replica
        for role in (self.prefill_only, self.holding):
            total = sum(get(r, 0) for r in role)
            for r in role:
                factor[r] = 1.0 / (1.0 + get(r, 0) / (share[r] * total + 1.0))
        cur, weights = self.current, self.weights
        best, wsum = -1, 0.0
        for i, (p, d) in enumerate(zip(self.prefill, self.decode, strict=True)):
            if healthy is not None and not (healthy.get(p, False) and healthy.get(d, False)):
                continue
            if exclude and (p in exclude or d in exclude):
                continue
            w = weights[i] * factor[d]
            if p != d:
                w *= factor[p]
            cur[i] += w
            wsum += w
            if best < 0 or cur[i] > cur[best]:
                best = i
        if best < 0:
            return -1
        cur[best] -= wsum
        return self.index[best]
