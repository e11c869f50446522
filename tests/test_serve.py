"""End to end: the official `openai` client -> our router process -> engine emulator processes (real HTTP,
real processes), for a plan with two prefill and two decode groups."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request

import httpx
import openai
import pytest
from test_serve_plans import pd_plan

from thunderops.serve import ServingHandle, start_local
from thunderops.serve.emulator import count_tokens, filler

MODEL = "meta-llama/Llama-3.1-8B"
FRACTIONS = (0.4, 0.1, 0.2, 0.3)
PAIRS = [("p0", "d0"), ("p0", "d1"), ("p1", "d0"), ("p1", "d1")]


@pytest.fixture(scope="module")
def fast(tmp_path_factory) -> ServingHandle:
    """Zero-delay emulators: protocol and routing tests."""
    h = start_local(pd_plan(FRACTIONS), delay_scale=0, workdir=tmp_path_factory.mktemp("fast"))
    yield h
    h.stop()


@pytest.fixture
def timed(tmp_path) -> ServingHandle:
    """Emulators timed by the performance model (A100, Llama-3.1-8B): a 100-token stream takes ~1-2 s."""
    h = start_local(pd_plan(FRACTIONS), delay_scale=1.0, workdir=tmp_path / "serve")
    yield h
    h.stop()


def client(h: ServingHandle, key: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(base_url=h.endpoint, api_key=key or h.api_key, max_retries=0, timeout=60)


def http(h: ServingHandle, method: str, path: str, body: object = None, key: str | None = "api",
         raw: bytes | None = None, base: str | None = None, request_id: str | None = None) -> tuple[int, dict, dict]:
    """A plain HTTP call (for what the openai client will not send). Returns status, JSON body, headers."""
    headers = {"Content-Type": "application/json"}
    if request_id:
        headers["X-Request-Id"] = request_id
    if key == "api":
        headers["Authorization"] = f"Bearer {h.api_key}"
    elif key:
        headers["Authorization"] = f"Bearer {key}"
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request((base or h.admin_url) + path, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read() or b"null"), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null"), dict(e.headers)


def usage_records(h: ServingHandle, n: int) -> list[dict]:
    status, body, _ = http(h, "GET", f"/admin/usage?records={n}")
    assert status == 200
    return body["records"]


# ---- the OpenAI API through the router ------------------------------------------------------------------

def test_completion_non_streaming(fast):
    r = client(fast).completions.create(model=MODEL, prompt="The ships sail at dawn", max_tokens=7)
    prompt_tokens = count_tokens("The ships sail at dawn")
    assert r.choices[0].text == "".join(filler(prompt_tokens, 7))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (prompt_tokens, 7)
    assert r.choices[0].finish_reason == "length"


def test_chat_streaming_matches_non_streaming(fast):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three harbors."}]
    c = client(fast)
    whole = c.chat.completions.create(model="llama3-8b", messages=msgs, max_tokens=12)
    chunks = list(c.chat.completions.create(model="llama3-8b", messages=msgs, max_tokens=12, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content and count_tokens(text) == 12
    assert chunks[-1].usage.completion_tokens == 12 and chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert len({ch.id for ch in chunks}) == 1
    # without include_usage the client gets no usage anywhere, as from vLLM
    plain = list(c.chat.completions.create(model="llama3-8b", messages=msgs, max_tokens=3, stream=True))
    assert all(ch.usage is None for ch in plain) and all(ch.choices for ch in plain)


def test_completion_streaming(fast):
    chunks = list(client(fast).completions.create(model=MODEL, prompt="one two", max_tokens=5, stream=True))
    assert [ch.choices[0].text for ch in chunks] == filler(2, 5)
    assert chunks[-1].choices[0].finish_reason == "length"


def test_models_lists_the_served_names(fast):
    ids = {m.id for m in client(fast).models.list()}
    assert MODEL in ids and "Llama-3.1-8B" in ids
    for name in ids:  # every listed name is served end to end
        assert client(fast).completions.create(model=name, prompt="hi", max_tokens=1).model == name


# ---- several sequences per request (n > 1, batched prompts): one engine request each, merged ----------

def test_n_samples_come_back_as_n_choices_with_one_prompt_counted(fast):
    msgs = [{"role": "user", "content": "Name a harbor."}]
    c = client(fast)
    one = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=4)
    r = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=4, n=3, seed=7)
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    assert all(ch.message.content == one.choices[0].message.content for ch in r.choices)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (one.usage.prompt_tokens, 12)
    rec = usage_records(fast, 1)[-1]
    assert (rec["prompt_tokens"], rec["output_tokens"]) == (one.usage.prompt_tokens, 12)
    assert len(rec["replicas"]) == 6  # each sample went through a prefill and a decode engine
    # the engines never saw n > 1: the emulator refuses it, as vLLM's disaggregated flow cannot hand it over
    status, out, _ = http(fast, "POST", "/v1/chat/completions", {"model": MODEL, "messages": msgs, "n": 2},
                          key=fast.engine_key, base=fast.engine_urls["d0"])
    assert status == 400 and "one sequence" in out["error"]["message"]


def test_batched_prompts_are_numbered_prompt_times_n_plus_sample(fast):
    prompts = ["one two", "three four five six"]
    r = client(fast).completions.create(model=MODEL, prompt=prompts, max_tokens=3, n=2)
    assert [ch.index for ch in r.choices] == [0, 1, 2, 3]
    assert [ch.text for ch in r.choices] == ["".join(filler(count_tokens(prompts[i // 2]), 3)) for i in range(4)]
    assert r.usage.prompt_tokens == count_tokens(prompts[0]) + count_tokens(prompts[1])
    assert r.usage.completion_tokens == 12


def test_a_streamed_request_for_n_samples_streams_every_choice(fast):
    msgs = [{"role": "user", "content": "Name three harbors."}]
    chunks = list(client(fast).chat.completions.create(model=MODEL, messages=msgs, max_tokens=5, n=3, stream=True,
                                                       stream_options={"include_usage": True}))
    texts: dict[int, str] = collections.defaultdict(str)
    for ch in chunks:
        for c in ch.choices:
            texts[c.index] += c.delta.content or ""
    whole = client(fast).chat.completions.create(model=MODEL, messages=msgs, max_tokens=5).choices[0].message.content
    assert dict(texts) == {0: whole, 1: whole, 2: whole}
    assert len({ch.id for ch in chunks}) == 1
    usage_chunks = [ch for ch in chunks if ch.usage is not None]
    assert len(usage_chunks) == 1 and chunks[-1] is usage_chunks[0] and not chunks[-1].choices
    assert chunks[-1].usage.completion_tokens == 15


@pytest.mark.parametrize("n", [0, -1, 1.5, "2", True])
def test_a_bad_n_is_400(fast, n):
    status, out, _ = http(fast, "POST", "/v1/completions", {"model": MODEL, "prompt": "hi", "n": n})
    assert status == 400 and out["error"]["param"] == "n"


# ---- the P/D protocol -----------------------------------------------------------------------------------

def test_pd_flow_prefill_then_decode_with_kv_params(fast):
    client(fast).completions.create(model=MODEL, prompt="x " * 40, max_tokens=2)
    rec = usage_records(fast, 1)[-1]
    assert rec["prefill_replica"] in ("p0", "p1") and rec["decode_replica"] in ("d0", "d1")
    assert rec["prompt_tokens"] == 40 and rec["output_tokens"] == 2 and rec["status"] == 200
    assert rec["started_at"] <= rec["first_token_at"] <= rec["finished_at"]

    decode, prefill = fast.engine_urls["d0"], fast.engine_urls["p0"]
    body = {"model": MODEL, "prompt": "x " * 40, "max_tokens": 2}
    # engines run as kv_both (so phases can flip): one serves a plain request itself, and refuses
    # kv_transfer_params that do not cover the prompt
    status, out, _ = http(fast, "POST", "/v1/completions", body, key=fast.engine_key, base=decode)
    assert status == 200 and out["usage"]["completion_tokens"] == 2
    bogus = {"do_remote_prefill": True, "remote_engine_id": "e", "remote_host": "h", "remote_port": 1,
             "remote_block_ids": [0]}
    status, _, _ = http(fast, "POST", "/v1/completions", {**body, "kv_transfer_params": bogus}, key=fast.engine_key,
                        base=decode)
    assert status == 400
    # with the params a prefill engine returned for this prompt, it decodes
    status, pre, _ = http(fast, "POST", "/v1/completions", {**body, "kv_transfer_params": {"do_remote_decode": True}},
                          key=fast.engine_key, base=prefill, request_id="flow-1")
    assert status == 200 and pre["usage"]["completion_tokens"] == 1
    kv = pre["kv_transfer_params"]
    assert kv["do_remote_prefill"] is True and len(kv["remote_block_ids"]) == 3  # 40 tokens / 16 per block
    # under the prefill leg's X-Request-Id only: NIXL's push mode pairs the two legs by it (the router sends
    # one per flow on both legs, which every routed request above went through)
    for rid in (None, "flow-2"):
        status, out, _ = http(fast, "POST", "/v1/completions", {**body, "kv_transfer_params": kv},
                              key=fast.engine_key, base=decode, request_id=rid)
        assert status == 400 and "X-Request-Id" in out["error"]["message"]
    status, out, _ = http(fast, "POST", "/v1/completions", {**body, "kv_transfer_params": kv}, key=fast.engine_key,
                          base=decode, request_id="flow-1")
    assert status == 200 and out["usage"]["completion_tokens"] == 2
    # and engines refuse callers without the engine key
    assert http(fast, "POST", "/v1/completions", body, key=fast.api_key, base=decode)[0] == 401


def test_routing_fractions_over_2000_requests(fast):
    async def run() -> None:
        headers = {"Authorization": f"Bearer {fast.api_key}"}
        body = {"model": MODEL, "prompt": "route me", "max_tokens": 1}
        async with httpx.AsyncClient(base_url=fast.endpoint, headers=headers, timeout=60) as c:
            sem = asyncio.Semaphore(16)

            async def one() -> None:
                async with sem:
                    r = await c.post("/completions", json=body)
                    assert r.status_code == 200

            await asyncio.gather(*(one() for _ in range(2000)))

    asyncio.run(run())
    recs = usage_records(fast, 2000)
    assert len(recs) == 2000
    seen = collections.Counter((r["prefill_replica"], r["decode_replica"]) for r in recs)
    for pair, want in zip(PAIRS, FRACTIONS, strict=True):
        assert abs(seen[pair] / 2000 - want) < 0.03, (pair, seen[pair] / 2000, want)


def test_a_long_prompt_weighs_on_its_prefill_replica_until_its_answer(timed):
    """The router's load gauge shows a long prompt in prefill as many mean prompts (what it steers by), the
    request gauge as one request; both return exactly to zero once the requests are answered."""
    c = client(timed)
    for _ in range(20):  # the router's mean prompt: a few words
        c.completions.create(model=MODEL, prompt="a short prompt of words", max_tokens=1)
    long_prompt = " ".join(["word"] * 3000)
    done = threading.Event()
    threading.Thread(target=lambda: (c.completions.create(model=MODEL, prompt=long_prompt, max_tokens=2),
                                     done.set()), daemon=True).start()
    peak: dict[str, float] = {}
    while not done.wait(0.01):
        for rid, v in _inflight(timed, "load").items():
            if rid.startswith("p"):
                peak[rid] = max(peak.get(rid, 0.0), v)
    assert max(peak.values()) >= 20  # ~15,000 characters against a mean of ~25
    assert set(_inflight(timed).values()) == set(_inflight(timed, "load").values()) == {0.0}


# ---- bad input ------------------------------------------------------------------------------------------

def test_missing_or_wrong_key_is_401(fast):
    body = {"model": MODEL, "prompt": "hi"}
    assert http(fast, "POST", "/v1/completions", body, key=None)[0] == 401
    status, err, _ = http(fast, "POST", "/v1/completions", body, key="wrong-key")
    assert status == 401 and err["error"]["type"] == "AuthenticationError"
    with pytest.raises(openai.AuthenticationError):
        client(fast, key="nope").completions.create(model=MODEL, prompt="hi")


def test_malformed_json_is_400_with_an_openai_error_body(fast):
    status, err, _ = http(fast, "POST", "/v1/chat/completions", raw=b'{"model": "x", "messages": [')
    assert status == 400 and set(err["error"]) >= {"message", "type", "code"} and err["error"]["code"] == 400
    assert http(fast, "POST", "/v1/completions", raw=b"[1, 2]")[0] == 400


def test_the_model_answers_to_the_name_it_was_planned_by(fast):
    """`thunderops plan --model llama-3.1-8b` plans "Llama-3.1-8B"; clients call it by any catalog name of it
    (case and separators aside), and the engines, which answer only to their --served-model-name list, get
    their own first name."""
    served = [m.id for m in client(fast).models.list()]
    for name in ("llama-3.1-8b", "LLAMA 3.1 8B", "llama3.1-8b", "Llama-3.1-8b"):
        assert name not in served
        r = client(fast).completions.create(model=name, prompt="hi", max_tokens=2)
        assert r.model == served[0] and r.usage.completion_tokens == 2
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client(fast).completions.create(model="llama-3.1-70b", prompt="hi")  # another catalog model


def test_unknown_model_is_404(fast):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client(fast).completions.create(model="gpt-17", prompt="hi")


def test_prompt_longer_than_max_model_len_is_400(fast):
    with pytest.raises(openai.BadRequestError, match="maximum context length is 4096"):
        client(fast).completions.create(model=MODEL, prompt="word " * 5000, max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client(fast).completions.create(model=MODEL, prompt=[1] * 5000, max_tokens=4)


def test_health_counts_only_routes_that_carry_traffic(fast):
    """Healthy replicas whose routes have fraction 0 serve nothing: with the only route that carries traffic
    through a dead replica, /health is 503 (and requests get 503), as picking would find no pair."""
    status, original, _ = http(fast, "GET", "/admin/routing")
    assert status == 200
    idle = [{**r, "fraction": 0.0} for r in original["routes"]]
    table = {"version": 98, "replicas": original["replicas"] + [{"id": "gone-d", "url": "http://127.0.0.1:9",
                                                                "phase": "decode"}],
             "routes": idle + [{"prefill": original["routes"][0]["prefill"], "decode": "gone-d", "fraction": 1.0}]}
    try:
        assert http(fast, "POST", "/admin/routing", table)[0] == 200
        status, _, _ = http(fast, "POST", "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 1})
        assert status == 503
        assert http(fast, "GET", "/health", key=None)[0] == 503
    finally:
        assert http(fast, "POST", "/admin/routing", original)[0] == 200
    assert http(fast, "GET", "/health", key=None)[0] == 200


def test_no_healthy_replica_is_503_with_retry_after_and_routing_swaps_back(fast):
    status, original, _ = http(fast, "GET", "/admin/routing")
    assert status == 200
    dead = {"version": 99, "replicas": [{"id": "gone-p", "url": "http://127.0.0.1:9", "phase": "prefill"},
                                        {"id": "gone-d", "url": "http://127.0.0.1:9", "phase": "decode"}],
            "routes": [{"prefill": "gone-p", "decode": "gone-d", "fraction": 1.0}]}
    assert http(fast, "POST", "/admin/routing", dead, key="wrong")[0] == 401
    assert http(fast, "POST", "/admin/routing", {"replicas": [], "routes": [{"prefill": "a"}]})[0] == 400
    assert http(fast, "POST", "/admin/routing", dead)[0] == 200
    try:
        status, err, headers = http(fast, "POST", "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 1})
        assert status == 503 and int(headers["Retry-After"]) > 0 and err["error"]["code"] == 503
        assert http(fast, "GET", "/health", key=None)[0] == 503
    finally:
        assert http(fast, "POST", "/admin/routing", original)[0] == 200
    assert client(fast).completions.create(model=MODEL, prompt="back", max_tokens=1).usage.completion_tokens == 1


def test_a_reschedule_that_flips_phases_is_served_without_restarting_engines(fast):
    """Engines run as kv_both (role both), as vLLM's are: a new table that makes a decode group prefill and a
    prefill group decode (and one group colocated) serves at once."""
    status, original, _ = http(fast, "GET", "/admin/routing")
    flipped = {**original, "version": original["version"] + 1,
               "routes": [{"prefill": "d0", "decode": "p0", "fraction": 0.5},
                          {"prefill": "p1", "decode": "p1", "fraction": 0.5}]}
    assert http(fast, "POST", "/admin/routing", flipped)[0] == 200
    try:
        c = client(fast)
        for i in range(12):
            out = c.completions.create(model=MODEL, prompt=f"flipped {i}", max_tokens=5, stream=i % 2 == 1)
            if i % 2:
                assert sum(1 for ch in out if ch.choices) == 5
            else:
                assert out.usage.completion_tokens == 5
        recs = usage_records(fast, 12)
        assert all(r["status"] == 200 for r in recs), recs
        assert {(r["prefill_replica"], r["decode_replica"]) for r in recs} == {("d0", "p0"), (None, "p1")}  # colocated: no prefill leg
    finally:
        original["version"] = flipped["version"] + 1
        assert http(fast, "POST", "/admin/routing", original)[0] == 200


def test_metrics_expose_token_totals(fast):
    client(fast).completions.create(model=MODEL, prompt="count me", max_tokens=3)
    with urllib.request.urlopen(fast.admin_url + "/metrics") as r:
        text = r.read().decode()
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line and not line.startswith("#")}
    assert values["thunderops_router_output_tokens_total"] >= 3
    assert values['thunderops_router_requests_total{status="200"}'] >= 1
    status, usage, _ = http(fast, "GET", "/admin/usage")
    assert usage["totals"]["output_tokens"] == values["thunderops_router_output_tokens_total"]


# ---- failures -------------------------------------------------------------------------------------------

def _inflight(h: ServingHandle, gauge: str = "inflight") -> dict[str, float]:
    """A per-replica gauge of the router's /metrics: `inflight` (requests) or `load` (request-equivalents)."""
    with urllib.request.urlopen(h.admin_url + "/metrics") as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith(f"thunderops_replica_{gauge}{{"):
            out[line.split('"')[1]] = float(line.split()[-1])
    return out


def test_killing_a_decode_engine_mid_stream_loses_no_request(timed):
    """Eight concurrent streams; the decode engine serving some of them is SIGKILLed mid-stream. Every stream
    ends with all its tokens, exactly the text an uninterrupted stream gives (request migration)."""
    n, max_tokens = 8, 80
    prompts = [f"stream number {i} please" for i in range(n)]
    results: dict[int, list[str]] = {}
    c = client(timed)

    def run(i: int) -> None:
        stream = c.completions.create(model=MODEL, prompt=prompts[i], max_tokens=max_tokens, stream=True)
        results[i] = [ch.choices[0].text for ch in stream if ch.choices]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 20
    victim = None
    while time.monotonic() < deadline and victim is None:
        busy = {k: v for k, v in _inflight(timed).items() if k.startswith("d") and v > 0}
        if busy:
            victim = max(busy, key=busy.get)
        time.sleep(0.05)
    assert victim is not None, "no decode replica ever had a stream in flight"
    time.sleep(0.3)  # let some tokens reach the clients first
    os.kill(timed.engine_pids[victim], signal.SIGKILL)
    for t in threads:
        t.join(60)
    assert sorted(results) == list(range(n))
    for i in range(n):
        assert "".join(results[i]) == "".join(filler(count_tokens(prompts[i]), max_tokens)), i
    recs = usage_records(timed, n)
    assert sum(r["migrations"] for r in recs) >= 1
    assert all(r["output_tokens"] == max_tokens and r["status"] == 200 for r in recs)
    migrated = [r for r in recs if r["migrations"]]
    assert all(victim in r["replicas"] and r["decode_replica"] != victim for r in migrated)
    assert set(_inflight(timed).values()) == set(_inflight(timed, "load").values()) == {0.0}  # books balanced


def test_chat_stream_migrates_with_continue_final_message(timed):
    msgs = [{"role": "user", "content": "tell a long story"}]
    c = client(timed)
    expected = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=60).choices[0].message.content
    got: list[str] = []
    stream = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=60, stream=True)
    killed = None
    for ch in stream:
        if ch.choices and ch.choices[0].delta.content:
            got.append(ch.choices[0].delta.content)
        if len(got) == 10 and killed is None:
            busy = [k for k, v in _inflight(timed).items() if k.startswith("d") and v > 0]
            killed = busy[0]
            os.kill(timed.engine_pids[killed], signal.SIGKILL)
    assert killed is not None
    assert "".join(got) == expected


def test_failed_prefill_is_retried_on_another_replica(timed):
    os.kill(timed.engine_pids["p0"], signal.SIGKILL)
    c = client(timed)
    for i in range(20):
        assert c.completions.create(model=MODEL, prompt=f"retry {i}", max_tokens=2).usage.completion_tokens == 2
    recs = usage_records(timed, 20)
    assert all(r["prefill_replica"] == "p1" for r in recs)
    assert sum(r["prefill_retries"] for r in recs) >= 1


def test_routing_swap_while_requests_are_in_flight(timed):
    c = client(timed)
    done: list[int] = []

    def run(i: int) -> None:
        stream = c.completions.create(model=MODEL, prompt=f"long {i}", max_tokens=60, stream=True)
        done.append(sum(1 for ch in stream if ch.choices))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    status, table, _ = http(timed, "GET", "/admin/routing")
    table["routes"] = [{"prefill": "p1", "decode": "d1", "fraction": 1.0}]
    table["version"] += 1
    assert http(timed, "POST", "/admin/routing", table)[0] == 200
    for i in range(10):
        c.completions.create(model=MODEL, prompt=f"after {i}", max_tokens=1)
    for t in threads:
        t.join(60)
    assert done == [60] * 6
    after = [r for r in usage_records(timed, 16) if not r["stream"]]
    assert len(after) == 10 and all((r["prefill_replica"], r["decode_replica"]) == ("p1", "d1") for r in after)


def test_usage_is_written_to_the_state_store(tmp_path):
    from thunderops.state import Store

    db = tmp_path / "state.db"
    store = Store(db)
    store.create_deployment("dep1", provider="local", model="llama3-8b")
    h = start_local(pd_plan(FRACTIONS), delay_scale=0, usage_db=str(db), deployment="dep1", workdir=tmp_path / "serve")
    try:
        for i in range(5):
            client(h).completions.create(model=MODEL, prompt=f"bill me {i}", max_tokens=4)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(store.usage("dep1")) < 5:
            time.sleep(0.2)
    finally:
        h.stop()
    rows = store.usage("dep1")
    assert len(rows) == 5 and all(r.output_tokens == 4 and r.prompt_tokens == 3 for r in rows)
    assert {r.prefill for r in rows} <= {"p0", "p1"} and {r.decode for r in rows} <= {"d0", "d1"}


def test_a_client_hanging_up_mid_stream_is_not_an_engine_failure(timed):
    headers = {"Authorization": f"Bearer {timed.api_key}"}
    body = {"model": MODEL, "prompt": "hang up on me", "max_tokens": 200, "stream": True}
    with httpx.Client(base_url=timed.endpoint, headers=headers, timeout=30) as c:
        with c.stream("POST", "/completions", json=body) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(6)]
    assert any(line.startswith("data: ") for line in got)
    deadline = time.monotonic() + 10
    recs: list[dict] = []
    while time.monotonic() < deadline and not recs:
        recs = usage_records(timed, 1)
        time.sleep(0.1)
    assert recs and recs[0]["status"] == 499 and recs[0]["migrations"] == 0
    assert 0 < recs[0]["output_tokens"] < 200
    status, health, _ = http(timed, "GET", "/health", key=None)
    assert status == 200 and set(health["healthy_replicas"]) == {"p0", "p1", "d0", "d1"}


FAKE_VLLM = """#!{python}
# A stand-in `vllm` executable (the GPU boundary): checks the serve command line it is given, records it, and
# runs the engine emulator on the requested host and port with the key vLLM would read from VLLM_API_KEY.
import json, os, sys
argv = sys.argv[1:]
assert argv[:2] == ["serve", "meta-llama/Llama-3.1-8B"], argv
flags = {{argv[i]: argv[i + 1] for i in range(2, len(argv) - 1) if argv[i].startswith("--")}}
with open(os.path.join({log!r}, flags["--port"] + ".json"), "w") as f:
    json.dump({{"argv": argv, "nixl_port": os.environ.get("VLLM_NIXL_SIDE_CHANNEL_PORT")}}, f)
os.environ["THUNDEROPS_ENGINE_KEY"] = os.environ["VLLM_API_KEY"]
os.execv(sys.executable, [sys.executable, "-m", "thunderops.serve", "emulator", "--host", flags["--host"],
         "--port", flags["--port"], "--model", argv[1], "--max-model-len", flags["--max-model-len"], "--delay-scale", "0"])
"""


def test_start_local_with_vllm_runs_the_generated_command_lines(tmp_path, monkeypatch):
    import sys

    bin_dir, log = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    log.mkdir()
    exe = bin_dir / "vllm"
    exe.write_text(FAKE_VLLM.format(python=sys.executable, log=str(log)))
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    h = start_local(pd_plan(FRACTIONS), emulate=False, workdir=tmp_path / "serve")
    try:
        r = client(h).completions.create(model=MODEL, prompt="real command lines", max_tokens=3)
        assert r.usage.completion_tokens == 3
    finally:
        h.stop()
    calls = [json.loads(p.read_text()) for p in log.iterdir()]
    assert len(calls) == 4
    assert len({c["nixl_port"] for c in calls}) == 4  # one NIXL side channel per engine on this machine
    assert all(json.loads(c["argv"][c["argv"].index("--kv-transfer-config") + 1])["kv_connector"] == "NixlConnector"
               for c in calls)
