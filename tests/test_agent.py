"""The node agent as a real process: token auth, GPU inventory, preemption notices from a metadata double.

The helpers here (`AgentProcs`, `free_port`) are also used by test_netbench*.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

import pytest
from aiohttp import web

from thunderops.agent import client_tls, deployment_token, gpu_inventory, token_path
from thunderops.errors import NetbenchError
from thunderops.netbench import AgentEndpoint

TOKEN = "test-token-" + "x" * 20


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def get(url: str, token: str | None = TOKEN, timeout: float = 5.0, cert: str | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=client_tls(cert) if cert else None) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@dataclass
class AgentProc:
    name: str
    host: str
    port: int
    proc: subprocess.Popen
    token: str = TOKEN
    cert: str | None = None  # the certificate it serves HTTPS with (None: plain HTTP)

    @property
    def url(self) -> str:
        return f"{'https' if self.cert else 'http'}://{self.host}:{self.port}"

    def endpoint(self, token: str | None = None) -> AgentEndpoint:
        return AgentEndpoint(self.name, self.host, self.port, token or self.token,
                             client_tls(self.cert) if self.cert else None)


class _PortTaken(RuntimeError):
    """The agent's port was taken by another process before the agent bound it."""


@dataclass
class AgentProcs:
    """Starts real agent processes (python -m thunderops.agent) and kills them all at the end of the test."""

    procs: list[AgentProc] = field(default_factory=list)

    def start(self, name: str, *args: str, token: str = TOKEN, host: str = "127.0.0.1",
              cli: list[str] | None = None, env: dict[str, str] | None = None,
              tls: tuple[str, str] | None = None) -> AgentProc:
        """`tls`: (certificate, key) PEM handed over as on a provisioned node (THUNDEROPS_AGENT_TLS_*). A port
        that another process took between `free_port` and the agent's bind is tried again with new ports."""
        for attempt in range(3):
            try:
                return self._start(name, args, token, host, cli, env, tls)
            except _PortTaken:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _start(self, name, args, token, host, cli, env, tls) -> AgentProc:
        port = free_port(host)
        cmd = (cli or [sys.executable, "-m", "thunderops.agent"]) + [
            "--host", host, "--port", str(port), "--data-port", "0", "--iperf-port", str(free_port(host)),
            "--node", name, "--cloud", "none", *args]
        full_env = {**os.environ, "THUNDEROPS_AGENT_TOKEN": token, **(env or {})}
        if tls:
            full_env.update(THUNDEROPS_AGENT_TLS_CERT=tls[0], THUNDEROPS_AGENT_TLS_KEY=tls[1])
        proc = subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        agent = AgentProc(name, host, port, proc, token, tls[0] if tls else None)
        self.procs.append(agent)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                out = proc.stdout.read() if proc.stdout else ""
                if "address already in use" in out:
                    self.procs.remove(agent)
                    raise _PortTaken(out)
                raise RuntimeError(f"agent {name} exited: {out}")
            try:
                if get(agent.url + "/v1/health", token, timeout=1, cert=agent.cert)[0] == 200:
                    return agent
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"agent {name} did not come up in 30 s")

    def stop_all(self) -> None:
        for a in self.procs:
            if a.proc.poll() is None:
                try:
                    os.kill(a.proc.pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
                a.proc.terminate()
        for a in self.procs:
            try:
                a.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                a.proc.kill()
                a.proc.wait()
            if a.proc.stdout:
                a.proc.stdout.close()


# ---------------------------------------------------------------- auth, health, inventory


def test_health_needs_the_deployment_token(agents):
    # no nvidia-smi on its PATH, as on an emulated node (on a GPU machine the real inventory would win)
    a = agents.start("n1", "--gpu", "A100-80GB", "--gpus", "2", env={"PATH": "/nonexistent"})
    status, body = get(a.url + "/v1/health")
    assert status == 200
    assert body["node_id"] == "n1"
    assert body["gpus"]["source"] == "declared" and body["gpus"]["count"] == 2
    assert body["gpus"]["name"] == "A100-80GB"
    assert isinstance(body["data_port"], int) and body["data_port"] > 0
    for bad in ("wrong", TOKEN + "x", TOKEN[:-1], None):
        status, body = get(a.url + "/v1/health", token=bad)
        assert status == 401, bad
        assert "token" in body["error"]
    # every endpoint is behind the token, not only health
    req = urllib.request.Request(a.url + "/v1/sink", data=b"{}", method="POST", headers={"Authorization": "Bearer x"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=5)
    assert e.value.code == 401


def test_data_port_refuses_unknown_sessions(agents):
    a = agents.start("n1")
    _, h = get(a.url + "/v1/health")
    with socket.create_connection(("127.0.0.1", h["data_port"]), timeout=5) as s:
        s.sendall(b"TOBENCH1 E not-a-session\nhello")
        s.settimeout(5)
        assert s.recv(10) == b""  # closed without echoing


def test_cli_agent_serves_and_reads_the_token_file(agents, tmp_path, thunderops_cli):
    tf = tmp_path / "token"
    tf.write_text("file-token-123\n")
    a = agents.start("cli-node", "--token-file", str(tf), token="file-token-123", cli=[thunderops_cli, "agent"],
                     env={"THUNDEROPS_AGENT_TOKEN": "not-this-one"})
    assert get(a.url + "/v1/health", token="file-token-123")[0] == 200
    assert get(a.url + "/v1/health", token="not-this-one")[0] == 401


def test_cli_agent_without_a_token_is_one_line_exit_2(thunderops_cli):
    env = {k: v for k, v in os.environ.items() if k != "THUNDEROPS_AGENT_TOKEN"}
    r = subprocess.run([thunderops_cli, "agent", "--port", str(free_port())], env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2
    assert "THUNDEROPS_AGENT_TOKEN" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) <= 2  # one line (Rich may wrap it)


FAKE_SMI = """#!/bin/sh
# fake nvidia-smi: the GPU boundary double (prints what the real one prints for --query-gpu ... csv)
echo "0, NVIDIA H100 80GB HBM3, 81559, GPU-aaaa"
echo "1, NVIDIA H100 80GB HBM3, 81559, GPU-bbbb"
"""


def test_gpu_inventory_from_nvidia_smi_else_declared(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi at all
    assert gpu_inventory()["count"] == 0
    assert gpu_inventory("L4", 1) == {"source": "declared", "count": 1, "name": "L4",
                                      "gpus": [{"index": 0, "name": "L4"}]}
    smi = tmp_path / "nvidia-smi"
    smi.write_text(FAKE_SMI)
    smi.chmod(0o755)
    inv = gpu_inventory("L4", 1)  # a real inventory wins over the declared one
    assert inv["source"] == "nvidia-smi" and inv["count"] == 2
    assert inv["gpus"][1] == {"index": 1, "name": "NVIDIA H100 80GB HBM3", "memory_mib": 81559, "uuid": "GPU-bbbb"}
    smi.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    inv = gpu_inventory("L4", 1)
    assert inv["source"] == "declared" and "nvidia-smi failed" in inv["error"]


def test_deployment_token_is_private_and_stable(thunderops_home):
    t = deployment_token("dep1")
    assert len(t) >= 32 and deployment_token("dep1") == t and deployment_token("dep2") != t
    assert stat.S_IMODE(token_path("dep1").stat().st_mode) == 0o600


# ---------------------------------------------------------------- TLS


def test_deployment_tls_pair_is_private_stable_and_absent_until_made(thunderops_home):
    from thunderops.agent import deployment_tls, server_tls, tls_path

    assert deployment_tls("old-dep", create=False) is None  # deployments from before TLS: plain HTTP
    cert, key = deployment_tls("dep1")
    assert cert.startswith("-----BEGIN CERTIFICATE-----") and "PRIVATE KEY" in key and "CERTIFICATE" not in key
    assert deployment_tls("dep1") == (cert, key) and deployment_tls("dep2")[0] != cert
    assert stat.S_IMODE(tls_path("dep1").stat().st_mode) == 0o600
    server_tls(cert, key)  # a matching pair: loads
    with pytest.raises(NetbenchError, match="do not load"):
        server_tls(cert, deployment_tls("dep2")[1])


def test_agent_over_tls_trusts_only_the_deployment_certificate(agents, thunderops_home):
    from thunderops.agent import deployment_tls
    from thunderops.netbench import AgentCallError, call_agent

    pair, other = deployment_tls("tls-dep"), deployment_tls("another-dep")
    a = agents.start("tls-node", tls=pair)
    status, health = get(a.url + "/v1/health", cert=pair[0])
    assert status == 200 and health["tls"] is True
    assert get(a.url + "/v1/health", token="wrong", cert=pair[0])[0] == 401  # the token still guards it

    async def call(ep):
        import aiohttp

        async with aiohttp.ClientSession() as http:
            return await call_agent(http, ep, "GET", "/v1/health", timeout_s=5)

    assert asyncio.run(call(a.endpoint()))["tls"] is True
    impostor = AgentEndpoint(a.name, a.host, a.port, a.token, client_tls(other[0]))
    with pytest.raises(AgentCallError, match="TLS failed"):
        asyncio.run(call(impostor))
    with pytest.raises(AgentCallError):  # plain HTTP to a TLS agent gets nothing back
        asyncio.run(call(AgentEndpoint(a.name, a.host, a.port, a.token)))


def test_netbench_measures_between_tls_agents(agents, thunderops_home):
    from thunderops.agent import deployment_tls
    from thunderops.netbench import measure

    pair = deployment_tls("tls-bench")
    a, b = agents.start("a", tls=pair), agents.start("b", tls=pair)
    res = measure([a.endpoint(), b.endpoint()], duration_s=0.5, streams=2, tool="builtin", nccl=False)
    assert not res.unknown and res.pairs[0].gbps > 0


@pytest.mark.parametrize("env,needle", [
    ({"THUNDEROPS_AGENT_TLS_CERT": "not a pem"}, "THUNDEROPS_AGENT_TLS_KEY"),
    ({"THUNDEROPS_AGENT_TLS_CERT": "not a pem", "THUNDEROPS_AGENT_TLS_KEY": "nor this"}, "do not load"),
])
def test_agent_with_a_bad_tls_pair_is_one_line_exit_2(env, needle):
    r = subprocess.run([sys.executable, "-m", "thunderops.agent", "--port", str(free_port()), "--cloud", "none"],
                       env={**os.environ, "THUNDEROPS_AGENT_TOKEN": TOKEN, **env}, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


# ---------------------------------------------------------------- preemption notices


class MetadataDouble:
    """The cloud boundary double: AWS IMDS (v2 token, spot/instance-action) and GCP metadata (preempted),
    served for real over HTTP on 127.0.0.1. `notice` flips what they report; `hang` makes them never answer."""

    def __init__(self) -> None:
        self.notice = False
        self.hang = False
        self.foreign = False  # behave like a service that is neither AWS's nor GCP's: 404 for everything
        self.seen_token = False
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(10)

    async def _maybe_hang(self) -> None:
        if self.foreign:
            raise web.HTTPNotFound()
        if self.hang:
            try:
                await asyncio.wait_for(self.released.wait(), 30)
            except TimeoutError:
                pass

    async def token(self, request: web.Request) -> web.Response:
        await self._maybe_hang()
        assert request.headers.get("X-aws-ec2-metadata-token-ttl-seconds")
        return web.Response(text="imds-token")

    async def instance_action(self, request: web.Request) -> web.Response:
        await self._maybe_hang()
        if request.headers.get("X-aws-ec2-metadata-token") != "imds-token":
            return web.Response(status=401)
        self.seen_token = True
        if not self.notice:
            return web.Response(status=404, text="Not Found")
        return web.json_response({"action": "terminate", "time": "2026-11-25T17:02:00Z"})

    async def preempted(self, request: web.Request) -> web.Response:
        await self._maybe_hang()
        if request.headers.get("Metadata-Flavor") != "Google":
            return web.Response(status=403)
        return web.Response(text="TRUE" if self.notice else "FALSE", headers={"Metadata-Flavor": "Google"})

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.released = asyncio.Event()
        app = web.Application()
        app.add_routes([web.put("/latest/api/token", self.token),
                        web.get("/latest/meta-data/spot/instance-action", self.instance_action),
                        web.get("/computeMetadata/v1/instance/preempted", self.preempted)])
        self.runner = web.AppRunner(app)
        self.loop.run_until_complete(self.runner.setup())
        self.loop.run_until_complete(web.TCPSite(self.runner, "127.0.0.1", self.port).start())
        self.ready.set()
        self.loop.run_forever()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        async def stop() -> None:
            self.released.set()
            await self.runner.cleanup()
        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def metadata():
    md = MetadataDouble()
    try:
        yield md
    finally:
        md.close()


@pytest.mark.parametrize("cloud", ["aws", "gcp"])
def test_preemption_notice_is_relayed_and_latched(agents, metadata, cloud):
    # --cloud is given last so it wins over the helper's "--cloud none"
    a = agents.start("spot1", "--metadata-url", metadata.url, "--cloud", cloud)
    status, body = get(a.url + "/v1/preemption")
    assert status == 200 and body["cloud"] == cloud and body["notice"] is False
    metadata.notice = True
    status, body = get(a.url + "/v1/preemption")
    assert body["notice"] is True and body["cloud"] == cloud
    if cloud == "aws":
        assert body["action"] == "terminate" and body["time"] == "2026-11-25T17:02:00Z"
        assert metadata.seen_token  # IMDSv2: the session token was fetched and sent
    metadata.notice = False  # a notice, once seen, is kept: the node is going away regardless
    assert get(a.url + "/v1/preemption")[1]["notice"] is True


def test_auto_detects_the_cloud_from_whichever_service_answers(agents, metadata):
    a = agents.start("spot2", "--metadata-url", metadata.url, "--cloud", "auto")
    body = get(a.url + "/v1/preemption")[1]
    assert body["notice"] is False and body["cloud"] in ("aws", "gcp") and body["confirmed"]


def test_auto_is_not_fooled_by_another_clouds_metadata_service(agents, metadata):
    # A service at the same address that answers 404 to everything and gives no IMDSv2 token (another cloud's):
    # "no notice", but the agent must not conclude it is on AWS and stop asking GCP's service.
    metadata.foreign = True
    a = agents.start("spot5", "--metadata-url", metadata.url, "--cloud", "auto")
    body = get(a.url + "/v1/preemption")[1]
    assert body["notice"] is False and body["confirmed"] is False
    metadata.foreign, metadata.notice = False, True
    body = get(a.url + "/v1/preemption")[1]
    assert body["notice"] is True and body["cloud"] == "gcp"


def test_metadata_service_that_hangs_or_is_absent_answers_fast(agents, metadata):
    metadata.hang = True
    a = agents.start("spot3", "--metadata-url", metadata.url, "--cloud", "auto")
    t0 = time.monotonic()
    status, body = get(a.url + "/v1/preemption", timeout=20)
    assert time.monotonic() - t0 < 5  # short timeouts, not the 30 s the double would take
    assert status == 200 and body["notice"] is False and "no metadata service answered" in body["error"]
    b = agents.start("spot4", "--metadata-url", f"http://127.0.0.1:{free_port()}", "--cloud", "gcp")
    body = get(b.url + "/v1/preemption")[1]
    assert body["notice"] is False and body["cloud"] is None and "gcp" in body["error"]


def test_agent_exits_cleanly_on_sigterm(agents):
    a = agents.start("n1")
    a.proc.send_signal(signal.SIGTERM)
    assert a.proc.wait(timeout=10) == 0
