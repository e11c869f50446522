"""Workloads: named presets (Azure 2023 `coding` and `conversation` length distributions), trace files
(`TIMESTAMP,ContextTokens,GeneratedTokens`), and rescaling to a target request rate.

A preset is a rate plus empirical quantiles of prompt and output lengths (shipped in
`catalogs/workloads.csv`); sampling draws lengths by inverse CDF and arrivals as a Poisson process.
A trace replays its own arrivals and lengths, time-compressed to the requested rate.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field, replace
from datetime import datetime
from functools import cache
from pathlib import Path

import numpy as np

from thunderops.errors import WorkloadError, suggest
from thunderops.specs import catalog_dir, norm

MAX_TOKENS = 10_000_000  # per request; anything larger is a broken trace (and would overflow int64 sums)
PRESET_ALIASES = {"code": "coding", "coding": "coding", "conv": "conversation", "conversation": "conversation",
                  "chat": "conversation"}


@dataclass(frozen=True)
class Requests:
    """A batch of requests as parallel arrays: arrival time (s), prompt tokens, output tokens."""

    arrival: np.ndarray
    prompt: np.ndarray
    output: np.ndarray

    def __len__(self) -> int:
        return len(self.arrival)


@dataclass(frozen=True)
class Workload:
    """Request rate (req/s) and length distributions; `trace` holds a replayable trace when loaded from a file."""

    name: str
    rate: float
    prompt_quantiles: tuple[float, ...]  # 101 values: p0, p1, ..., p100
    output_quantiles: tuple[float, ...]
    source: str = ""
    trace: Requests | None = field(default=None, compare=False, repr=False)

    @property
    def mean_prompt(self) -> float:
        return float(np.mean(_quantile_grid(self.prompt_quantiles)))

    @property
    def mean_output(self) -> float:
        return float(np.mean(_quantile_grid(self.output_quantiles)))

    def percentile(self, which: str, q: float) -> float:
        """Length percentile q (0-100) of 'prompt' or 'output'."""
        qs = self.prompt_quantiles if which == "prompt" else self.output_quantiles
        return float(np.interp(q, np.arange(101), qs))

    def share_longer_than(self, tokens: float) -> float:
        """Share of requests whose prompt plus output exceeds `tokens` (a replica whose KV cache holds fewer can
        never serve them; vLLM rejects them beyond --max-model-len): a trace's own pairs, else the quantiles'
        lengths drawn independently, as `sample` draws them."""
        if self.trace is not None:
            return float(np.mean(self.trace.prompt + self.trace.output > tokens))
        return _share_longer(self.prompt_quantiles, self.output_quantiles, float(tokens))

    def with_rate(self, rate: float) -> Workload:
        """The same workload at another mean request rate (a trace is time-compressed or stretched)."""
        check_rate(rate)
        if self.trace is None:
            return replace(self, rate=float(rate))
        scale = self.rate / rate
        t = self.trace
        return replace(self, rate=float(rate), trace=Requests(t.arrival * scale, t.prompt, t.output))

    def sample(self, n: int, seed: int = 0, rate: float | None = None) -> Requests:
        """n requests: a trace replays its first n (cycling if shorter); a preset draws Poisson arrivals."""
        if n <= 0:
            raise WorkloadError(f"number of requests must be positive, got {n}")
        wl = self if rate is None else self.with_rate(rate)
        if wl.trace is not None:
            t = wl.trace
            reps = -(-n // len(t))
            span = float(t.arrival[-1]) + 1.0 / wl.rate
            arrival = np.concatenate([t.arrival + k * span for k in range(reps)])[:n]
            return Requests(arrival, np.tile(t.prompt, reps)[:n], np.tile(t.output, reps)[:n])
        rng = np.random.default_rng(seed)
        arrival = np.cumsum(rng.exponential(1.0 / wl.rate, size=n))
        grid = np.arange(101)
        prompt = np.interp(rng.uniform(0, 100, size=n), grid, wl.prompt_quantiles)
        output = np.interp(rng.uniform(0, 100, size=n), grid, wl.output_quantiles)
        return Requests(arrival, np.maximum(1, np.rint(prompt)).astype(np.int64),
                        np.maximum(1, np.rint(output)).astype(np.int64))

    def summary(self) -> dict:
        """Rate and length percentiles, as `thunderops workload show` prints them."""
        out = {"name": self.name, "rate_rps": round(self.rate, 4), "source": self.source}
        for which in ("prompt", "output"):
            for q in (50, 90, 99):
                out[f"{which}_p{q}"] = round(self.percentile(which, q), 1)
            out[f"{which}_mean"] = round(self.mean_prompt if which == "prompt" else self.mean_output, 1)
        return out


def check_rate(rate: float) -> None:
    if not (rate > 0 and np.isfinite(rate)):
        raise WorkloadError(f"request rate must be a positive number of requests/s, got {rate}")


@cache
def _share_longer(prompt_q: tuple[float, ...], output_q: tuple[float, ...], tokens: float) -> float:
    """P(prompt + output > tokens) for independent lengths with these quantiles (401 points each, rounded to
    whole tokens of at least 1 as `Workload.sample` draws them)."""
    if prompt_q[-1] + output_q[-1] <= tokens:
        return 0.0
    u = (np.arange(401) + 0.5) / 401 * 100
    grid = np.arange(101)
    prompt = np.maximum(1, np.rint(np.interp(u, grid, prompt_q)))
    output = np.sort(np.maximum(1, np.rint(np.interp(u, grid, output_q))))
    # for each prompt, the outputs longer than tokens - prompt
    longer = len(output) - np.searchsorted(output, tokens - prompt, side="right")
    return float(longer.sum() / (len(prompt) * len(output)))


def _quantile_grid(qs: tuple[float, ...], points: int = 2001) -> np.ndarray:
    return np.interp(np.linspace(0, 100, points), np.arange(101), qs)


@cache
def presets() -> dict[str, Workload]:
    """The shipped presets from `catalogs/workloads.csv` (one row per preset and length kind)."""
    rows: dict[str, dict] = {}
    with open(catalog_dir() / "workloads.csv", newline="") as f:
        for row in csv.DictReader(f):
            entry = rows.setdefault(row["workload"], {"rate": float(row["rate_rps"]), "source": row["source"]})
            entry[row["kind"]] = tuple(float(row[f"p{i}"]) for i in range(101))
    return {name: Workload(name, r["rate"], r["prompt"], r["output"], r["source"]) for name, r in rows.items()}


def get_workload(name_or_path: str, rate: float | None = None) -> Workload:
    """A preset by name (`coding`, `conversation`) or a trace CSV path, optionally rescaled to `rate` req/s."""
    key = PRESET_ALIASES.get(norm(name_or_path))
    if key is not None:
        wl = presets()[key]
    elif Path(name_or_path).suffix.lower() == ".csv" or Path(name_or_path).exists():
        wl = load_trace(Path(name_or_path))
    else:
        raise WorkloadError(
            f"unknown workload '{name_or_path}'{suggest(name_or_path, sorted(presets()))}; "
            "use a preset (coding, conversation) or a trace CSV with TIMESTAMP,ContextTokens,GeneratedTokens"
        )
    return wl if rate is None else wl.with_rate(rate)


def plan_workload(plan, name: str | None = None) -> Workload:
    """The workload a plan (`thunderops.plan.Plan`) was made for, at the rate it was made for (`--rate`) if any:
    the one a controller observed and recorded with a workload-shift decision first, then its trace file or
    preset. `name` (a preset or trace) stands in for the plan's own, still at the plan's rate."""
    inputs = plan.inputs
    obs = inputs.get("observed_workload")
    if obs and name is None:
        return Workload(obs["name"], obs["rate"], tuple(obs["prompt_quantiles"]), tuple(obs["output_quantiles"]),
                        obs.get("source", ""))
    wl = get_workload(name or inputs.get("workload_source") or inputs.get("workload") or "conversation")
    return wl.with_rate(inputs["rate"]) if inputs.get("rate") else wl


def _parse_time(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        pass
    v = value.strip()
    if "." in v:  # Azure traces carry 7 fractional digits; datetime takes at most 6
        head, frac = v.split(".", 1)
        v = f"{head}.{frac[:6]}"
    return datetime.fromisoformat(v).timestamp()


def load_trace(path: Path) -> Workload:
    """Read a trace CSV (`TIMESTAMP,ContextTokens,GeneratedTokens`; TIMESTAMP as ISO time or seconds)."""
    required = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
    try:
        f = open(path, newline="", encoding="utf-8")
    except OSError as e:
        raise WorkloadError(f"{path}: cannot read trace ({e.strerror})") from None
    times, prompts, outputs = [], [], []
    with f:
        try:
            reader = csv.DictReader(f)
            missing = [c for c in required if c not in (reader.fieldnames or [])]
            if missing:
                raise WorkloadError(f"{path}: missing column(s) {', '.join(missing)}; "
                                    f"a trace needs the header {','.join(required)}")
            for lineno, row in enumerate(reader, start=2):
                try:
                    t = _parse_time(row["TIMESTAMP"] or "")
                    p, o = int(row["ContextTokens"] or ""), int(row["GeneratedTokens"] or "")
                except (ValueError, TypeError):
                    raise WorkloadError(f"{path}:{lineno}: bad number or timestamp in {dict(row)}; "
                                        "expected an ISO time or seconds and two integers") from None
                if not (1 <= p <= MAX_TOKENS and 1 <= o <= MAX_TOKENS) or not np.isfinite(t):
                    raise WorkloadError(f"{path}:{lineno}: token counts must be between 1 and {MAX_TOKENS:,} "
                                        "and the time finite")
                times.append(t)
                prompts.append(p)
                outputs.append(o)
        except UnicodeDecodeError:
            raise WorkloadError(f"{path}: not a UTF-8 text CSV") from None
        except csv.Error as e:
            raise WorkloadError(f"{path}: malformed CSV ({e})") from None
    if len(times) < 2:
        raise WorkloadError(f"{path}: a trace needs at least 2 requests, found {len(times)}")
    order = np.argsort(np.asarray(times), kind="stable")
    arrival = np.asarray(times)[order]
    with np.errstate(over="ignore"):  # an overflowing span is reported just below
        arrival = arrival - arrival[0]
    span = float(arrival[-1])
    if not np.isfinite(span):
        raise WorkloadError(f"{path}: timestamps span more than a float can hold; use seconds or ISO times")
    if span <= 0:
        raise WorkloadError(f"{path}: all requests share one timestamp; a trace needs a time span")
    prompt = np.asarray(prompts, dtype=np.int64)[order]
    output = np.asarray(outputs, dtype=np.int64)[order]
    rate = (len(arrival) - 1) / span
    if not np.isfinite(rate):  # a span of a subnormal number of seconds: no request rate a float can hold
        raise WorkloadError(f"{path}: the requests span {span:g} s, too short for a request rate; "
                            "use timestamps in seconds or ISO times")
    pct = np.arange(101)
    return Workload(
        name=Path(path).stem,
        rate=rate,
        prompt_quantiles=tuple(np.percentile(prompt, pct).tolist()),
        output_quantiles=tuple(np.percentile(output, pct).tolist()),
        source=str(path),
        trace=Requests(arrival, prompt, output),
    )
