"""Engines serve HTTPS with the deployment's certificate, and the router, the serving step and the controller
trust that one certificate: real TLS between real processes (the engine emulator speaks vLLM's HTTP API and
takes vLLM's --ssl-certfile/--ssl-keyfile)."""

from __future__ import annotations

import asyncio
import os
import signal
import ssl
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from aiohttp import web

from thunderops.agent import client_tls, deployment_tls, make_tls_pair
from thunderops.serve import free_port, serve_module_argv
from thunderops.serve.upstream import UpstreamError, UpstreamPool


def write_pair(d: Path, name: str = "dep") -> tuple[str, str, str]:
    """A deployment-style pair on disk: (certificate PEM, cert file, key file)."""
    cert, key = make_tls_pair(name)
    (d / f"{name}-cert.pem").write_text(cert)
    (d / f"{name}-key.pem").write_text(key)
    return cert, str(d / f"{name}-cert.pem"), str(d / f"{name}-key.pem")


def test_upstream_pool_speaks_https_to_the_pinned_certificate_only(tmp_path):
    cert, cert_file, key_file = write_pair(tmp_path)
    other, _, _ = write_pair(tmp_path, "other")

    async def run() -> None:
        async def echo(req: web.Request) -> web.Response:
            return web.Response(body=(await req.read())[::-1])

        app = web.Application()
        app.router.add_post("/echo", echo)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server.load_cert_chain(cert_file, key_file)
        await web.TCPSite(runner, "127.0.0.1", port, ssl_context=server).start()
        good = UpstreamPool(f"https://127.0.0.1:{port}", ssl=client_tls(cert))
        bad = UpstreamPool(f"https://127.0.0.1:{port}", ssl=client_tls(other))
        plain = UpstreamPool(f"http://127.0.0.1:{port}")
        try:
            assert await good.request("POST", "/echo", b"abc") == (200, b"cba")
            assert await good.request("POST", "/echo", b"xyz") == (200, b"zyx")  # the TLS connection is kept
            assert len(good.idle) == 1
            with pytest.raises(UpstreamError):  # an impostor's (or any other) certificate is refused
                await bad.request("POST", "/echo", b"abc")
            with pytest.raises((UpstreamError, TimeoutError)):  # plain HTTP to a TLS port gets no answer
                await asyncio.wait_for(plain.request("POST", "/echo", b"abc"), 5)
        finally:
            for p in (good, bad, plain):
                p.close()
            await runner.cleanup()

    asyncio.run(run())


def _wait(url: str, verify, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=1.0, verify=verify) as http:
        while time.monotonic() < deadline:
            try:
                if http.get(url).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
    raise AssertionError(f"{url} not healthy")


@pytest.fixture
def procs():
    started: list[subprocess.Popen] = []
    yield started
    for p in started:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for p in started:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)


def _start(procs: list, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    p = subprocess.Popen(serve_module_argv(*args), env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    procs.append(p)
    return p


def test_router_reaches_https_engines_by_the_deployments_certificate(tmp_path, procs):
    """An OpenAI client talks to the router; the router talks HTTPS to an engine serving the deployment's
    certificate, and refuses an engine serving another one (no healthy route: 503)."""
    import openai

    cert, cert_file, key_file = write_pair(tmp_path)
    other_cert, other_file, other_key = write_pair(tmp_path, "other")
    engine_port, impostor_port = free_port(), free_port()
    for port, (c, k) in ((engine_port, (cert_file, key_file)), (impostor_port, (other_file, other_key))):
        _start(procs, ["emulator", "--port", str(port), "--model", "llama3-8b", "--ssl-certfile", c,
                       "--ssl-keyfile", k], {"THUNDEROPS_ENGINE_KEY": "ek"})
    _wait(f"https://127.0.0.1:{engine_port}/health", client_tls(cert))
    _wait(f"https://127.0.0.1:{impostor_port}/health", client_tls(other_cert))
    with httpx.Client(timeout=2.0) as http:  # the engine speaks TLS only
        with pytest.raises(httpx.HTTPError):
            http.get(f"http://127.0.0.1:{engine_port}/health")
    routers = {}
    for name, port in (("good", engine_port), ("impostor", impostor_port)):
        rport = free_port()
        _start(procs, ["router", "--model", "llama3-8b", "--port", str(rport), "--engine-cert", cert_file,
                       "--plan", str(_one_group_plan(tmp_path)), "--endpoint", f"g0=https://127.0.0.1:{port}"],
               {"THUNDEROPS_API_KEY": "k", "THUNDEROPS_ENGINE_KEY": "ek"})
        routers[name] = f"http://127.0.0.1:{rport}"
    _wait(routers["good"] + "/health", True)
    client = openai.OpenAI(base_url=routers["good"] + "/v1", api_key="k")
    out = client.completions.create(model="llama3-8b", prompt="hello there", max_tokens=5)
    assert out.usage.completion_tokens == 5
    deadline = time.monotonic() + 30
    status = 0
    while time.monotonic() < deadline:
        try:
            status = httpx.get(routers["impostor"] + "/health", timeout=2).status_code
            if status == 503:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    assert status == 503  # the router never trusts the impostor's certificate


def _one_group_plan(d: Path) -> Path:
    from test_serve_plans import node

    from thunderops.plan import Group, Plan, Route, Stage

    plan = Plan(model="llama3-8b", budget_per_hour=1, cost_per_hour=1, instances=[node("n0")],
                groups=[Group("g0", "colocated", [Stage("n0", "A100", 1, 32)])], routing=[Route("g0", "g0", 1.0)],
                inputs={"max_model_len": 4096})
    path = d / "plan.json"
    plan.save(path)
    return path


def test_node_engines_wait_for_https_engines_of_a_deployment_with_a_pair(tmp_path, procs):
    """The serving step's launcher names the engines https:// where the deployment has a TLS pair and waits
    for them through that certificate (the controller's reprovisioning uses the same launcher)."""
    from test_serve_plans import node

    from thunderops.controller.engines import NodeEngines
    from thunderops.plan import Group, Plan, Route, Stage
    from thunderops.provision import Node, Ports

    cert, key = deployment_tls("d7")  # made as `up` makes it
    (tmp_path / "c.pem").write_text(cert)
    (tmp_path / "k.pem").write_text(key)
    port = free_port()
    _start(procs, ["emulator", "--port", str(port), "--ssl-certfile", str(tmp_path / "c.pem"), "--ssl-keyfile",
                   str(tmp_path / "k.pem")])
    plan = Plan(model="llama3-8b", budget_per_hour=1, cost_per_hour=1, instances=[node("n0")],
                groups=[Group("g0", "colocated", [Stage("n0", "A100", 1, 32)])], routing=[Route("g0", "g0", 1.0)])
    nodes = {"n0": Node("x", "d7", "n0", "c", "127.0.0.1", "A100", 1, "ready", Ports(engine=port))}
    urls = NodeEngines(timeout_s=60).start("d7", plan, ["g0"], nodes)
    assert urls == {"g0": f"https://127.0.0.1:{port}"}


def test_engine_tasks_serve_https_with_the_deployments_pair():
    from test_ray_cluster import spanning_plan

    from thunderops.provision.tasks import ENGINE_TLS_FILES, engine_task, router_task

    plan = spanning_plan()
    with_tls = engine_task(plan, plan.instances[0], deployment="d1", node_id="n", cluster="c",
                           agent_tls=("CERT", "KEY"))
    lines = [ln for ln in with_tls["run"].splitlines() if "vllm serve" in ln]
    assert lines and all(f"--ssl-certfile {ENGINE_TLS_FILES[0]} --ssl-keyfile {ENGINE_TLS_FILES[1]}" in ln
                         for ln in lines)
    assert "THUNDEROPS_AGENT_TLS_KEY" in with_tls["run"] and with_tls["secrets"]["THUNDEROPS_AGENT_TLS_KEY"] == "KEY"
    assert "KEY" not in with_tls["run"].replace("THUNDEROPS_AGENT_TLS_KEY", "")  # the key only as a secret
    plain = engine_task(plan, plan.instances[0], deployment="d1", node_id="n", cluster="c")
    assert "--ssl-certfile" not in plain["run"]
    router = router_task(plan, deployment="d1", plan_path="p.json", engine_cert="cert.pem")
    assert "--engine-cert" in router["run"] and "=https://" in router["run"]
    assert "https://" not in router_task(plan, deployment="d1", plan_path="p.json")["run"]


@pytest.mark.parametrize("content", [None, "not a certificate"])
def test_router_refuses_an_unusable_engine_cert(tmp_path, content):
    cert = tmp_path / "engine.pem"
    if content is not None:
        cert.write_text(content)
    r = subprocess.run(serve_module_argv("router", "--plan", str(_one_group_plan(tmp_path)), "--endpoint",
                                         "g0=https://127.0.0.1:1", "--engine-cert", str(cert)),
                       capture_output=True, text=True, timeout=60, env={**os.environ, "THUNDEROPS_API_KEY": "k"})
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr and "certificate" in r.stderr


@pytest.mark.parametrize("flags,needle", [
    (["--ssl-certfile", "CERT"], "go together"),
    (["--ssl-certfile", "CERT", "--ssl-keyfile", "MISSING"], "no such certificate or key file"),
])
def test_emulator_bad_tls_flags_one_line_exit_2(tmp_path, flags, needle):
    cert, cert_file, _ = write_pair(tmp_path)
    args = [cert_file if f == "CERT" else str(tmp_path / "missing.pem") if f == "MISSING" else f for f in flags]
    port = free_port()
    r = subprocess.run(serve_module_argv("emulator", "--port", str(port), *args), capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_router_serves_its_own_api_over_https(tmp_path, procs):
    """`serve router --ssl-certfile/--ssl-keyfile`: an OpenAI client that trusts the router's certificate gets
    completions over HTTPS; plain HTTP to that port gets no answer, and a client trusting another certificate
    is refused before any API key is sent."""
    import openai

    cert, cert_file, key_file = write_pair(tmp_path, "router")
    other, _, _ = write_pair(tmp_path, "other")
    engine_port, rport = free_port(), free_port()
    _start(procs, ["emulator", "--port", str(engine_port), "--model", "llama3-8b"])
    _start(procs, ["router", "--port", str(rport), "--plan", str(_one_group_plan(tmp_path)),
                   "--endpoint", f"g0=http://127.0.0.1:{engine_port}", "--ssl-certfile", cert_file,
                   "--ssl-keyfile", key_file], {"THUNDEROPS_API_KEY": "k"})
    base = f"https://127.0.0.1:{rport}"
    _wait(base + "/health", client_tls(cert))
    with httpx.Client(verify=client_tls(cert), timeout=30) as http:
        out = openai.OpenAI(base_url=base + "/v1", api_key="k", http_client=http).chat.completions.create(
            model="llama3-8b", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert out.usage.completion_tokens == 4
    with httpx.Client(timeout=2.0) as plain, pytest.raises(httpx.HTTPError):
        plain.get(f"http://127.0.0.1:{rport}/health")
    with httpx.Client(verify=client_tls(other), timeout=5) as impostor, pytest.raises(httpx.ConnectError):
        impostor.get(base + "/v1/models", headers={"Authorization": "Bearer k"})


@pytest.mark.parametrize("flags,needle", [
    (["--ssl-keyfile", "KEY"], "go together"),
    (["--ssl-certfile", "CERT", "--ssl-keyfile", "MISSING"], "no such certificate or key file"),
    (["--ssl-certfile", "CERT", "--ssl-keyfile", "OTHERKEY"], "not a PEM certificate and its key"),
])
def test_router_bad_tls_flags_one_line_exit_2_before_any_key_is_made(tmp_path, flags, needle):
    _, cert_file, key_file = write_pair(tmp_path)
    _, _, other_key = write_pair(tmp_path, "other")
    files = {"CERT": cert_file, "KEY": key_file, "OTHERKEY": other_key, "MISSING": str(tmp_path / "missing.pem")}
    env = {k: v for k, v in os.environ.items() if k != "THUNDEROPS_API_KEY"}
    r = subprocess.run(serve_module_argv("router", "--plan", str(_one_group_plan(tmp_path)), "--endpoint",
                                         "g0=http://127.0.0.1:1", "--port", str(free_port()),
                                         *[files.get(f, f) for f in flags]),
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in r.stderr
    assert "API key" not in r.stderr  # refused before a key was generated and printed
