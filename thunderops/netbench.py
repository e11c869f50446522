"""Pairwise network measurement between nodes, through their agents (thunderops.agent).

Pairs run in rounds of disjoint pairs (the round-robin circle method: N-1 rounds for even N, N for odd N,
each pair exactly once) so that no node takes part in two measurements at a time. For a pair (a, b), b
opens a sink, a measures the TCP round trip to it and then sends on several parallel streams for
`duration_s`; b counts what arrives (or iperf3 does, where both nodes have it). A link is taken as
symmetric: the matrix holds the measured a->b figure in both directions. Inside a node with two or more
GPUs the agent measures GPU-to-GPU bandwidth with NCCL (torch); that figure is the matrix's diagonal.

Every call has a timeout. An unreachable agent, a wrong token or a node that dies mid-measurement leaves
the pair unknown (None, with the reason); the run always finishes.
"""

from __future__ import annotations

import asyncio
import json
import math
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from thunderops.errors import NetbenchError
from thunderops.plan import goodput_change

HEALTH_TIMEOUT_S = 5.0
CALL_TIMEOUT_S = 10.0


@dataclass
class AgentEndpoint:
    """Where one node's agent listens. `name` is the plan instance id (the matrix key)."""

    name: str
    host: str
    port: int
    token: str
    tls: ssl.SSLContext | None = field(default=None, repr=False)  # HTTPS pinned to the deployment's certificate

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls is not None else 'http'}://{host}:{self.port}"


@dataclass
class PairResult:
    """One measured (or unknown) link. `gbps` is Gbit/s received; `rtt_ms` the median TCP round trip."""

    a: str
    b: str
    gbps: float | None = None
    rtt_ms: float | None = None
    tool: str = ""
    seconds: float = 0.0
    error: str | None = None

    @property
    def known(self) -> bool:
        return self.gbps is not None


@dataclass
class NetbenchResult:
    """A finished run: every pair once (measured or unknown), per-node intra-node NCCL results, node errors."""

    nodes: list[str]
    pairs: list[PairResult]
    rounds: list[list[tuple[str, str]]]
    intra: dict[str, dict[str, Any]] = field(default_factory=dict)
    node_errors: dict[str, str] = field(default_factory=dict)
    duration_s: float = 0.0
    streams: int = 0
    started_at: str = ""
    wall_s: float = 0.0

    def pair(self, a: str, b: str) -> PairResult:
        for p in self.pairs:
            if {p.a, p.b} == {a, b}:
                return p
        raise KeyError((a, b))

    @property
    def unknown(self) -> list[PairResult]:
        return [p for p in self.pairs if not p.known]

    def bandwidth_gbps(self) -> dict[str, dict[str, float]]:
        """Known links only, both directions, plus measured intra-node GPU-to-GPU Gbps on the diagonal."""
        m: dict[str, dict[str, float]] = {}
        for p in self.pairs:
            if p.gbps is not None:
                m.setdefault(p.a, {})[p.b] = round(p.gbps, 3)
                m.setdefault(p.b, {})[p.a] = round(p.gbps, 3)
        for n, r in self.intra.items():
            if r.get("gbps"):
                m.setdefault(n, {})[n] = round(r["gbps"], 3)
        return m

    def rtt_ms(self) -> dict[str, dict[str, float]]:
        m: dict[str, dict[str, float]] = {}
        for p in self.pairs:
            if p.rtt_ms is not None:
                m.setdefault(p.a, {})[p.b] = round(p.rtt_ms, 4)
                m.setdefault(p.b, {})[p.a] = round(p.rtt_ms, 4)
        return m

    def message(self) -> str:
        """One line for people: how much was measured and, for what was not, why."""
        n_known = len(self.pairs) - len(self.unknown)
        msg = (f"measured {n_known} of {len(self.pairs)} node pairs in {len(self.rounds)} rounds "
               f"({self.wall_s:.1f}s)")
        by_error: dict[str, list[str]] = {}
        for p in self.unknown:
            by_error.setdefault(p.error or "unknown", []).append(f"{p.a}<->{p.b}")
        if by_error:
            msg += "; unknown: " + "; ".join(f"{', '.join(ps)} ({err})" for err, ps in by_error.items())
        return msg

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["bandwidth_gbps"] = self.bandwidth_gbps()
        d["rtt_ms"] = self.rtt_ms()
        d["message"] = self.message()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NetbenchResult:
        return cls(nodes=list(d["nodes"]), pairs=[PairResult(**p) for p in d["pairs"]],
                   rounds=[[tuple(p) for p in r] for r in d["rounds"]], intra=dict(d.get("intra", {})),
                   node_errors=dict(d.get("node_errors", {})), duration_s=d.get("duration_s", 0.0),
                   streams=d.get("streams", 0), started_at=d.get("started_at", ""), wall_s=d.get("wall_s", 0.0))


# ---------------------------------------------------------------- scheduling


def round_robin_rounds(n: int) -> list[list[tuple[int, int]]]:
    """Rounds of disjoint pairs covering every pair of range(n) exactly once (circle method).

    Fix one seat and rotate the others; with odd n a dummy seat makes one node sit out each round."""
    if n < 2:
        return []
    seats: list[int | None] = list(range(n)) + ([None] if n % 2 else [])
    m = len(seats)
    rounds = []
    for _ in range(m - 1):
        pairs = []
        for i in range(m // 2):
            a, b = seats[i], seats[m - 1 - i]
            if a is not None and b is not None:
                pairs.append((min(a, b), max(a, b)))
        rounds.append(pairs)
        seats = [seats[0], seats[-1], *seats[1:-1]]
    return rounds


# ---------------------------------------------------------------- talking to agents


class AgentCallError(Exception):
    """A failed call to an agent, already worded for people."""


async def call_agent(http: aiohttp.ClientSession, ep: AgentEndpoint, method: str, path: str,
                     timeout_s: float = CALL_TIMEOUT_S, **kwargs: Any) -> dict[str, Any]:
    """One authenticated call to an agent; its JSON answer, or AgentCallError worded for people."""
    try:
        if ep.tls is not None:
            kwargs["ssl"] = ep.tls
        async with http.request(method, ep.url + path, headers={"Authorization": f"Bearer {ep.token}"},
                                timeout=aiohttp.ClientTimeout(total=timeout_s, connect=min(3.0, timeout_s)),
                                **kwargs) as r:
            try:
                body = await r.json(content_type=None)
            except (json.JSONDecodeError, aiohttp.ContentTypeError):
                body = {}
            if r.status == 401:
                raise AgentCallError(f"agent {ep.name} ({ep.host}:{ep.port}) rejected the token (401): "
                                     "use the deployment's token")
            if r.status >= 400:
                detail = body.get("error") if isinstance(body, dict) else None
                raise AgentCallError(f"agent {ep.name}: {detail or f'HTTP {r.status}'}")
            return body if isinstance(body, dict) else {}
    except TimeoutError:
        raise AgentCallError(f"agent {ep.name} ({ep.host}:{ep.port}) did not answer {path} within {timeout_s:.0f}s") from None
    except aiohttp.ClientSSLError as e:  # before ClientConnectorError, which the certificate error also is
        raise AgentCallError(f"agent {ep.name} ({ep.host}:{ep.port}): TLS failed ({_ssl_reason(e)}); it must "
                             "serve the deployment's certificate, and agents without TLS need plain HTTP") from None
    except aiohttp.ClientConnectorError as e:
        why = "connection refused" if isinstance(e.os_error, ConnectionRefusedError) else (e.os_error.strerror or str(e))
        raise AgentCallError(f"agent {ep.name} unreachable at {ep.host}:{ep.port} ({why})") from None
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, aiohttp.ClientPayloadError) as e:
        raise AgentCallError(f"agent {ep.name} ({ep.host}:{ep.port}) went away during {path} "
                             f"({type(e).__name__})") from None


def _ssl_reason(e: aiohttp.ClientSSLError) -> str:
    err = getattr(e, "certificate_error", None) or getattr(e, "os_error", None)
    return getattr(err, "verify_message", None) or getattr(err, "reason", None) or type(err).__name__


async def _measure_pair(http: aiohttp.ClientSession, a: AgentEndpoint, b: AgentEndpoint, b_health: dict[str, Any],
                        tool: str, duration_s: float, streams: int, rtt_samples: int) -> PairResult:
    res = PairResult(a.name, b.name, tool=tool)
    sink = await call_agent(http, b, "POST", "/v1/sink", json={"tool": tool})
    target = b_health.get("advertise_host") or b.host
    try:
        try:
            rtt = await call_agent(http, a, "POST", "/v1/rtt",
                              json={"host": target, "port": sink.get("echo_port") or sink["port"],
                                    "session": sink["session"], "samples": rtt_samples})
            res.rtt_ms = rtt["rtt_ms"]
        except AgentCallError:
            if tool == "builtin":
                raise  # the builtin sink also echoes: a failure here means the data path is down
        sent = await call_agent(http, a, "POST", "/v1/send", timeout_s=duration_s + 20,
                           json={"host": target, "port": sink["port"], "session": sink["session"],
                                 "streams": streams, "duration_s": duration_s, "tool": tool})
        if tool == "iperf3":
            res.gbps, res.seconds = sent.get("gbps"), float(sent.get("seconds") or 0)
        else:
            got = await call_agent(http, b, "GET", f"/v1/sink/{sink['session']}", params={"wait_s": "2"})
            res.gbps, res.seconds = got.get("gbps"), float(got.get("seconds") or 0)
        if not res.gbps:
            res.gbps = None
            res.error = f"no data reached {b.name} from {a.name}"
    finally:
        try:
            await call_agent(http, b, "DELETE", f"/v1/sink/{sink['session']}", timeout_s=3)
        except AgentCallError:
            pass
    return res


async def measure_async(endpoints: Sequence[AgentEndpoint], *, duration_s: float = 2.0, streams: int = 4,
                        rtt_samples: int = 10, tool: str = "auto", pair_timeout_s: float | None = None,
                        nccl: bool = True, nccl_size_mb: float = 256,
                        progress: Callable[[str], None] | None = None) -> NetbenchResult:
    """Measure every pair of `endpoints` (see the module doc). `tool`: auto (iperf3 where both nodes have it
    and neither emulates a slow link, else builtin), builtin or iperf3."""
    names = [e.name for e in endpoints]
    if len(set(names)) != len(names):
        raise NetbenchError(f"node names must be unique, got {names}")
    if tool not in ("auto", "builtin", "iperf3"):
        raise NetbenchError(f"--tool must be auto, builtin or iperf3, got {tool!r}")
    if not (duration_s > 0 and streams >= 1):
        raise NetbenchError(f"need duration > 0 and streams >= 1 (got {duration_s}, {streams})")
    pair_timeout_s = pair_timeout_s or duration_s * 2 + 30
    say = progress or (lambda _msg: None)
    started, t0 = datetime.now(UTC).isoformat(timespec="seconds"), time.monotonic()
    idx_rounds = round_robin_rounds(len(endpoints))
    rounds = [[(names[i], names[j]) for i, j in r] for r in idx_rounds]
    result = NetbenchResult(nodes=names, pairs=[], rounds=rounds, duration_s=duration_s, streams=streams,
                            started_at=started)

    async with aiohttp.ClientSession() as http:
        checks = await asyncio.gather(*(call_agent(http, e, "GET", "/v1/health", timeout_s=HEALTH_TIMEOUT_S)
                                        for e in endpoints), return_exceptions=True)
        health: dict[str, dict[str, Any]] = {}
        for e, c in zip(endpoints, checks, strict=True):
            if isinstance(c, dict):
                health[e.name] = c
            else:
                result.node_errors[e.name] = str(c) if isinstance(c, AgentCallError) else f"{type(c).__name__}: {c}"
                say(f"unreachable: {result.node_errors[e.name]}")

        def pick_tool(ha: dict[str, Any], hb: dict[str, Any]) -> str:
            if tool != "auto":
                return tool
            emulated = any(h.get("link_mbps") or h.get("peer_mbps") for h in (ha, hb))
            both = ha.get("iperf3") and hb.get("iperf3") and not emulated
            return "iperf3" if both else "builtin"

        async def one(i: int, j: int) -> PairResult:
            a, b = endpoints[i], endpoints[j]
            for n in (a.name, b.name):
                if n in result.node_errors:
                    return PairResult(a.name, b.name, error=result.node_errors[n])
            t = pick_tool(health[a.name], health[b.name])
            try:
                return await asyncio.wait_for(
                    _measure_pair(http, a, b, health[b.name], t, duration_s, streams, rtt_samples), pair_timeout_s)
            except TimeoutError:
                return PairResult(a.name, b.name, tool=t, error=f"measurement timed out after {pair_timeout_s:.0f}s")
            except AgentCallError as e:
                return PairResult(a.name, b.name, tool=t, error=str(e))
            except (aiohttp.ClientError, OSError, KeyError, ValueError) as e:
                return PairResult(a.name, b.name, tool=t, error=f"{type(e).__name__}: {e}")

        for k, r in enumerate(idx_rounds, 1):
            done = await asyncio.gather(*(one(i, j) for i, j in r))
            result.pairs.extend(done)
            for p in done:
                say(f"round {k}/{len(idx_rounds)} {p.a}<->{p.b}: "
                    + (f"{p.gbps:.2f} Gbit/s, rtt {p.rtt_ms or float('nan'):.3f} ms" if p.known else f"unknown ({p.error})"))

        if nccl:
            async def intra(e: AgentEndpoint) -> tuple[str, dict[str, Any]]:
                try:
                    r = await call_agent(http, e, "POST", "/v1/nccl", timeout_s=240,
                                    json={"size_mb": nccl_size_mb, "timeout_s": 200})
                except AgentCallError as err:
                    return e.name, {"gbps": None, "error": str(err)}
                pairs = r.get("pairs") or {}
                return e.name, {"gbps": min(pairs.values()) if pairs else None, "pairs": pairs,
                                **({"skipped": r["skipped"]} if r.get("skipped") else {})}

            live = [e for e in endpoints if e.name in health]
            result.intra = dict(await asyncio.gather(*(intra(e) for e in live)))
    result.wall_s = time.monotonic() - t0
    return result


def measure(endpoints: Sequence[AgentEndpoint], **kwargs: Any) -> NetbenchResult:
    """Synchronous `measure_async`."""
    return asyncio.run(measure_async(endpoints, **kwargs))


def agent_get(ep: AgentEndpoint, path: str, timeout_s: float = 3.0) -> dict[str, Any]:
    """Synchronous GET for pollers (e.g. the controller: `agent_get(ep, "/v1/preemption")`)."""

    async def go() -> dict[str, Any]:
        async with aiohttp.ClientSession() as http:
            return await call_agent(http, ep, "GET", path, timeout_s=timeout_s)

    return asyncio.run(go())


# ---------------------------------------------------------------- endpoints


def parse_hosts(spec: str, token: str, default_port: int | None = None,
                tls: ssl.SSLContext | None = None) -> list[AgentEndpoint]:
    """`host:port,host:port` or `name=host:port,...` (names default to host:port); `tls`: agents speak HTTPS
    with the certificate this client context pins."""
    from thunderops.provision import AGENT_PORT

    out = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        name, _, addr = item.rpartition("=")
        host, sep, port = addr.rpartition(":")
        if not sep:
            host, port = addr, str(default_port or AGENT_PORT)
        host = host.strip("[]")
        try:
            port_n = int(port)
            if not (0 < port_n < 65536) or not host:
                raise ValueError
        except ValueError:
            raise NetbenchError(f"--hosts: {item!r} is not host:port (e.g. 10.0.0.5:{AGENT_PORT})") from None
        out.append(AgentEndpoint(name or f"{host}:{port_n}", host, port_n, token, tls))
    if len(out) < 2:
        raise NetbenchError("--hosts needs at least two agents, e.g. --hosts 10.0.0.5:8790,10.0.0.6:8790")
    return out


def endpoints_for_deployment(deployment: str, store: Any = None) -> list[AgentEndpoint]:
    """The agents of a deployment's ready nodes (named by plan instance id), with the deployment's token, over
    HTTPS pinned to its certificate where it has one."""
    from thunderops.agent import client_tls, deployment_tls, deployment_token
    from thunderops.provision import AGENT_PORT
    from thunderops.state import Store

    store = store or Store()
    nodes = [n for n in store.nodes(deployment) if n.status == "ready" and n.host]
    if len(nodes) < 2:
        raise NetbenchError(f"deployment {deployment!r} has {len(nodes)} ready node(s) with an address; "
                            "netbench needs two or more (see `thunderops status`)")
    token = deployment_token(deployment, create=False)
    pair = deployment_tls(deployment, create=False)
    tls = client_tls(pair[0]) if pair else None
    return [AgentEndpoint(n.instance_id, n.host, n.agent_port or AGENT_PORT, token, tls) for n in nodes]


# ---------------------------------------------------------------- storing and showing


def store_result(deployment: str, result: NetbenchResult, store: Any = None) -> int:
    """Record the run as a `netbench` event and a new plan version whose bandwidth_gbps holds the
    measured links (unknown pairs keep the plan's previous figures). Returns the new plan version."""
    from thunderops.state import Store

    store = store or Store()
    plan = store.latest_plan(deployment)
    before = plan.version
    plan.bandwidth_gbps = merge_bandwidth(plan.bandwidth_gbps, result.bandwidth_gbps())
    with store.transaction():
        version = store.add_plan(deployment, plan, reason="netbench: measured bandwidth")
        store.add_event(deployment, "netbench", result.message(),
                        {"before": before, "after": version, "result": result.to_dict()})
    return version


def merge_bandwidth(old: dict[str, dict[str, float]], new: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    merged = {a: dict(row) for a, row in old.items()}
    for a, row in new.items():
        merged.setdefault(a, {}).update(row)
    return merged


def render_table(result: NetbenchResult) -> Any:
    """A Rich table: Gbit/s (and round trip in ms) per pair; '?' marks unknown, the diagonal is NCCL."""
    from rich.table import Table

    t = Table(title=f"Gbit/s (rtt ms), {result.streams} streams x {result.duration_s:g}s",
              caption="? unknown; diagonal: GPU-to-GPU via NCCL")
    t.add_column("from \\ to")
    for n in result.nodes:
        t.add_column(n, justify="right")
    for a in result.nodes:
        cells = []
        for b in result.nodes:
            if a == b:
                g = result.intra.get(a, {}).get("gbps")
                cells.append(f"[cyan]{g:.0f}[/]" if g else "[dim]-[/]")
                continue
            p = result.pair(a, b)
            cells.append(f"{p.gbps:.2f} ({p.rtt_ms:.2f})" if p.known and p.rtt_ms is not None
                         else f"{p.gbps:.2f}" if p.known else "[red]?[/]")
        t.add_row(a, *cells)
    return t


def save_heatmap(result: NetbenchResult, path: str | Path) -> Path:
    """A PNG heat map of the matrix (grey = unknown), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    path = Path(path)
    n = len(result.nodes)
    bw = result.bandwidth_gbps()
    m = np.full((n, n), np.nan)
    for i, a in enumerate(result.nodes):
        for j, b in enumerate(result.nodes):
            if i != j and b in bw.get(a, {}):
                m[i, j] = bw[a][b]
    fig, ax = plt.subplots(figsize=(1.2 * n + 2.5, 1.0 * n + 1.5))
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#cccccc")
    im = ax.imshow(np.ma.masked_invalid(m), cmap=cmap, vmin=0)
    ax.set_xticks(range(n), result.nodes, rotation=45, ha="right")
    ax.set_yticks(range(n), result.nodes)
    finite = m[np.isfinite(m)]
    hi = finite.max() if finite.size else 1.0
    for i in range(n):
        for j in range(n):
            intra = result.intra.get(result.nodes[i], {}).get("gbps") if i == j else None
            text = (f"{intra:.0f}\nNCCL" if intra else "-") if i == j else \
                ("?" if math.isnan(m[i, j]) else f"{m[i, j]:.2f}")
            ax.text(j, i, text, ha="center", va="center",
                    color="black" if i == j or math.isnan(m[i, j]) or m[i, j] > 0.6 * hi else "white")
    fig.colorbar(im, ax=ax, label="Gbit/s")
    ax.set_title("measured bandwidth, Gbit/s (grey: unknown; diagonal: GPU-to-GPU)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def default_png(deployment: str) -> Path:
    from thunderops.state import default_home

    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return default_home() / "netbench" / f"{deployment}-{stamp}.png"


# ---------------------------------------------------------------- finalize


@dataclass
class FinalizeOutcome:
    """What `measure_and_finalize` did: the measurement, the plan versions before/after, and the changes."""

    deployment: str
    result: NetbenchResult
    before_version: int
    after_version: int
    changes: list[str]
    plan: Any  # thunderops.plan.Plan, the new version
    png: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"deployment": self.deployment, "netbench": self.result.to_dict(), "before_version": self.before_version,
                "after_version": self.after_version, "changes": self.changes,
                "predicted": asdict(self.plan.predicted), "png": str(self.png) if self.png else None}


def _change_lines(changes: Any) -> list[str]:
    if not changes:
        return []
    if isinstance(changes, str):
        return [changes]
    if isinstance(changes, dict):
        return [f"{k}: {v}" for k, v in changes.items()]
    return [str(c) for c in changes]


def measure_and_finalize(deployment: str, *, store: Any = None, endpoints: Sequence[AgentEndpoint] | None = None,
                         threshold: float = 0.1, png: str | Path | None = None, console: Any = None,
                         finalize_options: dict[str, Any] | None = None, relayout: bool = False,
                         **measure_kwargs: Any) -> FinalizeOutcome:
    """Measure the deployment's links, re-plan on them (`thunderops.scheduler.finalize`: parallel configs and
    routing on the measured matrix; a search restricted to the provisioned nodes if goodput drops more than
    `threshold`), store the new plan version with events, and print what changed and why when `console` is given.
    `finalize_options` go to the scheduler's finalize (e.g. time_limit, seed); the rest to `measure`.
    The engines start with their nodes, so by default their groups and layouts stay and only phases, routing
    and KV compression move (`relayout=True` re-derives layouts too: the engines then need restarting).

    `thunderops up` calls this between provisioning and serving. Unknown pairs keep the plan's figures."""
    from thunderops.scheduler.reschedule import finalize
    from thunderops.state import Store

    store = store or Store()
    plan = store.latest_plan(deployment)
    before = plan.version
    eps = list(endpoints) if endpoints is not None else endpoints_for_deployment(deployment, store)
    result = measure(eps, **measure_kwargs)
    measured = result.bandwidth_gbps()
    bw = merge_bandwidth(plan.bandwidth_gbps, measured)
    if measured:
        new_plan, changes = finalize(plan, bw, threshold=threshold, keep_layouts=not relayout,
                                     **(finalize_options or {}))
        new_plan.bandwidth_gbps = new_plan.bandwidth_gbps or bw
        lines = _change_lines(changes) or ["no change: the plan holds on the measured links"]
        reason = "finalize: re-planned on measured bandwidth"
    else:
        new_plan, lines = plan, ["no link could be measured; the plan keeps its assumed bandwidth"]
        reason = "netbench: nothing measured"
    with store.transaction():
        after = store.add_plan(deployment, new_plan, reason=reason)
        store.add_event(deployment, "netbench", result.message(),
                        {"before": before, "after": after, "result": result.to_dict()})
        store.add_event(deployment, "finalize", "; ".join(lines),
                        {"before": before, "after": after, "changes": lines, "threshold": threshold,
                         "goodput_rps": {"before": plan.predicted.goodput_rps,
                                         "after": new_plan.predicted.goodput_rps}})
    png_path = save_heatmap(result, png or default_png(deployment))
    out = FinalizeOutcome(deployment, result, before, after, lines, new_plan, png_path)
    if console is not None:
        console.print(render_table(result))
        console.print(result.message(), highlight=False, style="yellow" if result.unknown else None)
        console.print(f"plan v{before} -> v{after} (goodput {goodput_change(plan.predicted, new_plan.predicted)} "
                      "predicted):", highlight=False)
        for line in lines:
            console.print(f"  - {line}", highlight=False)
        console.print(f"heat map: {png_path}", highlight=False)
    return out


# ---------------------------------------------------------------- intra-node NCCL (run on a GPU node)


def _nccl_worker(rank: int, world: int, port: int, size_mb: float, iters: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    buf = torch.empty(int(size_mb * 2**20), dtype=torch.uint8, device="cuda")
    results: dict[str, float] = {}
    for rnd in round_robin_rounds(world):
        partner = next((b if a == rank else a for a, b in rnd if rank in (a, b)), None)
        if partner is not None:
            sender = rank < partner
            for k in range(iters + 2):  # two warm-ups
                if k == 2:
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                dist.send(buf, partner) if sender else dist.recv(buf, partner)
            torch.cuda.synchronize()
            if not sender:
                results[f"{partner}-{rank}"] = buf.numel() * iters * 8 / (time.perf_counter() - t0) / 1e9
        dist.barrier()
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, results)
    if rank == 0:
        merged = {k: round(v, 1) for d in gathered for k, v in d.items()}
        Path(out).write_text(json.dumps(merged))
    dist.destroy_process_group()


def nccl_pairwise_gbps(size_mb: float = 256, iters: int = 10) -> dict[str, Any]:
    """GPU-to-GPU Gbit/s for every pair of this machine's GPUs (NCCL send/recv, pairs in disjoint rounds)."""
    import socket
    import tempfile

    try:
        import torch
        import torch.multiprocessing as mp
    except ImportError:
        return {"pairs": {}, "skipped": "torch is not installed"}
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n < 2:
        return {"pairs": {}, "skipped": f"needs >= 2 GPUs, found {n}"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as d:
        out = str(Path(d) / "nccl.json")
        mp.spawn(_nccl_worker, args=(n, port, size_mb, iters, out), nprocs=n, join=True)
        pairs = json.loads(Path(out).read_text())
    return {"pairs": pairs, "gpus": n, "size_mb": size_mb, "iters": iters}


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(prog="python -m thunderops.netbench")
    ap.add_argument("what", choices=["nccl"])
    ap.add_argument("--size-mb", type=float, default=256)
    ap.add_argument("--iters", type=int, default=10)
    a = ap.parse_args()
    print(json.dumps(nccl_pairwise_gbps(a.size_mb, a.iters)))
