"""How faithfully netbench recovers a known link matrix.

Starts N real agents on 127.0.0.10.. with a different emulated limit on every link (`--peer-mbps`), runs the
round-robin measurement, and compares each measured link with its limit. Last line: the worst
measured/limit ratio (1.0 is perfect; the tests demand 0.8..1.2).

    python bench/bench_netbench.py [--nodes 6] [--duration 0.5]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
import urllib.request

from thunderops.netbench import AgentEndpoint, measure

TOKEN = "bench-token"


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def limit_mbps(i: int, j: int) -> float:
    return 100.0 * (1 + (3 * i + 5 * j) % 8)  # 100..800 Mbit/s, varied across links


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=6)
    ap.add_argument("--duration", type=float, default=0.5)
    ap.add_argument("--streams", type=int, default=4)
    a = ap.parse_args()
    hosts = [f"127.0.0.{10 + i}" for i in range(a.nodes)]
    procs, eps = [], []
    try:
        for i, h in enumerate(hosts):
            port = free_port(h)
            peers = [f"--peer-mbps={hosts[j]}={limit_mbps(i, j)}" for j in range(i + 1, a.nodes)]
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "thunderops.agent", "--host", h, "--port", str(port), "--data-port", "0",
                 "--cloud", "none", "--node", f"n{i}", *peers],
                env={**os.environ, "THUNDEROPS_AGENT_TOKEN": TOKEN}, stdout=subprocess.DEVNULL))
            eps.append(AgentEndpoint(f"n{i}", h, port, TOKEN))
        for e in eps:
            deadline = time.monotonic() + 30
            while True:
                try:
                    req = urllib.request.Request(e.url + "/v1/health", headers={"Authorization": f"Bearer {TOKEN}"})
                    urllib.request.urlopen(req, timeout=1)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
        r = measure(eps, duration_s=a.duration, streams=a.streams, tool="builtin", nccl=False)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(10)
    ratios = []
    print(f"{'link':>10} {'limit Mbit/s':>13} {'measured':>9} {'ratio':>6}")
    for p in r.pairs:
        i, j = int(p.a[1:]), int(p.b[1:])
        lim = limit_mbps(min(i, j), max(i, j))
        got = (p.gbps or 0) * 1000
        ratios.append(got / lim)
        print(f"{p.a + '-' + p.b:>10} {lim:13.0f} {got:9.0f} {got / lim:6.3f}")
    print(f"{len(r.pairs)} links in {len(r.rounds)} rounds, {r.wall_s:.1f} s wall; {r.message()}")
    worst = max(ratios, key=lambda x: abs(x - 1.0))
    print(f"worst measured/limit ratio: {worst:.3f}")


if __name__ == "__main__":
    main()
