"""End to end: the official `openai` client -> our router (real HTTP, real processes, engine emulators) writes token
usage into the state store -> `thunderops report` prices it per 1M prompt and output tokens."""

from __future__ import annotations

import json
import subprocess
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import openai
from test_serve_plans import pd_plan

from thunderops.serve import start_local
from thunderops.state import Store

MODEL = "meta-llama/Llama-3.1-8B"
PRICES = {"n0": 1.25, "n1": 2.5, "n2": 3.0, "n3": 4.75}  # n0, n1 prefill; n2, n3 decode


def test_router_usage_priced_per_million_tokens(thunderops_cli):
    plan = pd_plan((0.4, 0.1, 0.2, 0.3))
    for inst in plan.instances:
        inst.price_per_hour = PRICES[inst.id]
    plan.cost_per_hour = sum(PRICES.values())
    store = Store()
    store.create_deployment("serve1", provider="local", model=plan.model, status="up")
    store.add_plan("serve1", plan)
    launched = datetime.now(UTC) - timedelta(hours=1)
    for inst in plan.instances:
        store.record_node_intent("serve1", f"node-{inst.id}", inst.id, f"to-serve1-{inst.id}", cloud="local",
                                 gpu=inst.gpu, gpus=1, price_per_hour=inst.price_per_hour, status="ready",
                                 launched_at=launched.isoformat())
    h = start_local(plan, delay_scale=0, usage_db=str(store.path), deployment="serve1")
    answers = []
    try:
        api = openai.OpenAI(base_url=h.endpoint, api_key=h.api_key, max_retries=0, timeout=60)
        for i in range(12):
            r = api.completions.create(model=MODEL, prompt="price this prompt " * (i + 1), max_tokens=3 + i)
            answers.append(r.usage)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and len(store.usage("serve1")) < len(answers):
            time.sleep(0.2)
    finally:
        h.stop()
    ended = datetime.now(UTC)
    for inst in plan.instances:
        store.update_node(f"node-{inst.id}", status="terminated", terminated_at=ended.isoformat())

    res = subprocess.run([thunderops_cli, "report", "serve1", "--format", "json"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    totals = {t["metric"]: t for t in json.loads(res.stdout)["tables"]["totals"]}
    prompt = sum(u.prompt_tokens for u in answers)
    output = sum(u.completion_tokens for u in answers)
    assert totals["requests"]["value"] == 12
    assert (totals["prompt tokens"]["value"], totals["output tokens"]["value"]) == (prompt, output)
    hours = Decimal((ended - launched) // timedelta(microseconds=1)) / Decimal(3_600_000_000)
    prefill_cost = (Decimal("1.25") + Decimal("2.5")) * hours
    decode_cost = (Decimal("3.0") + Decimal("4.75")) * hours
    assert Decimal(totals["spend"]["value"]) == (prefill_cost + decode_cost).quantize(Decimal("0.000001"))
    got = Decimal(totals["$ per 1M prompt tokens"]["value"])
    assert abs(got - prefill_cost * 1_000_000 / prompt) <= Decimal("0.000001")
    got = Decimal(totals["$ per 1M output tokens"]["value"])
    assert abs(got - decode_cost * 1_000_000 / output) <= Decimal("0.000001")
