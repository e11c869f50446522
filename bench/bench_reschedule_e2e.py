"""End to end: a served 32-GPU plan (engine emulators timed by the performance model, real router, the
controller) under open-loop load from the official openai client; one node is killed mid-run.

Measures: detection (kill -> replicas out of the router), decision (light reschedule, stored and pushed),
and goodput after the decision: requests meeting the plan's SLO (done within TTFT + TPOT x (output - 1)) per second, over the
30 s after the decision, with the load offered at the new plan's predicted goodput.

Last line: measured goodput over the new plan's prediction (>= 0.90 meets the target).
Run: python bench/bench_reschedule_e2e.py [--speedup S]  (S > 1 compresses emulated time; rates scale by S)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--speedup", type=float, default=1.0)
    ap.add_argument("--before-s", type=float, default=15.0)
    ap.add_argument("--after-s", type=float, default=30.0)
    args = ap.parse_args()
    home = tempfile.mkdtemp(prefix="to-bench-e2e-")
    os.environ["THUNDEROPS_HOME"] = home

    from openai import AsyncOpenAI

    from thunderops.controller import Controller, ControllerConfig, LocalEmulators, save_router
    from thunderops.scheduler import solve
    from thunderops.scheduler.reschedule import reschedule
    from thunderops.serve import _spawn, free_port, serve_module_argv, stop_pids, wait_healthy
    from thunderops.serve.router import RoutingTable
    from thunderops.state import Store

    res = solve(None, "llama-30b", "conversation", inventory=ROOT / "examples" / "inventory_32gpu.yaml", time_limit=10)
    plan = res.plan
    slo = plan.inputs["slo"]
    # the victim: a node carrying exactly one replica (a lost machine, not the whole fleet)
    victim = next(g for g in plan.groups
                  if len(g.instances) == 1 and sum(g.instances[0] in x.instances for x in plan.groups) == 1)
    inst = victim.instances[0]
    predicted_after = reschedule(plan, lost_instances=[inst]).predicted.goodput_rps
    print(f"plan: {plan.total_gpus} GPUs, {len(plan.groups)} replicas, predicted {plan.predicted.goodput_rps:.2f} req/s; "
          f"losing {inst} ({victim.id}): predicted {predicted_after:.2f} req/s")

    store = Store()
    store.create_deployment("bench", model=plan.model)
    store.add_plan("bench", plan)
    key, ekey = f"tok-{secrets.token_urlsafe(8)}", secrets.token_urlsafe(8)
    engines = LocalEmulators(engine_key=ekey, speedup=args.speedup, workdir=str(Path(home) / "engines"))
    router_pid = None
    try:
        urls = engines.start("bench", plan, [g.id for g in plan.groups], {})
        table = Path(home) / "routing.json"
        table.write_text(json.dumps(RoutingTable.from_plan(plan, urls).to_dict()))
        port = free_port()
        router_pid = _spawn(serve_module_argv("router", "--routing", str(table), "--model", plan.model, "--port", str(port)),
                            {"THUNDEROPS_API_KEY": key, "THUNDEROPS_ENGINE_KEY": ekey}, Path(home) / "router.log")
        wait_healthy(f"http://127.0.0.1:{port}", router_pid, 60)
        save_router("bench", f"http://127.0.0.1:{port}", key)
        ctl = Controller("bench", store=store, config=ControllerConfig(interval_s=0.25, usage_interval_s=3600))
        threading.Thread(target=ctl.run, daemon=True).start()

        from thunderops.serve.vllm import max_model_len
        from thunderops.workload import get_workload

        mml = max_model_len(plan)  # lengths are clipped to what the engines accept (llama-30b: 2048)
        wl = get_workload("conversation")
        rate = predicted_after * args.speedup
        total_s = args.before_s + args.after_s + 5
        reqs = wl.sample(int(rate * total_s) + 1, seed=1, rate=rate)
        results: list[tuple[float, bool, str]] = []  # (arrival wall time, met SLO, why not)
        kill_at: list[float] = []
        errors: list[str] = []

        async def one(client, prompt_len: int, out_len: int) -> None:
            # Non-streamed (a streamed token per SSE chunk would make this 2-core machine the bottleneck): a
            # request meets the SLO when it ends within TTFT + TPOT x (output - 1), the per-request deadline
            # the two targets imply.
            t0 = time.time()
            try:
                r = await client.completions.create(model=plan.model, prompt="w " * int(prompt_len),
                                                    max_tokens=int(out_len))
                took = (time.time() - t0) * args.speedup
                why = ("incomplete" if r.usage.completion_tokens != out_len else
                       "deadline" if took > slo["ttft_s"] + slo["tpot_s"] * (out_len - 1) else "")
            except Exception as e:
                why = type(e).__name__
                if len(errors) < 3:
                    errors.append(f"{why}: {str(e)[:300]}")
            results.append((t0, not why, why))

        async def drive() -> None:
            client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0, timeout=600)
            start = time.time()
            tasks = []
            out = np.minimum(reqs.output, mml // 4)
            for a, p, o in zip(reqs.arrival, np.minimum(reqs.prompt, mml - out - 8), out, strict=True):
                delay = start + float(a) - time.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                if not kill_at and time.time() - start >= args.before_s:
                    kill_at.append(time.time())
                    os.killpg(engines.pids[victim.id], signal.SIGKILL)
                tasks.append(asyncio.create_task(one(client, int(p), int(o))))
            await asyncio.gather(*tasks)
            await client.close()

        asyncio.run(drive())
        ctl.stop()
        ev = store.events("bench", "reschedule")[0].payload
        drop = store.events("bench", "replicas-dropped")[0].payload
        decided = ev["decided_at"]
        window = [ok for t, ok, _ in results if decided <= t < decided + args.after_s]
        t_start = min(t for t, _, _ in results)
        before = [ok for t, ok, _ in results if t_start + 5 <= t < kill_at[0]]
        whys = {}
        for _t, _, why in results:
            if why:
                whys[why] = whys.get(why, 0) + 1
        print(f"before the kill: {np.mean(before) if before else 0:.0%} of {len(before)} requests within SLO; "
              f"misses by reason: {whys}; load average {os.getloadavg()[0]:.1f}")
        for e in errors:
            print("  e.g.", e)
        goodput = sum(window) / args.after_s / args.speedup
        print(f"detection {drop['detected_at'] - kill_at[0]:.2f} s (target 3 s), decision {ev['decision_s']:.3f} s "
              f"(target 1 s), {len(window)} requests in the {args.after_s:g} s after it, "
              f"{np.mean(window) if window else 0:.0%} within SLO")
        print(f"goodput after the decision {goodput:.2f} req/s vs predicted {predicted_after:.2f} req/s")
        print(f"goodput ratio measured/predicted: {goodput / predicted_after:.2f}")
    finally:
        engines.stop()
        if router_pid:
            stop_pids([router_pid])


if __name__ == "__main__":
    sys.exit(main())
