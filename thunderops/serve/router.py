"""The OpenAI-compatible prefill/decode router.

Each request runs vLLM's disaggregated flow: the prompt goes to a prefill engine with ``max_tokens=1`` and
``kv_transfer_params={"do_remote_decode": true}``; the original request goes, with the returned
``kv_transfer_params``, to a decode engine, whose answer is streamed back. Replica pairs are picked by the
plan's routing fractions (smooth weighted round robin) with each weight scaled down by how far its replicas'
in-flight load runs above their share. The routing table is swapped atomically (``Router.set_routing`` or
``POST /admin/routing``) while requests are in flight.

Failures: a prefill that fails is retried on another replica; a decode replica that dies mid-stream has the
request continued elsewhere from the prompt plus the text already sent (request migration), so the client
sees one stream. Every request leaves a ``UsageRecord`` (prompt/output tokens, replicas, timestamps).
"""

from __future__ import annotations

import asyncio
import bisect
import hmac
import itertools
import logging
import ssl
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from thunderops.errors import UserError
from thunderops.plan import Plan, Route
from thunderops.serve import fanout
from thunderops.serve.fanout import ChunkSink
from thunderops.serve.pick import Picker, PromptWeights
from thunderops.serve.upstream import UpstreamError, UpstreamPool
from thunderops.specs import model_keys, norm

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_PREFILL_KV = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
               "remote_block_ids": None, "remote_host": None, "remote_port": None}


class RoutingError(UserError):
    """A routing table that cannot be used (unknown replicas, bad fractions)."""


@dataclass(frozen=True)
class Replica:
    """One engine (a plan group) reachable at `url` (e.g. http://10.0.0.5:8100)."""

    id: str
    url: str
    phase: str = "colocated"


@dataclass(frozen=True)
class RoutingTable:
    """Which replicas exist and what fraction of requests each (prefill, decode) pair gets."""

    replicas: dict[str, Replica]
    routes: tuple[Route, ...]
    version: int = 0

    def __post_init__(self) -> None:
        if not self.routes:
            raise RoutingError("routing table has no routes; give at least one prefill->decode pair")
        for r in self.routes:
            for rid in (r.prefill, r.decode):
                if rid not in self.replicas:
                    raise RoutingError(f"route {r.prefill}->{r.decode} names unknown replica {rid!r}; "
                                       f"known: {', '.join(sorted(self.replicas)) or 'none'}")
            if not r.fraction >= 0:
                raise RoutingError(f"route {r.prefill}->{r.decode}: fraction must be >= 0, got {r.fraction}")
        if sum(r.fraction for r in self.routes) <= 0:
            raise RoutingError("routing fractions sum to 0; at least one route needs a positive fraction")

    @classmethod
    def from_plan(cls, plan: Plan, urls: dict[str, str], version: int | None = None) -> RoutingTable:
        """Replicas are the plan's groups at `urls` (group id -> base URL). Without plan routes, requests
        spread evenly over colocated groups and all prefill x decode pairs."""
        missing = [g.id for g in plan.groups if g.id not in urls]
        if missing:
            raise RoutingError(f"no URL for group(s) {', '.join(missing)}; start their engines first")
        replicas = {g.id: Replica(g.id, urls[g.id].rstrip("/"), g.phase) for g in plan.groups}
        routes = list(plan.routing)
        if not routes:
            pairs = [(g.id, g.id) for g in plan.groups_in("colocated")]
            pairs += [(p.id, d.id) for p in plan.groups_in("prefill") for d in plan.groups_in("decode")]
            routes = [Route(p, d, 1.0 / len(pairs)) for p, d in pairs] if pairs else []
        return cls(replicas, tuple(routes), plan.version if version is None else version)

    def without(self, dead: Iterable[str]) -> RoutingTable:
        """The same table minus some replicas and every route through them."""
        dead = set(dead)
        return RoutingTable({k: v for k, v in self.replicas.items() if k not in dead},
                            tuple(r for r in self.routes if r.prefill not in dead and r.decode not in dead),
                            self.version + 1)

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "replicas": [asdict(r) for r in self.replicas.values()],
                "routes": [asdict(r) for r in self.routes]}

    @classmethod
    def from_dict(cls, d: Any) -> RoutingTable:
        try:
            reps = [Replica(str(r["id"]), str(r["url"]).rstrip("/"), str(r.get("phase", "colocated")))
                    for r in d["replicas"]]
            routes = tuple(Route(str(r["prefill"]), str(r["decode"]), float(r["fraction"]),
                                 float(r.get("kv_compression", 1.0))) for r in d["routes"])
            return cls({r.id: r for r in reps}, routes, int(d.get("version", 0)))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise RoutingError(f"malformed routing table ({type(e).__name__}: {e}); expected "
                               '{"replicas":[{"id","url","phase"}],"routes":[{"prefill","decode","fraction"}]}') from None


@dataclass
class UsageRecord:
    """Token counts of one request, for cost reports. Times are Unix seconds."""

    request_id: str
    model: str
    endpoint: str
    stream: bool
    prompt_tokens: int = 0
    output_tokens: int = 0
    prefill_replica: str | None = None
    decode_replica: str | None = None
    replicas: list[str] = field(default_factory=list)  # every engine that served part of the request
    started_at: float = 0.0
    first_token_at: float | None = None
    finished_at: float | None = None
    status: int = 0
    migrations: int = 0
    prefill_retries: int = 0


@dataclass
class RouterConfig:
    api_key: str
    served_models: list[str]
    max_model_len: int | None = None
    admin_key: str | None = None  # defaults to api_key
    engine_api_key: str | None = None  # sent to the engines (vLLM's --api-key / VLLM_API_KEY)
    health_interval_s: float = 1.0
    probe_failures: int = 3
    max_attempts: int = 4
    retry_after_s: int = 2
    request_timeout_s: float = 3600.0
    usage_history: int = 100_000
    usage_sink: Callable[[UsageRecord], None] | None = None
    engine_tls: ssl.SSLContext | None = None  # trusts the engines' certificate (https:// replica URLs)


class _NoReplica(Exception):
    pass


class _ClientGone(Exception):
    """The client hung up mid-stream (not the engine's fault: nothing to migrate)."""


async def _emit(resp: web.StreamResponse, data: bytes) -> None:
    try:
        await resp.write(data)
    except (ConnectionError, RuntimeError) as e:  # aiohttp: ClientConnectionResetError / "closing transport"
        raise _ClientGone(str(e)) from None


class _ClientStream:
    """The streamed answer to the client: opened on its first chunk (so an engine's early error can still be
    an ordinary HTTP error), ended with [DONE]."""

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.response: web.StreamResponse | None = None

    @property
    def opened(self) -> bool:
        return self.response is not None

    async def open(self) -> None:
        if self.response is None:
            self.response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            await self.response.prepare(self.request)
            self.request["thunderops_stream"] = self.response

    async def emit(self, chunk: dict[str, Any]) -> None:
        assert self.response is not None
        await _emit(self.response, b"data: " + orjson.dumps(chunk) + b"\n\n")

    async def close(self) -> web.StreamResponse:
        assert self.response is not None
        await _emit(self.response, b"data: [DONE]\n\n")
        try:
            await self.response.write_eof()
        except (ConnectionError, RuntimeError):
            pass
        return self.response


_STREAM_FAILED = {"error": {"message": "the request could not be completed on any replica",
                            "type": "ServiceUnavailableError", "code": 503}}


def _error_event(resp: web.Response) -> dict[str, Any]:
    """An engine's error answer as an in-stream error event (vLLM's shape: {"error": {...}})."""
    try:
        body = orjson.loads(resp.body)  # type: ignore[arg-type]
    except (orjson.JSONDecodeError, TypeError):
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return {"error": body["error"]}
    return {"error": {"message": f"an engine answered HTTP {resp.status}", "type": "BadRequestError",
                      "code": resp.status}}


def _fold_usage(rec: UsageRecord, parts: list[UsageRecord], seqs: list[fanout.Sequence]) -> None:
    """A split request's record from its sequences' records: each prompt counted once, every output."""
    prompts: dict[int, int] = {}
    for r, q in zip(parts, seqs, strict=True):
        prompts[q.prompt] = max(prompts.get(q.prompt, 0), r.prompt_tokens)
        rec.output_tokens += r.output_tokens
        rec.replicas += r.replicas
        rec.migrations += r.migrations
        rec.prefill_retries += r.prefill_retries
        rec.prefill_replica = rec.prefill_replica or r.prefill_replica
        rec.decode_replica = rec.decode_replica or r.decode_replica
        if r.first_token_at is not None and (rec.first_token_at is None or r.first_token_at < rec.first_token_at):
            rec.first_token_at = r.first_token_at
    rec.prompt_tokens = sum(prompts.values())


class _Upstream(Exception):
    """An engine failed (connection lost or 5xx): try another replica."""


class _Compiled:
    """A routing table plus its picker; replaced whole, never mutated except the picker's counters."""

    def __init__(self, table: RoutingTable) -> None:
        self.table = table
        self.picker = Picker([(r.prefill, r.decode, r.fraction) for r in table.routes])


CHARS_PER_TOKEN = 4  # sizes token-id prompts like text (a rough English average; only ratios matter)


def prompt_size(body: dict[str, Any]) -> int:
    """How much prefill work a request brings, in characters (token ids count CHARS_PER_TOKEN each): the
    completions API's `prompt` (text, token ids, or lists of either) or the chat API's message texts. Cheap
    and tokenizer-free: the picker only compares prompts with each other (`serve.pick.PromptWeights`)."""
    def size(x: Any, depth: int) -> int:
        if isinstance(x, str):
            return len(x)
        if isinstance(x, int):
            return CHARS_PER_TOKEN
        if depth >= 4:  # messages -> message -> content parts -> part: nothing real nests deeper
            return 0
        if isinstance(x, list):
            if x and isinstance(x[0], int):  # token ids: no walk over a long prompt on the hot path
                return CHARS_PER_TOKEN * len(x)
            return sum(size(v, depth + 1) for v in x)
        if isinstance(x, dict):  # a chat message or one of its content parts
            return size(x.get("content"), depth + 1) + size(x.get("text"), depth + 1)
        return 0

    return size(body.get("messages"), 0) + size(body.get("prompt"), 0)


def _error(status: int, message: str, type_: str, param: str | None = None,
           headers: dict[str, str] | None = None) -> web.Response:
    body = {"error": {"message": message, "type": type_, "param": param, "code": status}}
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json", headers=headers)


class Router:
    """The router's state and aiohttp handlers. `app()` builds the web application."""

    def __init__(self, table: RoutingTable, config: RouterConfig) -> None:
        if not config.api_key:
            raise RoutingError("the router needs an API key; set THUNDEROPS_API_KEY or pass --api-key")
        self.config = config
        self._rt = _Compiled(table)
        self._auth = f"Bearer {config.api_key}".encode()
        self._admin = f"Bearer {config.admin_key or config.api_key}".encode()
        self._engine_headers = {"Content-Type": "application/json"}
        if config.engine_api_key:
            self._engine_headers["Authorization"] = f"Bearer {config.engine_api_key}"
        self.models = list(dict.fromkeys(config.served_models))
        # any catalog name of the model (llama-30b, LLaMA-30B, huggyllama/llama-30b) is accepted and sent to the
        # engines as their first served name: vLLM answers only to its --served-model-name list
        self.aliases = {k: self.models[0] for n in self.models for k in (norm(n), *model_keys(n))} if self.models else {}
        self.inflight: dict[str, int] = {}  # requests in flight per replica (the metric)
        self.load: dict[str, float] = {}  # the same in request-equivalents (what the picker steers by)
        self.weights = PromptWeights()
        self.healthy: dict[str, bool] = {}
        self._sync_replicas(table)
        self.session: aiohttp.ClientSession | None = None  # health probes only
        self._pools: dict[str, UpstreamPool] = {}
        self._probe_task: asyncio.Task[None] | None = None
        self._flows = itertools.count()  # request ids of engine flows (X-Request-Id on both legs)
        # usage and metrics, kept as plain numbers (Prometheus reads them at scrape time)
        self.usage: deque[UsageRecord] = deque(maxlen=config.usage_history)
        self.totals = {"requests": 0, "prompt_tokens": 0, "output_tokens": 0, "migrations": 0, "prefill_retries": 0}
        self.by_status: dict[int, int] = {}
        self.by_replica: dict[str, dict[str, int]] = {}
        self.latency_buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0

    # ---- routing ---------------------------------------------------------------------------------------

    @property
    def table(self) -> RoutingTable:
        return self._rt.table

    def set_routing(self, table: RoutingTable) -> None:
        """Swap in a new routing table. Requests in flight finish on the replicas they hold; new picks
        (including retries and migrations) use the new table."""
        compiled = _Compiled(table)
        self._sync_replicas(table)
        self._rt = compiled  # one reference assignment: atomic for every coroutine on this loop

    def _sync_replicas(self, table: RoutingTable) -> None:
        for rid in table.replicas:
            self.inflight.setdefault(rid, 0)
            self.load.setdefault(rid, 0.0)
            self.healthy.setdefault(rid, True)

    def pick(self, exclude: set[str] | frozenset[str] = frozenset()) -> tuple[Route, Replica, Replica]:
        """The next (prefill, decode) pair among healthy, not excluded replicas (`serve.pick.Picker`: smooth
        weighted round robin over the plan's fractions, steered by each replica's in-flight load in its role)."""
        rt = self._rt
        k = rt.picker.pick(self.load, healthy=self.healthy, exclude=exclude)
        if k < 0:
            raise _NoReplica()
        r = rt.table.routes[k]
        reps = rt.table.replicas
        return r, reps[r.prefill], reps[r.decode]

    # ---- app -------------------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_post("/admin/routing", self._set_routing)
        app.router.add_get("/admin/routing", self._get_routing)
        app.router.add_get("/admin/usage", self._usage)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return app

    async def _start(self, app: web.Application) -> None:
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60, ttl_dns_cache=300)
        self.session = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=self.config.request_timeout_s, connect=5),
            skip_auto_headers=("User-Agent",), json_serialize=lambda o: orjson.dumps(o).decode())
        if self.config.health_interval_s > 0:
            self._probe_task = asyncio.create_task(self._probe_loop())

    async def _stop(self, app: web.Application) -> None:
        if self._probe_task:
            self._probe_task.cancel()
        if self.session:
            await self.session.close()
        for pool in self._pools.values():
            pool.close()

    def _pool(self, rep: Replica) -> UpstreamPool:
        pool = self._pools.get(rep.url)
        if pool is None:
            extra = {"Authorization": self._engine_headers["Authorization"]} if "Authorization" in self._engine_headers else {}
            pool = self._pools[rep.url] = UpstreamPool(rep.url, extra, ssl=self.config.engine_tls)
        return pool

    async def _probe_loop(self) -> None:
        """Mark replicas healthy or not by their /health endpoint (vLLM and the emulator both have one).
        A replica is marked down after `probe_failures` failed probes in a row (one slow answer on a busy
        machine is not a death); a refused connection during a request marks it down at once."""
        timeout = aiohttp.ClientTimeout(total=max(2.0, self.config.health_interval_s))
        failures: dict[str, int] = {}
        while True:
            reps = list(self._rt.table.replicas.values())

            async def probe(rep: Replica) -> None:
                try:
                    assert self.session is not None
                    tls = self.config.engine_tls if rep.url.startswith("https:") else None
                    async with self.session.get(rep.url + "/health", timeout=timeout, ssl=tls or True) as r:
                        ok = r.status == 200
                except (TimeoutError, aiohttp.ClientError, OSError):
                    ok = False
                failures[rep.id] = 0 if ok else failures.get(rep.id, 0) + 1
                if ok:
                    self.healthy[rep.id] = True
                elif failures[rep.id] >= self.config.probe_failures:
                    self.healthy[rep.id] = False

            await asyncio.gather(*(probe(r) for r in reps))
            await asyncio.sleep(self.config.health_interval_s)

    def _authorized(self, request: web.Request, key: bytes) -> bool:
        got = request.headers.get("Authorization", "").encode()
        return hmac.compare_digest(got, key)

    async def _health(self, request: web.Request) -> web.Response:
        up = [rid for rid in self._rt.table.replicas if self.healthy.get(rid)]
        status = 200 if any(r.fraction > 0 and self.healthy.get(r.prefill) and self.healthy.get(r.decode)
                                for r in self._rt.table.routes) else 503
        return web.Response(status=status, body=orjson.dumps({"healthy_replicas": up, "routing_version": self.table.version}),
                            content_type="application/json")

    async def _models(self, request: web.Request) -> web.Response:
        if not self._authorized(request, self._auth):
            return _error(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", "AuthenticationError")
        data = [{"id": m, "object": "model", "owned_by": "thunderops", "max_model_len": self.config.max_model_len}
                for m in self.models]
        return web.Response(body=orjson.dumps({"object": "list", "data": data}), content_type="application/json")

    async def _set_routing(self, request: web.Request) -> web.Response:
        if not self._authorized(request, self._admin):
            return _error(401, "missing or wrong admin key", "AuthenticationError")
        try:
            table = RoutingTable.from_dict(orjson.loads(await request.read()))
        except orjson.JSONDecodeError as e:
            return _error(400, f"malformed JSON: {e}", "BadRequestError")
        except RoutingError as e:
            return _error(400, str(e), "BadRequestError")
        self.set_routing(table)
        return web.Response(body=orjson.dumps({"version": table.version}), content_type="application/json")

    async def _get_routing(self, request: web.Request) -> web.Response:
        if not self._authorized(request, self._admin):
            return _error(401, "missing or wrong admin key", "AuthenticationError")
        return web.Response(body=orjson.dumps(self.table.to_dict()), content_type="application/json")

    async def _usage(self, request: web.Request) -> web.Response:
        if not self._authorized(request, self._admin):
            return _error(401, "missing or wrong admin key", "AuthenticationError")
        try:
            limit = int(request.query.get("records", "0"))
        except ValueError:
            return _error(400, "records must be an integer", "BadRequestError", "records")
        records = [asdict(r) for r in list(self.usage)[-limit:]] if limit > 0 else []
        return web.Response(body=orjson.dumps({"totals": self.totals, "by_replica": self.by_replica,
                                               "records": records}), content_type="application/json")

    async def _metrics(self, request: web.Request) -> web.Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return web.Response(body=generate_latest(_Collector(self)), headers={"Content-Type": CONTENT_TYPE_LATEST})

    # ---- the P/D flow ----------------------------------------------------------------------------------

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, "/v1/completions")

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, "/v1/chat/completions")

    async def _handle(self, request: web.Request, path: str) -> web.StreamResponse:
        if not self._authorized(request, self._auth):
            return _error(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", "AuthenticationError")
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError as e:
            return _error(400, f"malformed JSON body: {e}", "BadRequestError")
        if not isinstance(body, dict):
            return _error(400, "request body must be a JSON object", "BadRequestError")
        model = body.get("model")
        if model not in self.models:
            canonical = self.aliases.get(norm(model)) if isinstance(model, str) else None
            if canonical is None:
                return _error(404, f"The model `{model}` does not exist. Served: {', '.join(self.models)}",
                              "NotFoundError", "model")
            body["model"] = model = canonical
        prompt = body.get("prompt")
        mml = self.config.max_model_len
        if mml and isinstance(prompt, list) and prompt and isinstance(prompt[0], int) and len(prompt) >= mml:
            return _error(400, f"This model's maximum context length is {mml} tokens; the prompt has {len(prompt)}",
                          "BadRequestError", "prompt")
        rec = UsageRecord(f"req-{uuid.uuid4().hex[:16]}", model, path, bool(body.get("stream")),
                          started_at=time.time())
        t0 = time.perf_counter()
        try:
            seqs = fanout.split(body, chat=path.endswith("chat/completions"))
        except fanout.SplitError as e:
            return _error(400, str(e), "BadRequestError", e.param)
        try:
            if seqs is not None:
                resp = await self._split(request, path, body, seqs, rec)
            elif rec.stream:
                out = _ClientStream(request)
                resp = await self._stream(out, path, body, rec, self.weights.weight(prompt_size(body)))
                resp = resp or await out.close()
            else:
                resp = await self._unary(path, body, rec, self.weights.weight(prompt_size(body)))
        except _ClientGone:  # the tokens already sent stay on the record: they were generated and delivered
            resp = request.get("thunderops_stream") or web.Response(status=499)
            rec.status = 499  # nginx's "client closed request"
        except _NoReplica:
            resp = _error(503, "no healthy replica can serve this request now; retry shortly",
                          "ServiceUnavailableError", headers={"Retry-After": str(self.config.retry_after_s)})
        rec.status = rec.status or resp.status
        rec.finished_at = time.time()
        self._record(rec, time.perf_counter() - t0)
        return resp

    async def _split(self, request: web.Request, path: str, body: dict[str, Any], seqs: list[fanout.Sequence],
                     rec: UsageRecord) -> web.StreamResponse:
        """Serve a request for several sequences as one engine request per sequence (`serve.fanout`), all at
        once, and merge their answers. Any sequence that finds no replica fails the request (503), as does a
        client error from an engine before anything was streamed (passed through as is)."""
        parts = [UsageRecord(rec.request_id, rec.model, path, rec.stream) for _ in seqs]
        weights = [self.weights.weight(prompt_size(q.body)) for q in seqs]
        try:
            if not rec.stream:
                answers = await asyncio.gather(*(self._unary(path, q.body, r, w)
                                                 for q, r, w in zip(seqs, parts, weights, strict=True)),
                                               return_exceptions=True)  # all end before the record is made
                for a in answers:
                    if isinstance(a, BaseException):
                        raise a
                failed = next((a for a in answers if a.status != 200), None)
                if failed is not None:
                    return failed
                merged = fanout.merge_answers([orjson.loads(a.body) for a in answers], seqs)
                return web.Response(body=orjson.dumps(merged), content_type="application/json")
            opts = body.get("stream_options") or {}
            client = _ClientStream(request)
            merged_stream = fanout.MergedStream(client, want_usage=bool(opts.get("include_usage")))
            # each sequence reports its final usage to the merge, which sends the total once
            sub_opts = {"include_usage": True, "continuous_usage_stats": bool(opts.get("continuous_usage_stats"))}
            ends = await asyncio.gather(*(self._stream(merged_stream.part(q), path, {**q.body, "stream_options": sub_opts},
                                                       r, w) for q, r, w in zip(seqs, parts, weights, strict=True)),
                                        return_exceptions=True)
            gone = next((e for e in ends if isinstance(e, _ClientGone)), None)
            if gone is not None:
                raise gone
            if not client.opened:
                for e in ends:
                    if isinstance(e, BaseException):
                        raise e
                return next(e for e in ends if e is not None)
            for e in ends:  # a sequence that failed while the others streamed: the client is told in-stream
                if e is None:
                    continue
                if not isinstance(e, (web.Response, _NoReplica)):
                    log.error("a sequence of %s failed: %r", rec.request_id, e)
                await client.emit(_error_event(e) if isinstance(e, web.Response) else _STREAM_FAILED)
                break
            await merged_stream.finish()
            return await client.close()
        finally:
            _fold_usage(rec, parts, seqs)

    def _hold(self, rid: str, requests: int, load: float) -> None:
        self.inflight[rid] = self.inflight.get(rid, 0) + requests
        self.load[rid] = self.load.get(rid, 0.0) + load

    async def _post(self, rep: Replica, path: str, body: dict[str, Any], weight: float, flow: str) -> tuple[int, bytes]:
        """POST to an engine as request `flow`, holding `weight` of load there meanwhile; connection failures and
        5xx raise _Upstream (and mark it unhealthy if unreachable)."""
        self._hold(rep.id, 1, weight)
        try:
            async with asyncio.timeout(self.config.request_timeout_s):  # no extra task, unlike wait_for
                status, data = await self._pool(rep).request("POST", path, orjson.dumps(body), flow)
        except (TimeoutError, UpstreamError, OSError) as e:
            self.healthy[rep.id] = False
            raise _Upstream(f"{rep.id}: {e}") from None
        finally:
            self._hold(rep.id, -1, -weight)
        if status >= 500:
            raise _Upstream(f"{rep.id}: HTTP {status}")
        return status, data

    async def _prefill(self, rep: Replica, path: str, body: dict[str, Any], weight: float,
                       flow: str) -> tuple[int, bytes, Any]:
        pb = dict(body)
        pb["kv_transfer_params"] = _PREFILL_KV
        pb["stream"] = False
        pb["max_tokens"] = 1
        if "max_completion_tokens" in pb:
            pb["max_completion_tokens"] = 1
        for k in ("stream_options", "min_tokens", "min_completion_tokens"):
            pb.pop(k, None)
        status, data = await self._post(rep, path, pb, weight, flow)
        if status != 200:
            return status, data, None
        try:
            return status, data, orjson.loads(data).get("kv_transfer_params")
        except (orjson.JSONDecodeError, AttributeError):
            raise _Upstream(f"{rep.id}: prefill answer is not a JSON object") from None

    async def _prepare(self, path: str, body: dict[str, Any], rec: UsageRecord, exclude: set[str],
                       weight: float) -> tuple[Replica, dict[str, Any] | web.Response, float, str]:
        """Pick a pair and run the prefill leg (retrying other prefill replicas), the prompt weighing `weight`
        there. Returns the decode replica, the decode request body (or an engine's client-error response to
        pass through), what the request weighs at the decode replica until its first token (the prompt's
        weight where that replica also prefills it (colocated), else 1) and the flow's request id, which both
        legs carry as X-Request-Id: NIXL's push mode pairs them by it."""
        while True:
            route, prep, drep = self.pick(exclude)
            flow = f"{rec.request_id}-{next(self._flows)}"
            if route.prefill == route.decode:  # colocated: one engine does both
                return drep, body, weight, flow
            try:
                status, data, kv = await self._prefill(prep, path, body, weight, flow)
            except _Upstream:
                exclude.add(prep.id)
                rec.prefill_retries += 1
                continue
            rec.prefill_replica = prep.id
            rec.replicas.append(prep.id)
            if status != 200:
                return drep, web.Response(status=status, body=data, content_type="application/json"), 1.0, flow
            db = dict(body)
            if kv:
                db["kv_transfer_params"] = kv
            return drep, db, 1.0, flow

    async def _unary(self, path: str, body: dict[str, Any], rec: UsageRecord, weight: float) -> web.Response:
        exclude: set[str] = set()
        for _ in range(self.config.max_attempts):
            drep, db, held, flow = await self._prepare(path, body, rec, exclude, weight)
            if isinstance(db, web.Response):
                return db
            try:
                status, data = await self._post(drep, path, db, held, flow)
            except _Upstream:
                exclude.add(drep.id)
                continue
            rec.decode_replica = drep.id
            rec.replicas.append(drep.id)
            if status == 200:
                usage = orjson.loads(data).get("usage") or {}
                rec.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                rec.output_tokens = int(usage.get("completion_tokens") or 0)
                rec.first_token_at = time.time()
            return web.Response(status=status, body=data, content_type="application/json")
        raise _NoReplica()

    async def _stream(self, out: ChunkSink, path: str, body: dict[str, Any], rec: UsageRecord,
                      weight: float) -> web.StreamResponse | None:
        """Stream one sequence's answer into `out`. Returns an engine's error answer when it came before
        anything was streamed (for the caller to send instead), else None once the stream has ended."""
        chat = path.endswith("chat/completions")
        opts = body.get("stream_options") or {}
        want_usage = bool(opts.get("include_usage"))
        want_cont = want_usage and bool(opts.get("continuous_usage_stats"))
        sent: list[str] = []  # text already forwarded to the client
        sent_tokens = 0
        prompt_tokens: int | None = None
        ident: tuple[Any, Any] | None = None  # (id, created) of the first stream, kept across migrations
        exclude: set[str] = set()
        cur = body
        for _attempt in range(self.config.max_attempts + 1):
            try:
                drep, db, held, flow = await self._prepare(path, cur, rec, exclude, weight)
            except _NoReplica:
                if not out.opened:
                    raise
                break
            if isinstance(db, web.Response):
                if not out.opened:
                    return db
                break
            db = dict(db)
            db["stream"] = True
            db["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
            offset = sent_tokens
            migrated = offset > 0 or bool(sent)
            self._hold(drep.id, 1, held)
            done = False
            up = None
            try:
                up = await self._pool(drep).stream("POST", path, orjson.dumps(db), flow)
                if up.status != 200:
                    data = await up.read()
                    if up.status >= 500:
                        raise _Upstream(f"{drep.id}: HTTP {up.status}")
                    if not out.opened:
                        return web.Response(status=up.status, body=data, content_type="application/json")
                    break
                rec.decode_replica = drep.id
                rec.replicas.append(drep.id)
                await out.open()
                buf = b""
                async for piece in up:
                    buf += piece
                    *lines, buf = buf.split(b"\n")
                    for line in lines:
                        if not line.startswith(b"data: "):
                            continue
                        payload = line[6:].strip()
                        if payload == b"[DONE]":
                            done = True
                            break
                        chunk = orjson.loads(payload)
                        usage = chunk.get("usage")
                        if usage:
                            if prompt_tokens is None:
                                prompt_tokens = rec.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                            n = offset + int(usage.get("completion_tokens") or 0)
                            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n,
                                     "total_tokens": prompt_tokens + n}
                            chunk["usage"] = usage
                        choices = chunk.get("choices") or []
                        if ident is None:
                            ident = (chunk.get("id"), chunk.get("created"))
                        else:
                            chunk["id"], chunk["created"] = ident
                        if choices:
                            if held != 1.0:  # a colocated replica's prefill is over: the request streams now
                                self._hold(drep.id, 0, 1.0 - held)
                                held = 1.0
                            c0 = choices[0]
                            delta = c0.get("delta") or {}
                            piece_text = delta.get("content") if chat else c0.get("text")
                            if migrated and chat and "role" in delta and not piece_text:
                                continue  # the continuation's opening role chunk: the client already had one
                            if piece_text:
                                sent.append(piece_text)
                                if rec.first_token_at is None:
                                    rec.first_token_at = time.time()
                            if usage:
                                sent_tokens = rec.output_tokens = usage["completion_tokens"]
                            if not want_cont:
                                chunk.pop("usage", None)
                        else:  # the final usage-only chunk
                            if usage:
                                sent_tokens = usage["completion_tokens"]
                            if not want_usage:
                                continue
                        await out.emit(chunk)
                    if done:
                        try:
                            await asyncio.wait_for(up.drain(), 1.0)
                        except (TimeoutError, UpstreamError):
                            pass
                        break
            except (TimeoutError, UpstreamError, OSError, _Upstream) as e:
                log.warning("decode replica %s failed mid-stream (%s); migrating", drep.id, e)
                if not isinstance(e, _Upstream):
                    self.healthy[drep.id] = False
            finally:
                self._hold(drep.id, -1, -held)
                if up is not None:
                    up.close()
            if done:
                break
            # the decode engine died (or ended without [DONE]): continue elsewhere from prompt + text sent
            exclude.add(drep.id)
            if sent or sent_tokens:
                rec.migrations += 1
            cur = self._continuation(body, "".join(sent), sent_tokens, chat)
            if cur is None:
                break
        assert out.opened
        if not done:
            await out.emit(_STREAM_FAILED)
        rec.prompt_tokens = prompt_tokens or 0
        rec.output_tokens = sent_tokens
        return None

    @staticmethod
    def _continuation(body: dict[str, Any], text: str, tokens: int, chat: bool) -> dict[str, Any] | None:
        """The request that continues `body` after `text` (`tokens` tokens) was generated, or None if nothing is left."""
        cont = dict(body)
        for key in ("max_tokens", "max_completion_tokens"):
            if isinstance(body.get(key), int):
                if body[key] - tokens <= 0:
                    return None
                cont[key] = body[key] - tokens
        if not text:
            return cont
        if chat:
            cont["messages"] = [*body["messages"], {"role": "assistant", "content": text}]
            cont["add_generation_prompt"] = False
            cont["continue_final_message"] = True
        elif isinstance(body.get("prompt"), str):
            cont["prompt"] = body["prompt"] + text
        else:
            return None  # token-id prompts cannot be extended with text; the stream ends with an error event
        return cont

    def _record(self, rec: UsageRecord, seconds: float) -> None:
        t = self.totals
        t["requests"] += 1
        t["prompt_tokens"] += rec.prompt_tokens
        t["output_tokens"] += rec.output_tokens
        t["migrations"] += rec.migrations
        t["prefill_retries"] += rec.prefill_retries
        self.by_status[rec.status] = self.by_status.get(rec.status, 0) + 1
        for rid, key in ((rec.prefill_replica, "prefill_requests"), (rec.decode_replica, "decode_requests")):
            if rid is not None:
                per = self.by_replica.setdefault(rid, {"prefill_requests": 0, "decode_requests": 0})
                per[key] += 1
        self.latency_buckets[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.latency_sum += seconds
        self.usage.append(rec)
        if self.config.usage_sink is not None:
            try:
                self.config.usage_sink(rec)
            except Exception:  # a broken sink must not fail requests; the record stays in memory
                log.exception("usage sink failed for %s", rec.request_id)


class _Collector:
    """Prometheus exposition of the router's plain counters (read at scrape time, nothing on the hot path)."""

    def __init__(self, router: Router) -> None:
        self.r = router

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        r = self.r
        req = CounterMetricFamily("thunderops_router_requests", "Requests finished, by HTTP status", labels=["status"])
        for status, n in sorted(r.by_status.items()):
            req.add_metric([str(status)], n)
        yield req
        for key, help_ in (("prompt_tokens", "Prompt tokens served"), ("output_tokens", "Output tokens generated"),
                           ("migrations", "Streams continued on another decode replica"),
                           ("prefill_retries", "Prefill legs retried on another replica")):
            yield CounterMetricFamily(f"thunderops_router_{key}", help_, value=r.totals[key])
        inflight = GaugeMetricFamily("thunderops_replica_inflight", "Requests in flight per replica", labels=["replica"])
        load = GaugeMetricFamily("thunderops_replica_load", "Load in flight per replica in request-equivalents "
                                 "(a prompt in prefill weighs its size over the mean prompt's): what routing steers by",
                                 labels=["replica"])
        healthy = GaugeMetricFamily("thunderops_replica_healthy", "1 if the replica answers /health", labels=["replica"])
        for rid in r.table.replicas:
            inflight.add_metric([rid], r.inflight.get(rid, 0))
            load.add_metric([rid], r.load.get(rid, 0.0))
            healthy.add_metric([rid], 1 if r.healthy.get(rid) else 0)
        yield inflight
        yield load
        yield healthy
        yield GaugeMetricFamily("thunderops_routing_version", "Version of the routing table in use", value=r.table.version)
        cum, buckets = 0, []
        for le, n in zip((*map(str, LATENCY_BUCKETS), "+Inf"), r.latency_buckets, strict=True):
            cum += n
            buckets.append((le, cum))
        yield HistogramMetricFamily("thunderops_router_request_seconds", "Request latency through the router",
                                    buckets=buckets, sum_value=r.latency_sum)


def run_router(table: RoutingTable, config: RouterConfig, host: str = "127.0.0.1", port: int = 8000,
               tls: ssl.SSLContext | None = None) -> None:
    """Serve the router until interrupted; over HTTPS with the server context `tls`
    (`thunderops.agent.server_tls_files`)."""
    from thunderops.serve.emulator import use_uvloop

    use_uvloop()
    app = Router(table, config).app()
    close = getattr(config.usage_sink, "close", None)
    if close is not None:
        async def _close(_app: web.Application) -> None:
            close()

        app.on_cleanup.append(_close)
    web.run_app(app, host=host, port=port, print=None, access_log=None, ssl_context=tls)


class StoreUsageSink:
    """A usage sink that appends records to the state store's usage table in batches, from a background
    thread, so SQLite writes never block the router's event loop. `close()` flushes what is left."""

    def __init__(self, deployment: str, db_path: str | None = None, flush_interval_s: float = 1.0) -> None:
        import threading

        from thunderops.state import Store

        self.store = Store(db_path)
        self.deployment = deployment
        self.interval = flush_interval_s
        self._buf: list[UsageRecord] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="usage-sink", daemon=True)
        self._thread.start()

    def __call__(self, rec: UsageRecord) -> None:
        with self._lock:
            self._buf.append(rec)

    def flush(self) -> int:
        from datetime import UTC, datetime

        with self._lock:
            batch, self._buf = self._buf, []
        if not batch:
            return 0
        rows = [{"ts": datetime.fromtimestamp(r.finished_at or r.started_at, UTC).isoformat(timespec="microseconds"),
                 "prompt_tokens": r.prompt_tokens, "output_tokens": r.output_tokens,
                 "prefill": r.prefill_replica or "", "decode": r.decode_replica or ""} for r in batch]
        try:
            return self.store.record_usage(self.deployment, rows)
        except Exception:
            with self._lock:  # keep them for the next try: usage is money
                self._buf[:0] = batch
            log.exception("could not write %d usage rows", len(batch))
            return 0

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.flush()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.flush()
