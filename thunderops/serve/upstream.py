"""A lean keep-alive HTTP/1.1 client for the router's engine calls.

The router makes two engine calls per request, so its client cost sets its throughput. This pool of
persistent connections per engine writes each request in one `transport.write` and parses responses with
httptools (llhttp, the parser uvicorn uses), at a fraction of aiohttp's client cost per call (see
bench/bench_router.py). It speaks only what engines need: POST/GET with a body, Content-Length or chunked
responses, and streamed bodies for SSE.
"""

from __future__ import annotations

import asyncio
import ssl as ssl_module
from collections import deque
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import httptools


class UpstreamError(ConnectionError):
    """The engine could not be reached, or the connection broke before the response completed."""


class _Conn(asyncio.Protocol):
    __slots__ = ("pool", "transport", "parser", "status", "body", "done", "chunks", "headers_done", "got_bytes",
                 "keep_alive", "closed", "streaming", "_wake", "busy")

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.busy = False  # a request is outstanding on this connection
        self._reset()

    def _reset(self) -> None:
        loop = asyncio.get_running_loop()
        self.status = 0
        self.body: list[bytes] = []
        self.done: asyncio.Future[None] = loop.create_future()
        self.headers_done: asyncio.Future[None] = loop.create_future()
        self.got_bytes = False
        self.keep_alive = True
        self.streaming = False
        self._wake: asyncio.Future[None] | None = None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._fail(UpstreamError(f"bad HTTP response from {self.pool.netloc}: {e}"))
            self.transport.close()  # type: ignore[union-attr]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.busy:  # the engine closed an idle keep-alive connection (vLLM's uvicorn does after 5 s)
            try:
                self.pool.idle.remove(self)
            except ValueError:
                pass
        elif not self.done.done():
            self._fail(UpstreamError(f"connection to {self.pool.netloc} lost"))

    # httptools callbacks
    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()
        if not self.headers_done.done():
            self.headers_done.set_result(None)

    def on_body(self, body: bytes) -> None:
        self.body.append(body)
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    def on_message_complete(self) -> None:
        if not self.done.done():
            self.done.set_result(None)
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    def _fail(self, exc: Exception) -> None:
        for fut in (self.headers_done, self.done, self._wake):
            if fut is not None and not fut.done():
                fut.set_exception(exc)

    def release(self) -> None:
        """Back to the pool if the response completed and the connection may be reused."""
        self.busy = False
        if self.done.done() and not self.done.exception() and self.keep_alive and not self.closed:
            self._reset()
            self.pool.idle.append(self)
        else:
            self.abort()

    def abort(self) -> None:
        self.closed = True
        self.busy = False
        if self.transport is not None:
            self.transport.close()
        for fut in (self.headers_done, self.done):
            if fut.done() and not fut.cancelled():
                fut.exception()  # mark retrieved


class StreamedResponse:
    """A response whose body arrives in pieces (`async for piece in resp`); `close()` frees the connection."""

    def __init__(self, conn: _Conn) -> None:
        self._c = conn
        self.status = conn.status

    async def read(self) -> bytes:
        c = self._c
        await c.done
        return b"".join(c.body)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        c = self._c
        while True:
            if c.body:
                pieces, c.body = c.body, []
                for p in pieces:
                    yield p
                continue
            if c.done.done():
                c.done.result()  # raises if the connection broke
                return
            c._wake = asyncio.get_running_loop().create_future()
            await c._wake
            c._wake = None

    async def drain(self) -> None:
        """Wait for the end of the message (so the connection can be reused)."""
        await self._c.done

    def close(self) -> None:
        self._c.release()


class UpstreamPool:
    """Keep-alive connections to one engine (`http://host:port`, or `https://` with the `ssl` context that
    trusts its certificate)."""

    def __init__(self, base_url: str, headers: dict[str, str] | None = None, connect_timeout_s: float = 5.0,
                 ssl: ssl_module.SSLContext | None = None) -> None:
        u = urlsplit(base_url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"engine URL must be http(s)://HOST:PORT, got {base_url!r}")
        self.ssl = (ssl or ssl_module.create_default_context()) if u.scheme == "https" else None
        self.host, self.port = u.hostname, u.port or (443 if self.ssl else 80)
        self.netloc = f"{self.host}:{self.port}"
        self.prefix = u.path.rstrip("/")
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self._head = f"Host: {self.netloc}\r\nContent-Type: application/json\r\n{extra}".encode()
        self.idle: deque[_Conn] = deque()
        self.connect_timeout_s = connect_timeout_s

    async def _connect(self) -> _Conn:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _Conn(self), self.host, self.port, ssl=self.ssl,
                                       server_hostname=self.host if self.ssl else None), self.connect_timeout_s)
        except (TimeoutError, OSError) as e:
            raise UpstreamError(f"cannot connect to {self.netloc}: {e}") from None
        return conn

    async def _send(self, method: str, path: str, body: bytes, request_id: str | None = None) -> _Conn:
        head = self._head + (f"X-Request-Id: {request_id}\r\n".encode() if request_id else b"")
        req = (f"{method} {self.prefix}{path} HTTP/1.1\r\n".encode() + head
               + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        while self.idle:  # reuse; a connection the engine closed while idle fails before any byte: retry fresh
            conn = self.idle.pop()
            if conn.closed or conn.transport is None or conn.transport.is_closing():
                conn.abort()
                continue
            try:
                conn.busy = True
                self._write(conn, req)
                await conn.headers_done
                return conn
            except UpstreamError:
                conn.abort()
                if conn.got_bytes:
                    raise
            except BaseException:
                conn.abort()
                raise
        conn = await self._connect()
        try:
            conn.busy = True
            self._write(conn, req)
            await conn.headers_done
        except BaseException:
            conn.abort()
            raise
        return conn

    def _write(self, conn: _Conn, req: bytes) -> None:
        # An engine that dies between connect (or reuse) and write leaves a closed transport, on which uvloop
        # raises RuntimeError: that is a lost connection like any other, for the router to retry or migrate.
        if conn.transport is None or conn.transport.is_closing():
            raise UpstreamError(f"connection to {self.netloc} lost")
        try:
            conn.transport.write(req)
        except (RuntimeError, OSError) as e:
            raise UpstreamError(f"connection to {self.netloc} lost: {e}") from None

    async def request(self, method: str, path: str, body: bytes = b"", request_id: str | None = None) -> tuple[int, bytes]:
        """One whole exchange: (status, body). `request_id` goes in the X-Request-Id header (vLLM's request id)."""
        conn = await self._send(method, path, body, request_id)
        try:
            await conn.done
            return conn.status, b"".join(conn.body)
        finally:
            conn.release()

    async def stream(self, method: str, path: str, body: bytes = b"", request_id: str | None = None) -> StreamedResponse:
        """Headers received; iterate the returned response for the body, then close() it."""
        conn = await self._send(method, path, body, request_id)
        conn.streaming = True
        return StreamedResponse(conn)

    def close(self) -> None:
        while self.idle:
            self.idle.pop().abort()
