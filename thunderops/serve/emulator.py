"""The engine emulator: a double for one vLLM engine (the GPU boundary), speaking vLLM's OpenAI HTTP API and
its prefill/decode (NIXL) protocol, so a whole deployment can serve real HTTP traffic on one machine.

- Prefill role: a request with ``kv_transfer_params={"do_remote_decode": true}`` returns one token plus
  ``kv_transfer_params`` shaped like NixlConnector's (``do_remote_prefill``, ``remote_block_ids`` for the
  prompt's KV blocks, ``remote_engine_id``, host, port, ``tp_size``).
- Decode role: a request must carry such params, with as many blocks as its prompt needs; otherwise 400.
- Timing comes from a ``Timing`` (the performance model for the group's GPU type and parallelism, see
  ``perf_timing``); prefills are batched and decode steps run with continuous batching. ``speedup`` runs
  emulated time faster; ``delay_scale=0`` (or no timing) answers at once, for benchmarks.

Tokens are counted with a fixed rule (``count_tokens``: words and punctuation marks) and generated text is
deterministic filler that depends only on the context position, so a request continued from its prompt plus
the text already produced (request migration) yields exactly the text an uninterrupted one would.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import math
import os
import re
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson
from aiohttp import web

from thunderops.specs import get_gpu, served_names

BLOCK_SIZE = 16  # vLLM's default KV block size (tokens per block)
CHAT_MESSAGE_OVERHEAD = 3  # template tokens per chat message, and for the generation prompt
_TOKEN_RE = re.compile(r"\w+|[^\w\s]")
_FILLER = (
    "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches near "
    "the old harbor and every sailor counts stars until morning light returns"
).split()


def count_tokens(text: str) -> int:
    """The emulator's tokenizer: one token per word or punctuation mark."""
    return len(_TOKEN_RE.findall(text))


def filler(start: int, n: int) -> list[str]:
    """Output tokens for context positions start..start+n-1 (each one word with a leading space)."""
    return [" " + _FILLER[p % len(_FILLER)] for p in range(start, start + n)]


class Timing(Protocol):
    """Seconds of engine time; the performance model provides these for a group's GPU and layout."""

    def prefill_time(self, prompt_lens: list[int]) -> float: ...

    def decode_step_time(self, batch: int, total_context: int) -> float: ...


@dataclass
class ZeroTiming:
    """No delay at all (benchmarks, and the default until a performance model is given)."""

    def prefill_time(self, prompt_lens: list[int]) -> float:
        return 0.0

    def decode_step_time(self, batch: int, total_context: int) -> float:
        return 0.0


@dataclass
class FixedTiming:
    """Linear costs, handy for tests: per prefill token and per decode step."""

    per_prefill_token_s: float = 0.0
    per_decode_step_s: float = 0.0

    def prefill_time(self, prompt_lens: list[int]) -> float:
        return self.per_prefill_token_s * sum(prompt_lens)

    def decode_step_time(self, batch: int, total_context: int) -> float:
        return self.per_decode_step_s


def perf_timing(model: str, gpu: str, tp: int = 1, pp: int = 1, layout: Any = None) -> Timing:
    """Timing from the performance model (thunderops.perf.PerfModel) for one group's GPU type and parallelism:
    `layout` when given (perf.layout_of(plan, group)), else `pp` equal stages of `tp` GPUs of type `gpu`."""
    from thunderops import perf

    pm = perf.PerfModel(model)
    if layout is None:
        layers = pm.model.layers
        sizes = [layers // pp + (1 if i < layers % pp else 0) for i in range(pp)]
        layout = perf.Layout(tuple(perf.StageLayout(get_gpu(gpu), tp, n) for n in sizes))
    return PerfTiming(pm, layout)


@dataclass
class PerfTiming:
    """Engine time of one layout from the performance model."""

    model: Any  # thunderops.perf.PerfModel
    layout: Any  # thunderops.perf.Layout

    def prefill_time(self, prompt_lens: list[int]) -> float:
        return float(self.model.prefill_time(self.layout, prompt_lens))

    def decode_step_time(self, batch: int, total_context: int) -> float:
        return float(self.model.decode_step_time(self.layout, batch, total_context))


@dataclass
class EmulatorConfig:
    model: str = "emulated-model"
    served_names: list[str] = field(default_factory=list)
    role: str = "both"  # prefill, decode or both (colocated)
    max_model_len: int = 4096
    host: str = "127.0.0.1"
    port: int = 8100
    api_key: str | None = None
    engine_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    tp: int = 1
    speedup: float = 1.0
    delay_scale: float = 1.0
    default_max_tokens: int = 16
    max_num_seqs: int = 256
    ssl_files: tuple[str, str] | None = None  # (certificate, key) PEM files: serve HTTPS, as vLLM's --ssl-*file


class _Seq:
    __slots__ = ("pos", "remaining", "queue")

    def __init__(self, pos: int, remaining: int) -> None:
        self.pos = pos
        self.remaining = remaining
        self.queue: asyncio.Queue[int] = asyncio.Queue()


class Engine:
    """Emulated engine time: batched prefills, then continuous-batching decode steps."""

    def __init__(self, timing: Timing, scale: float, max_num_seqs: int = 256) -> None:
        self.timing = timing
        self.scale = scale  # delay_scale / speedup
        self.max_num_seqs = max_num_seqs  # vLLM's cap on sequences per decode step; the rest wait
        self.prefill_wait: list[tuple[int, asyncio.Future[None]]] = []
        self.running: list[_Seq] = []
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.instant = scale == 0 or isinstance(timing, ZeroTiming)

    async def prefill(self, prompt_len: int) -> None:
        if self.instant:
            return
        fut = asyncio.get_running_loop().create_future()
        self.prefill_wait.append((prompt_len, fut))
        self.wake.set()
        await fut

    def decode(self, pos: int, n: int, from_prefill: bool = False) -> _Seq:
        """Generate n tokens after context position pos. A prefill-only request's one token comes out of the
        prefill pass itself (no decode step)."""
        seq = _Seq(pos, n)
        if self.instant or from_prefill:
            for _ in range(n):
                seq.queue.put_nowait(1)
            return seq
        self.running.append(seq)
        self.wake.set()
        return seq

    async def run(self) -> None:
        while True:
            if not self.prefill_wait and not self.running:
                self.wake.clear()
                await self.wake.wait()
            if self.prefill_wait:  # prefill first, as vLLM's scheduler admits waiting prompts first
                batch, self.prefill_wait = self.prefill_wait, []
                await asyncio.sleep(self.timing.prefill_time([n for n, _ in batch]) * self.scale)
                for _, fut in batch:
                    if not fut.done():
                        fut.set_result(None)
                continue
            seqs = self.running[: self.max_num_seqs]  # a copy: sequences joining during this step wait
            dt = self.timing.decode_step_time(len(seqs), sum(s.pos for s in seqs)) * self.scale
            await asyncio.sleep(dt)
            for s in seqs:
                s.pos += 1
                s.remaining -= 1
                s.queue.put_nowait(1)
            done = {id(s) for s in seqs if s.remaining <= 0}
            self.running = [s for s in self.running if id(s) not in done]


def _error(status: int, message: str, type_: str = "BadRequestError", param: str | None = None) -> web.Response:
    body = {"error": {"message": message, "type": type_, "param": param, "code": status}}
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400, type_: str = "BadRequestError") -> None:
        super().__init__(message)
        self.status = status
        self.type_ = type_


def _chat_prompt_tokens(messages: Any, add_generation_prompt: bool) -> int:
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list")
    n = 0
    for m in messages:
        if not isinstance(m, dict):
            raise BadRequest("each message must be an object with 'role' and 'content'")
        content = m.get("content") or ""
        if isinstance(content, list):  # OpenAI content parts
            content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
        n += count_tokens(str(content)) + CHAT_MESSAGE_OVERHEAD
    if add_generation_prompt:
        n += CHAT_MESSAGE_OVERHEAD
    return n


class Emulator:
    """One emulated engine: an aiohttp app over an `Engine`."""

    def __init__(self, config: EmulatorConfig, timing: Timing | None = None) -> None:
        self.config = config
        scale = 0.0 if config.delay_scale == 0 else config.delay_scale / max(config.speedup, 1e-9)
        self.engine = Engine(timing or ZeroTiming(), scale, config.max_num_seqs)
        self.names = {n for m in (config.model, *config.served_names) for n in served_names(m)}
        self._ids = itertools.count()
        self.requests = 0
        self.rejected_kv = 0
        self._auth = f"Bearer {config.api_key}".encode() if config.api_key else None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return app

    async def _start(self, app: web.Application) -> None:
        if not self.engine.instant:
            self.engine.task = asyncio.create_task(self.engine.run())

    async def _stop(self, app: web.Application) -> None:
        if self.engine.task:
            self.engine.task.cancel()

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="")

    async def metrics(self, request: web.Request) -> web.Response:
        lines = [
            f"emulator_requests_total {self.requests}",
            f"emulator_rejected_kv_total {self.rejected_kv}",
            f"emulator_running {len(self.engine.running)}",
        ]
        return web.Response(text="\n".join(lines) + "\n")

    async def models(self, request: web.Request) -> web.Response:
        data = [{"id": n, "object": "model", "owned_by": "thunderops-emulator", "max_model_len": self.config.max_model_len}
                for n in sorted(self.names)]
        return web.Response(body=orjson.dumps({"object": "list", "data": data}), content_type="application/json")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, chat=False)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, chat=True)

    async def _handle(self, request: web.Request, chat: bool) -> web.StreamResponse:
        if self._auth is not None and not hmac.compare_digest(request.headers.get("Authorization", "").encode(), self._auth):
            return _error(401, "Unauthorized", "AuthenticationError")
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError as e:
            return _error(400, f"malformed JSON: {e}")
        if not isinstance(body, dict):
            return _error(400, "request body must be a JSON object")
        self.requests += 1
        try:
            return await self._serve(request, body, chat)
        except BadRequest as e:
            return _error(e.status, str(e), e.type_)

    def _prompt_tokens(self, body: dict[str, Any], chat: bool) -> int:
        if chat:
            if body.get("continue_final_message") and body.get("add_generation_prompt", True):
                raise BadRequest("continue_final_message and add_generation_prompt cannot both be true")
            # a continued final message costs its header like the generation prompt it replaces
            return _chat_prompt_tokens(body.get("messages"), bool(body.get("add_generation_prompt", True)))
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            return count_tokens(prompt)
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            return len(prompt)
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            return count_tokens(prompt[0])
        raise BadRequest("'prompt' must be a string or a list of token ids (one prompt per request)")

    def _check_kv(self, kv: Any, prompt_tokens: int, request_id: str | None) -> None:
        """A decode engine accepts only NIXL-shaped params whose blocks cover this prompt, and (NIXL's push
        mode pairs the two legs by request id) only under the X-Request-Id its prefill leg had."""
        ok = (
            isinstance(kv, dict)
            and kv.get("do_remote_prefill") is True
            and isinstance(kv.get("remote_engine_id"), str)
            and isinstance(kv.get("remote_host"), str)
            and isinstance(kv.get("remote_port"), int)
            and isinstance(kv.get("remote_block_ids"), list)
            and len(kv["remote_block_ids"]) == math.ceil(prompt_tokens / BLOCK_SIZE)
        )
        if not ok:
            self.rejected_kv += 1
            raise BadRequest(
                "decode engine needs kv_transfer_params from a prefill engine for this prompt "
                "(do_remote_prefill, remote_engine_id, remote_host, remote_port, remote_block_ids)"
            )
        prefill_id = kv.get("remote_request_id")
        if isinstance(prefill_id, str) and prefill_id.rpartition("-")[0] != request_id:
            self.rejected_kv += 1
            raise BadRequest(f"X-Request-Id {request_id!r} is not the prefill leg's ({prefill_id!r}): NIXL's push "
                             "mode pairs the legs of one request by it")

    async def _serve(self, request: web.Request, body: dict[str, Any], chat: bool) -> web.StreamResponse:
        cfg = self.config
        model = body.get("model")
        if model not in self.names:
            raise BadRequest(f"The model `{model}` does not exist.", 404, "NotFoundError")
        if body.get("n") not in (None, 1):  # the router sends one sequence per request (serve.fanout)
            raise BadRequest("the emulator serves one sequence per request; send n=1 (the router splits n > 1)")
        prompt_tokens = self._prompt_tokens(body, chat)
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or cfg.default_max_tokens
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise BadRequest("max_tokens must be a positive integer")
        if prompt_tokens + max_tokens > cfg.max_model_len:
            raise BadRequest(
                f"This model's maximum context length is {cfg.max_model_len} tokens. However, you requested "
                f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, {max_tokens} in the completion). "
                "Please reduce the length of the messages or completion."
            )
        kv = body.get("kv_transfer_params")
        request_id = request.headers.get("X-Request-Id")
        remote_decode = isinstance(kv, dict) and kv.get("do_remote_decode") is True
        if remote_decode and cfg.role == "decode":
            raise BadRequest("this is a decode engine; send prefill requests to a prefill engine")
        if not remote_decode and (cfg.role == "decode" or (isinstance(kv, dict) and kv.get("do_remote_prefill"))):
            self._check_kv(kv, prompt_tokens, request_id)  # kv_both engines check params they get, as NIXL would
        elif not remote_decode and cfg.role == "prefill":
            raise BadRequest("this is a prefill engine: requests need kv_transfer_params.do_remote_decode=true")
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{cfg.engine_id}-{next(self._ids)}"
        out_params = None
        if remote_decode:
            max_tokens = 1
            out_params = {
                "do_remote_prefill": True,
                "do_remote_decode": False,
                "remote_block_ids": list(range(math.ceil(prompt_tokens / BLOCK_SIZE))),
                "remote_engine_id": cfg.engine_id,
                # vLLM's request id: the X-Request-Id given, with a random suffix
                "remote_request_id": f"{request_id or rid}-{secrets.token_hex(4)}",
                "remote_host": cfg.host,
                "remote_port": cfg.port + 1000,  # NIXL's side channel, beside the HTTP port
                "tp_size": cfg.tp,
            }
        if not (isinstance(kv, dict) and kv.get("do_remote_prefill")):
            await self.engine.prefill(prompt_tokens)  # remote-prefilled requests skip local prefill
        seq = self.engine.decode(prompt_tokens, max_tokens, from_prefill=remote_decode)
        if body.get("stream"):
            return await self._stream(request, body, chat, rid, seq, prompt_tokens, max_tokens)
        for _ in range(max_tokens):
            await seq.queue.get()
        text = "".join(filler(prompt_tokens, max_tokens))
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": max_tokens,
                 "total_tokens": prompt_tokens + max_tokens}
        choice: dict[str, Any]
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": "length"}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": "length"}
        resp = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": body["model"], "choices": [choice], "usage": usage, "kv_transfer_params": out_params}
        return web.Response(body=orjson.dumps(resp), content_type="application/json")

    async def _stream(self, request: web.Request, body: dict[str, Any], chat: bool, rid: str, seq: _Seq,
                      prompt_tokens: int, max_tokens: int) -> web.StreamResponse:
        opts = body.get("stream_options") or {}
        include_usage = bool(opts.get("include_usage"))
        continuous = include_usage and bool(opts.get("continuous_usage_stats"))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"
        base = {"id": rid, "object": obj, "created": created, "model": body["model"]}

        def usage(n: int) -> dict[str, int]:
            return {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}

        async def send(chunk: dict[str, Any]) -> None:
            await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")

        if chat:
            first = {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                          "logprobs": None, "finish_reason": None}]}
            if continuous:
                first["usage"] = usage(0)
            await send(first)
        for i, word in enumerate(filler(prompt_tokens, max_tokens), start=1):
            await seq.queue.get()
            finish = "length" if i == max_tokens else None
            c = ({"index": 0, "delta": {"content": word}, "logprobs": None, "finish_reason": finish} if chat
                 else {"index": 0, "text": word, "logprobs": None, "finish_reason": finish})
            chunk = {**base, "choices": [c]}
            if continuous:
                chunk["usage"] = usage(i)
            await send(chunk)
        if include_usage:
            await send({**base, "choices": [], "usage": usage(max_tokens)})
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


def use_uvloop() -> None:
    """uvloop's event loop when installed (measured faster for both the router and the emulator)."""
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def run_emulator(config: EmulatorConfig, timing: Timing | None = None, on_ready: Callable[[], None] | None = None,
                 exit_with_pid: int | None = None) -> None:
    """Serve one emulated engine until interrupted (uvloop when installed). With `exit_with_pid`, the emulator
    also ends when that process is gone: an emulator started in its own session by a controller or a test
    would otherwise outlive whatever owned the deployment."""
    use_uvloop()
    app = Emulator(config, timing).app()
    if on_ready:
        app.on_startup.append(lambda _app: _call(on_ready))
    if exit_with_pid:
        app.on_startup.append(lambda _app: _start_owner_watch(exit_with_pid))
    from thunderops.agent import server_tls_files

    tls = server_tls_files(*config.ssl_files) if config.ssl_files else None
    web.run_app(app, host=config.host, port=config.port, print=None, access_log=None, handle_signals=True,
                ssl_context=tls)


async def _call(fn: Callable[[], None]) -> None:
    fn()


async def _start_owner_watch(pid: int) -> None:
    async def watch() -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                os._exit(0)  # the owner is gone: nothing will ever stop us otherwise
            except PermissionError:
                pass  # alive, someone else's

    asyncio.get_running_loop().create_task(watch())
