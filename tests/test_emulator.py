"""The engine emulator over real HTTP: P/D protocol checks, continuous batching, speedup, perf-model timing."""

from __future__ import annotations

import asyncio
import subprocess
import time

import aiohttp
import pytest
from aiohttp import web

from thunderops.serve import free_port
from thunderops.serve.emulator import (
    BLOCK_SIZE,
    Emulator,
    EmulatorConfig,
    FixedTiming,
    ZeroTiming,
    count_tokens,
    filler,
    perf_timing,
)

MODEL = "m"


async def serve(cfg: EmulatorConfig, timing=None) -> tuple[web.AppRunner, str]:
    cfg.port = free_port()
    runner = web.AppRunner(Emulator(cfg, timing).app())
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", cfg.port).start()
    return runner, f"http://127.0.0.1:{cfg.port}"


async def post(s: aiohttp.ClientSession, url: str, body: dict, request_id: str | None = None) -> tuple[int, dict]:
    async with s.post(url + "/v1/completions", json=body,
                      headers={"X-Request-Id": request_id} if request_id else None) as r:
        return r.status, await r.json()


def test_prefill_and_decode_roles_speak_nixls_protocol():
    async def run() -> None:
        pr, purl = await serve(EmulatorConfig(model=MODEL, role="prefill", tp=2))
        dr, durl = await serve(EmulatorConfig(model=MODEL, role="decode"))
        prompt = "a " * 33  # 33 tokens -> 3 blocks
        try:
            async with aiohttp.ClientSession() as s:
                assert (await post(s, purl, {"model": MODEL, "prompt": prompt}))[0] == 400  # not a P/D request
                st, pre = await post(s, purl, {"model": MODEL, "prompt": prompt, "max_tokens": 50,
                                               "kv_transfer_params": {"do_remote_decode": True}}, "r1")
                assert st == 200 and pre["usage"]["completion_tokens"] == 1
                kv = pre["kv_transfer_params"]
                assert len(kv["remote_block_ids"]) == -(-33 // BLOCK_SIZE) == 3 and kv["tp_size"] == 2
                st, err = await post(s, durl, {"model": MODEL, "prompt": prompt, "max_tokens": 4})
                assert st == 400 and "kv_transfer_params" in err["error"]["message"]
                other = "b " * 80  # the same params do not cover a longer prompt
                assert (await post(s, durl, {"model": MODEL, "prompt": other, "kv_transfer_params": kv}, "r1"))[0] == 400
                st, out = await post(s, durl, {"model": MODEL, "prompt": prompt, "max_tokens": 4,
                                               "kv_transfer_params": kv}, "r1")
                assert st == 200 and out["choices"][0]["text"] == "".join(filler(33, 4))
                assert (await post(s, durl, {"model": "other", "prompt": prompt, "kv_transfer_params": kv}))[0] == 404
        finally:
            await pr.cleanup()
            await dr.cleanup()

    asyncio.run(run())


def test_max_model_len_and_api_key_are_enforced():
    async def run() -> None:
        r, url = await serve(EmulatorConfig(model=MODEL, max_model_len=100, api_key="k"))
        try:
            async with aiohttp.ClientSession(headers={"Authorization": "Bearer k"}) as s:
                st, err = await post(s, url, {"model": MODEL, "prompt": "w " * 95, "max_tokens": 10})
                assert st == 400 and "maximum context length is 100" in err["error"]["message"]
                assert (await post(s, url, {"model": MODEL, "prompt": "w " * 90, "max_tokens": 10}))[0] == 200
            async with aiohttp.ClientSession() as s:
                assert (await post(s, url, {"model": MODEL, "prompt": "w"}))[0] == 401
        finally:
            await r.cleanup()

    asyncio.run(run())


async def _timed_requests(cfg: EmulatorConfig, timing, n: int, max_tokens: int) -> float:
    r, url = await serve(cfg, timing)
    try:
        async with aiohttp.ClientSession() as s:
            t0 = time.perf_counter()
            results = await asyncio.gather(*(post(s, url, {"model": MODEL, "prompt": f"p {i}", "max_tokens": max_tokens})
                                              for i in range(n)))
            elapsed = time.perf_counter() - t0
        assert all(st == 200 and b["usage"]["completion_tokens"] == max_tokens for st, b in results)
        return elapsed
    finally:
        await r.cleanup()


def test_concurrent_decodes_share_steps_continuous_batching():
    timing = FixedTiming(per_decode_step_s=0.02)
    one = asyncio.run(_timed_requests(EmulatorConfig(model=MODEL), timing, 1, 15))
    eight = asyncio.run(_timed_requests(EmulatorConfig(model=MODEL), timing, 8, 15))
    assert one >= 15 * 0.02 * 0.9
    assert eight < 2 * one  # batched: not 8x the time of one


def test_speedup_runs_emulated_time_faster_and_delay_scale_zero_is_instant():
    timing = FixedTiming(per_prefill_token_s=0.001, per_decode_step_s=0.02)
    normal = asyncio.run(_timed_requests(EmulatorConfig(model=MODEL), timing, 2, 20))
    fast = asyncio.run(_timed_requests(EmulatorConfig(model=MODEL, speedup=5), timing, 2, 20))
    instant = asyncio.run(_timed_requests(EmulatorConfig(model=MODEL, delay_scale=0), timing, 2, 20))
    assert fast < normal / 2.5
    assert instant < 0.2 < normal


def test_streaming_with_usage_and_chat_token_counts():
    async def run() -> None:
        r, url = await serve(EmulatorConfig(model=MODEL))
        try:
            async with aiohttp.ClientSession() as s:
                body = {"model": MODEL, "messages": [{"role": "user", "content": "hi there"}], "max_tokens": 5,
                        "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
                async with s.post(url + "/v1/chat/completions", json=body) as resp:
                    lines = [line async for line in resp.content if line.startswith(b"data: ")]
                assert lines[-1].strip() == b"data: [DONE]"
                import json

                chunks = [json.loads(x[6:]) for x in lines[:-1]]
                assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5
                assert [c["usage"]["completion_tokens"] for c in chunks[1:-1]] == [1, 2, 3, 4, 5]
                text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
                assert count_tokens(text) == 5
        finally:
            await r.cleanup()

    asyncio.run(run())


def test_perf_model_timing_tracks_the_gpu():
    h100, l4 = perf_timing("llama3-8b", "H100"), perf_timing("llama3-8b", "L4")
    assert h100.decode_step_time(32, 32 * 1024) < l4.decode_step_time(32, 32 * 1024)
    assert h100.prefill_time([2048]) < l4.prefill_time([2048])
    tp2 = perf_timing("llama3-8b", "L4", tp=2)
    assert tp2.decode_step_time(8, 8 * 512) < l4.decode_step_time(8, 8 * 512)
    assert ZeroTiming().prefill_time([10]) == 0


def test_cli_rejects_a_bad_role_with_one_line(thunderops_cli):
    p = subprocess.run([thunderops_cli, "serve", "emulator", "--role", "middle"], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 2 and "--role must be prefill, decode or both" in p.stderr
    assert "Traceback" not in p.stderr
    p = subprocess.run([thunderops_cli, "serve", "router"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "--routing" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.parametrize("text,n", [("Hello, world!", 4), ("", 0), ("one two  three", 3)])
def test_count_tokens(text, n):
    assert count_tokens(text) == n


def test_decode_batches_are_capped_at_max_num_seqs():
    timing = FixedTiming(per_decode_step_s=0.02)
    capped = asyncio.run(_timed_requests(EmulatorConfig(model=MODEL, max_num_seqs=2), timing, 6, 10))
    wide = asyncio.run(_timed_requests(EmulatorConfig(model=MODEL), timing, 6, 10))
    assert capped > 2.5 * 10 * 0.02  # three rounds of 10 steps, not one
    assert wide < capped / 2


def test_emulator_ends_with_its_owner_process(tmp_path):
    """`--exit-with-pid`: an emulator in its own session still ends once the process that owns it is gone."""
    import sys

    from thunderops.serve import _spawn, serve_module_argv, wait_healthy

    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    port = free_port()
    pid = _spawn(serve_module_argv("emulator", "--port", str(port), "--exit-with-pid", str(owner.pid)), {},
                 tmp_path / "emulator.log")
    try:
        wait_healthy(f"http://127.0.0.1:{port}", pid, 60, str(tmp_path / "emulator.log"))
        time.sleep(1.5)
        assert _alive(pid)  # the owner lives: so does the emulator
        owner.kill()
        owner.wait()
        deadline = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(pid)
    finally:
        owner.kill()
        subprocess.run(["kill", "-9", str(pid)], capture_output=True)


def _alive(pid: int) -> bool:
    import os

    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)  # reap it if it is our exited child
        if waited:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
