"""The router's engine client (serve/upstream.py) against a real aiohttp server over TCP."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web

from thunderops.serve import free_port
from thunderops.serve.upstream import UpstreamError, UpstreamPool


async def start(app: web.Application, keepalive: float = 75.0) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, keepalive_timeout=keepalive)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}"


def echo_app(streams: list[web.StreamResponse] | None = None) -> web.Application:
    async def echo(req: web.Request) -> web.Response:
        return web.Response(body=(await req.read())[::-1], status=201, headers={"X-Auth": req.headers.get("Authorization", "")})

    async def stream(req: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(req)
        if streams is not None:
            streams.append(resp)
        for i in range(int(req.query.get("n", "5"))):
            await resp.write(f"data: {i}\n\n".encode())
            await asyncio.sleep(0.01)
        if req.query.get("die"):
            req.transport.abort()  # the engine process dies mid-stream
            return resp
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/echo", echo)
    app.router.add_post("/stream", stream)
    return app


def test_requests_reuse_keep_alive_connections_and_send_headers():
    async def run() -> None:
        runner, url = await start(echo_app())
        pool = UpstreamPool(url, {"Authorization": "Bearer k"})
        try:
            for i in range(20):
                status, body = await pool.request("POST", "/echo", f"abc{i}".encode())
                assert (status, body) == (201, f"abc{i}".encode()[::-1])
            assert len(pool.idle) == 1  # one connection served all twenty, one after another
            results = await asyncio.gather(*(pool.request("POST", "/echo", b"x" * 100_000) for _ in range(8)))
            assert all(r == (201, b"x" * 100_000) for r in results)
        finally:
            pool.close()
            await runner.cleanup()

    asyncio.run(run())


def test_connections_the_engine_closes_while_idle_are_dropped_and_replaced():
    async def run() -> None:
        runner, url = await start(echo_app(), keepalive=0.2)
        pool = UpstreamPool(url)
        try:
            await asyncio.gather(*(pool.request("POST", "/echo", b"1") for _ in range(4)))
            await asyncio.sleep(0.6)
            assert len(pool.idle) == 0
            assert await pool.request("POST", "/echo", b"12") == (201, b"21")
        finally:
            pool.close()
            await runner.cleanup()

    asyncio.run(run())


def test_streams_arrive_in_pieces_and_a_dying_engine_raises():
    async def run() -> None:
        runner, url = await start(echo_app())
        pool = UpstreamPool(url)
        try:
            resp = await pool.stream("POST", "/stream?n=4", b"")
            body = b"".join([p async for p in resp])
            resp.close()
            assert body == b"".join(f"data: {i}\n\n".encode() for i in range(4))
            resp = await pool.stream("POST", "/stream?n=3&die=1", b"")
            got = []
            with pytest.raises(UpstreamError):
                async for p in resp:
                    got.append(p)
            resp.close()
            assert b"".join(got).startswith(b"data: 0")
        finally:
            pool.close()
            await runner.cleanup()

    asyncio.run(run())


def test_unreachable_engine_raises_upstream_error():
    async def run() -> None:
        pool = UpstreamPool(f"http://127.0.0.1:{free_port()}", connect_timeout_s=2)
        with pytest.raises(UpstreamError, match="cannot connect"):
            await pool.request("POST", "/v1/completions", b"{}")

    asyncio.run(run())
    for bad in ("ftp://example.com", "http://", "example.com:80"):  # https:// is taken (test_engine_tls.py)
        with pytest.raises(ValueError, match=r"http\(s\)://HOST:PORT"):
            UpstreamPool(bad)


def test_a_connection_closed_between_connect_and_write_is_an_upstream_error():
    """An engine dying right after accepting leaves a closed transport; writing on it must be a lost connection
    (retried or migrated by the router), not uvloop's RuntimeError (a 500 to the client)."""

    async def main() -> None:
        runner, url = await start(echo_app())
        pool = UpstreamPool(url)
        real_connect = pool._connect

        async def connect_then_die():
            conn = await real_connect()
            conn.transport.abort()  # closed before the request is written
            for _ in range(3):
                await asyncio.sleep(0)  # let the loop finish closing the handle
            return conn

        pool._connect = connect_then_die
        try:
            with pytest.raises(UpstreamError):
                await pool.request("POST", "/echo", b"abc")
            pool._connect = real_connect
            status, body = await pool.request("POST", "/echo", b"abc")  # and the pool still works
            assert (status, body) == (201, b"cba")
        finally:
            pool.close()
            await runner.cleanup()

    uvloop = pytest.importorskip("uvloop")  # the router's loop; plain asyncio ignores writes on closed transports
    uvloop.run(main())
