"""Router overhead: our P/D router vs vLLM's own proxy approach (FastAPI + httpx, as in vLLM's
tests/v1/kv_connector/nixl_integration/toy_proxy_server.py), both in front of the same zero-delay engine
emulators on 127.0.0.1.

Measures, for each proxy:
- throughput: non-streaming /v1/completions requests/s through ONE proxy process, from a load generator
  in separate processes holding `--concurrency` keep-alive connections;
- added p50 latency: p50 of one-at-a-time requests through the proxy minus p50 of a client doing the same
  two calls (prefill, then decode with the returned kv_transfer_params) straight to the emulators.

Last line: our throughput / the FastAPI+httpx proxy's throughput.

    python bench/bench_router.py [--seconds 10] [--concurrency 64] [--clients 2] [--replicas 1]
                                 [--router-cpus 0] [--profile router.txt]

--replicas N starts N prefill + N decode emulators (routes p_i -> d_i, 1/N each; the FastAPI proxy
round-robins over them like vLLM's toy proxy), so the emulators are not the bottleneck on a big machine.
--router-cpus pins each proxy to those CPUs and everything else (emulators, load generators) to the other
CPUs. --profile samples the router with py-spy during its throughput run (collapsed stacks) and prints its
top functions; it slows the router, so take the headline numbers from a run without it.
"""

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

MODEL = "meta-llama/Llama-3.1-8B"
KEY = "bench-key"
BODY = {"model": MODEL, "prompt": "Tell me about the ocean and the ships on it", "max_tokens": 8}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except Exception:
            time.sleep(0.1)
    raise SystemExit(f"{url} did not come up")


def spawn(argv: list[str], env: dict[str, str] | None = None, cpus: set[int] | None = None) -> subprocess.Popen:
    p = subprocess.Popen(argv, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    if cpus:
        os.sched_setaffinity(p.pid, cpus)  # before it starts any thread; its threads inherit it
    return p


def parse_cpus(spec: str) -> set[int]:
    """'0', '0,1' or '0-3' -> a set of CPU numbers."""
    out: set[int] = set()
    for part in spec.split(","):
        a, _, b = part.partition("-")
        out.update(range(int(a), int(b or a) + 1))
    return out


# ---- vLLM's proxy approach: FastAPI + httpx (a faithful re-implementation of the toy proxy's request path) ----

def run_fastapi_proxy(port: int, prefills: str, decodes: str) -> None:
    import itertools

    import httpx
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import StreamingResponse

    app = FastAPI()
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    # one client per engine, taken round-robin, as the toy proxy does
    pcs = itertools.cycle([httpx.AsyncClient(timeout=None, base_url=u + "/v1", limits=limits) for u in prefills.split(",")])
    dcs = itertools.cycle([httpx.AsyncClient(timeout=None, base_url=u + "/v1", limits=limits) for u in decodes.split(",")])

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await request.json()
        p = dict(req, stream=False, max_tokens=1, kv_transfer_params={
            "do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
            "remote_block_ids": None, "remote_host": None, "remote_port": None})
        pc, dc = next(pcs), next(dcs)
        r = await pc.post("/completions", json=p, headers={"Authorization": f"Bearer {KEY}"})
        r.raise_for_status()
        kv = r.json().get("kv_transfer_params")
        if kv:
            req["kv_transfer_params"] = kv

        async def gen():
            async with dc.stream("POST", "/completions", json=req, headers={"Authorization": f"Bearer {KEY}"}) as resp:
                resp.raise_for_status()
                async for chunk in resp.aiter_bytes():
                    yield chunk

        return StreamingResponse(gen(), media_type="application/json")

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="error", access_log=False)


# ---- load generation ----------------------------------------------------------------------------------

async def _load(url: str, seconds: float, concurrency: int, out: mp.Queue) -> None:
    """Closed-loop load: `concurrency` keep-alive connections, each sending the next request on its answer.
    Uses the router's own lean client (thunderops.serve.upstream) so the generator leaves the most CPU to
    the proxies on a small machine."""
    from urllib.parse import urlsplit

    from thunderops.serve.upstream import UpstreamPool

    u = urlsplit(url)
    pool = UpstreamPool(f"{u.scheme}://{u.netloc}", {"Authorization": f"Bearer {KEY}"})
    body = json.dumps(BODY).encode()
    done = errors = 0
    stop = time.monotonic() + seconds

    async def worker() -> None:
        nonlocal done, errors
        while time.monotonic() < stop:
            status, _ = await pool.request("POST", u.path, body)
            if status == 200:
                done += 1
            else:
                errors += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    pool.close()
    out.put((done, errors))


def _load_proc(url: str, seconds: float, concurrency: int, out: mp.Queue, cpus: set[int] | None = None) -> None:
    if cpus:
        os.sched_setaffinity(0, cpus)
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    asyncio.run(_load(url, seconds, concurrency, out))


def cpu_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of one process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process so far."""
    return sum(cpu_times(pid))


def throughput(url: str, seconds: float, concurrency: int, clients: int,
               cpus: set[int] | None = None) -> tuple[float, int]:
    ctx = mp.get_context("spawn")
    q: mp.Queue = ctx.Queue()
    procs = [ctx.Process(target=_load_proc, args=(url, seconds, max(1, concurrency // clients), q, cpus))
             for _ in range(clients)]
    t0 = time.monotonic()
    for p in procs:
        p.start()
    results = [q.get() for _ in procs]
    elapsed = time.monotonic() - t0
    for p in procs:
        p.join()
    ok = sum(r[0] for r in results)
    return ok / max(elapsed - 0.0, 1e-9) if elapsed else 0.0, sum(r[1] for r in results)


async def _latency(n: int, url: str | None, prefill: str, decode: str) -> list[float]:
    """One-at-a-time requests (after 50 warm-up ones); url=None does the P/D flow straight to the emulators."""
    from urllib.parse import urlsplit

    from thunderops.serve.upstream import UpstreamPool

    auth = {"Authorization": f"Bearer {KEY}"}
    body = json.dumps(BODY).encode()
    pre = json.dumps(dict(BODY, max_tokens=1, kv_transfer_params={"do_remote_decode": True})).encode()
    if url is not None:
        u = urlsplit(url)
        proxy = UpstreamPool(f"{u.scheme}://{u.netloc}", auth)
    p_pool, d_pool = UpstreamPool(prefill, auth), UpstreamPool(decode, auth)
    out = []
    for i in range(n + 50):
        t = time.perf_counter()
        if url is not None:
            status, _ = await proxy.request("POST", u.path, body)
        else:
            status, data = await p_pool.request("POST", "/v1/completions", pre)
            kv = json.loads(data)["kv_transfer_params"]
            status, _ = await d_pool.request("POST", "/v1/completions",
                                             json.dumps(dict(BODY, kv_transfer_params=kv)).encode())
        assert status == 200, status
        if i >= 50:
            out.append(time.perf_counter() - t)
    return out


def print_profile(path: str, top: int = 25) -> None:
    """Self and total sample shares per function from py-spy's collapsed stacks ('a;b;c count' lines)."""
    from collections import Counter

    self_, total, n = Counter(), Counter(), 0
    if not Path(path).exists():
        print(f"router profile: py-spy wrote no {path}")
        return
    for line in Path(path).read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        c, frames = int(count), stack.split(";")
        n += c
        self_[frames[-1]] += c
        for f in set(frames):
            total[f] += c
    print(f"router profile: {n} samples; top self time (a frame's self time includes the C code it calls: "
          "for run_app, uvloop's event loop, i.e. socket syscalls and HTTP parsing):")
    for f, c in self_.most_common(top):
        print(f"  self {c / n:6.1%}  total {total[f] / n:6.1%}  {f}")
    print("top total (inclusive) time:")
    for f, c in total.most_common(top):
        print(f"  total {c / n:6.1%}  {f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--clients", type=int, default=2, help="load-generator processes")
    ap.add_argument("--latency-requests", type=int, default=1000)
    ap.add_argument("--replicas", type=int, default=1, help="prefill and decode emulators of each kind")
    ap.add_argument("--router-cpus", help="pin each proxy to these CPUs (e.g. 0 or 0-1), the rest elsewhere")
    ap.add_argument("--profile", help="py-spy the router's throughput run; write collapsed stacks here")
    args = ap.parse_args()
    proxy_cpus = parse_cpus(args.router_cpus) if args.router_cpus else None
    rest_cpus = (os.sched_getaffinity(0) - proxy_cpus) if proxy_cpus else None
    if rest_cpus is not None and not rest_cpus:
        raise SystemExit("--router-cpus leaves no CPU for the emulators and load generators")
    if rest_cpus:
        os.sched_setaffinity(0, rest_cpus)
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass

    procs: list[subprocess.Popen] = []
    try:
        env = {"THUNDEROPS_ENGINE_KEY": KEY, "THUNDEROPS_API_KEY": KEY}
        n = args.replicas
        rport, fport = free_port(), free_port()
        prefills = [f"http://127.0.0.1:{free_port()}" for _ in range(n)]
        decodes = [f"http://127.0.0.1:{free_port()}" for _ in range(n)]
        emulators: list[subprocess.Popen] = []
        for role, urls in (("prefill", prefills), ("decode", decodes)):
            for u in urls:
                emulators.append(spawn([sys.executable, "-m", "thunderops.serve", "emulator", "--role", role,
                                        "--port", u.rsplit(":", 1)[1], "--delay-scale", "0", "--model", MODEL],
                                       env, rest_cpus))
        prefill, decode = prefills[0], decodes[0]
        table = {"replicas": [{"id": f"p{i}", "url": u, "phase": "prefill"} for i, u in enumerate(prefills)]
                 + [{"id": f"d{i}", "url": u, "phase": "decode"} for i, u in enumerate(decodes)],
                 "routes": [{"prefill": f"p{i}", "decode": f"d{i}", "fraction": 1.0 / n} for i in range(n)]}
        tpath = Path(tempfile.mkdtemp()) / "routing.json"
        tpath.write_text(json.dumps(table))
        router_proc = spawn([sys.executable, "-m", "thunderops.serve", "router", "--routing", str(tpath),
                             "--model", MODEL, "--port", str(rport)], env, proxy_cpus)
        fastapi_proc = spawn([sys.executable, __file__, "--fastapi-proxy", str(fport), ",".join(prefills),
                              ",".join(decodes)], None, proxy_cpus)
        procs += [*emulators, router_proc, fastapi_proc]
        for u in (*prefills, *decodes, f"http://127.0.0.1:{rport}", f"http://127.0.0.1:{fport}"):
            wait_up(u + "/health")

        print(f"cores: {os.cpu_count()}  load average before: {os.getloadavg()[0]:.2f}  emulators: {n}+{n}  "
              f"proxy CPUs: {sorted(proxy_cpus) if proxy_cpus else 'any'}  clients: {args.clients}  "
              f"concurrency: {args.concurrency}  python: {sys.version.split()[0]}")
        direct = asyncio.run(_latency(args.latency_requests, None, prefill, decode))
        base = statistics.median(direct)
        print(f"direct P/D calls (no proxy): p50 {base * 1e3:.3f} ms")
        results = {}
        for name, port, proc in (("thunderops router", rport, router_proc),
                                 ("vLLM-style proxy (FastAPI+httpx)", fport, fastapi_proc)):
            url = f"http://127.0.0.1:{port}/v1/completions"
            lat = asyncio.run(_latency(args.latency_requests, url, prefill, decode))
            throughput(url, 1.0, args.concurrency, args.clients, rest_cpus)  # warm-up
            spy = None
            if args.profile and proc is router_proc:
                spy = subprocess.Popen(["py-spy", "record", "--nonblocking", "--format", "raw", "--function", "--rate", "200",
                                        "--duration", str(int(args.seconds)), "--pid", str(proc.pid),
                                        "--output", args.profile], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
            sys0 = cpu_times(proc.pid)[1]
            cpu0 = cpu_seconds(proc.pid)
            emu0 = [cpu_seconds(e.pid) for e in emulators]
            rps, errors = throughput(url, args.seconds, args.concurrency, args.clients, rest_cpus)
            cpu = cpu_seconds(proc.pid) - cpu0
            sys_share = (cpu_times(proc.pid)[1] - sys0) / max(cpu, 1e-9)
            emu = max(cpu_seconds(e.pid) - c for e, c in zip(emulators, emu0, strict=True))
            if spy is not None:
                spy.wait(timeout=60)
            p50 = statistics.median(lat)
            results[name] = rps
            per_req = cpu / max(rps * args.seconds, 1)
            print(f"{name}: {rps:,.0f} req/s ({errors} errors), p50 {p50 * 1e3:.3f} ms, "
                  f"added p50 {(p50 - base) * 1e3:.3f} ms, proxy CPU {per_req * 1e6:.0f} us/request "
                  f"(= {1 / per_req:,.0f} req/s per fully used core), proxy busy {cpu / args.seconds:.0%} of a core "
                  f"({sys_share:.0%} of it in the kernel), "
                  f"busiest emulator {emu / args.seconds:.0%} of a core")
        if args.profile:
            print_profile(args.profile)
        ours, theirs = results.values()
        print(f"load average after: {os.getloadavg()[0]:.2f}")
        print(f"throughput ratio ours/fastapi+httpx: {ours / theirs:.2f}")
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, 15)
            except ProcessLookupError:
                pass
        for p in procs:
            p.wait(timeout=10)


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--fastapi-proxy":
        run_fastapi_proxy(int(sys.argv[2]), sys.argv[3], sys.argv[4])
    else:
        main()
