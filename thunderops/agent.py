"""The node agent: a small authenticated HTTP server that runs on every node of a deployment.

It reports health and GPU inventory, takes part in network measurements (a TCP sink, a sender with
several parallel streams like `iperf3 -P`, iperf3 itself where the node has it, a TCP round-trip
probe, NCCL between the node's own GPUs) and relays preemption notices from the cloud's instance
metadata service. Every HTTP request carries `Authorization: Bearer <deployment token>`. With the deployment's
TLS pair (`deployment_tls`, handed to nodes in THUNDEROPS_AGENT_TLS_CERT/KEY) the API is HTTPS, and clients
trust that one self-signed certificate and nothing else (the token never crosses the network in clear).

Ports: the HTTP API on `port`; a raw TCP data port (default port+1) for bandwidth streams and echo;
iperf3's server (default port+2) when iperf3 is used. `/v1/health` reports the ports actually bound.

The data port speaks one header line, `TOBENCH1 <S|E> <session>\\n`, then either a stream of bytes to
count (S, sink) or bytes to echo back (E). Sessions are random ids handed out by the authenticated
`POST /v1/sink`, so the data port needs no token of its own.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import re
import secrets
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import ClientSession, ClientTimeout, web

from thunderops import __version__
from thunderops.errors import NetbenchError, UserError
from thunderops.provision import AGENT_PORT
from thunderops.state import default_home

DEFAULT_PORT = AGENT_PORT  # data port = +1, iperf3 = +2: the node template opens all three
TOKEN_ENV = "THUNDEROPS_AGENT_TOKEN"
TLS_CERT_ENV = "THUNDEROPS_AGENT_TLS_CERT"  # PEM text of the deployment's certificate
TLS_KEY_ENV = "THUNDEROPS_AGENT_TLS_KEY"  # ... and of its private key
AWS_METADATA_URL = "http://169.254.169.254"
GCP_METADATA_URL = "http://metadata.google.internal"
AWS_NOTICE_PATH = "/latest/meta-data/spot/instance-action"
GCP_PREEMPTED_PATH = "/computeMetadata/v1/instance/preempted"
HEADER_MAGIC = b"TOBENCH1"
CHUNK = bytes(128 * 1024)
SESSION_TTL_S = 300.0


@dataclass
class AgentConfig:
    """How one agent runs. `gpu`/`gpus` declare the inventory where nvidia-smi is absent (emulated nodes);
    `link_mbps` paces the data path in both directions with a token bucket (an emulated slow NIC);
    `peer_mbps` does so only for traffic with the given peer addresses (an emulated slow link between two
    nodes, e.g. agents bound to different 127.0.0.x addresses)."""

    token: str
    host: str = "0.0.0.0"
    port: int = DEFAULT_PORT
    data_port: int | None = None  # None: port+1; 0: any free port
    iperf_port: int | None = None  # None: port+2
    node_id: str = ""
    deployment: str = ""
    advertise_host: str | None = None  # address peers should use for data (e.g. the private IP)
    gpu: str | None = None
    gpus: int = 0
    link_mbps: float | None = None
    peer_mbps: dict[str, float] = field(default_factory=dict)
    cloud: str = "auto"  # aws | gcp | auto | none
    metadata_url: str | None = None  # base URL of the metadata service (tests point it at a double)
    metadata_timeout_s: float = 1.0
    tls: tuple[str, str] | None = field(default=None, repr=False)  # (certificate PEM, key PEM): serve HTTPS

    def __post_init__(self) -> None:
        if not self.token:
            raise NetbenchError(f"agent token is empty; pass --token-file FILE or set {TOKEN_ENV}")
        if self.cloud not in ("aws", "gcp", "auto", "none"):
            raise NetbenchError(f"--cloud must be aws, gcp, auto or none, got {self.cloud!r}")
        if self.link_mbps is not None and self.link_mbps <= 0:
            raise NetbenchError(f"--link-mbps must be positive, got {self.link_mbps}")
        for peer, mbps in self.peer_mbps.items():
            if not mbps > 0:
                raise NetbenchError(f"--peer-mbps {peer}={mbps}: the rate must be positive Mbit/s")
        if self.gpus < 0:
            raise NetbenchError(f"--gpus must be >= 0, got {self.gpus}")


def load_token(token_file: str | Path | None = None) -> str:
    """The deployment token from a file (first line) or, failing that, the THUNDEROPS_AGENT_TOKEN variable."""
    if token_file is not None:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as e:
            raise NetbenchError(f"{token_file}: cannot read agent token ({e.strerror})") from None
        if not token:
            raise NetbenchError(f"{token_file}: agent token file is empty; write the deployment token into it")
        return token
    token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        raise NetbenchError(f"no agent token: pass --token-file FILE or set {TOKEN_ENV}")
    return token


# ---------------------------------------------------------------- TLS: one self-signed pair per deployment


def make_tls_pair(name: str, days: int = 3650) -> tuple[str, str]:
    """A self-signed certificate and its key (PEM), EC P-256. Agents are reached by addresses not known when it
    is made, so clients pin this certificate (their only trust anchor) instead of checking host names."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name[:64])])
    now = datetime.datetime.now(datetime.UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    usage = x509.KeyUsage(digital_signature=True, key_cert_sign=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False, crl_sign=False,
                          encipher_only=False, decipher_only=False)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(usage, critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("thunderops-agent")]), critical=False)
            .add_extension(ski, critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
            .sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM).decode(),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()).decode())


def tls_path(deployment: str) -> Path:
    """Where the deployment's agent TLS pair lives: one file, the key then the certificate (PEM)."""
    return default_home() / "tokens" / f"{deployment}.agent-tls.pem"


def deployment_tls(deployment: str, create: bool = True) -> tuple[str, str] | None:
    """The deployment's agent TLS pair (certificate PEM, key PEM), kept beside its token (mode 0600); made on
    first use with `create`, else None when the deployment has none (made before agents spoke TLS)."""
    path = tls_path(deployment)
    if not path.exists() and create:
        cert, key = make_tls_pair(f"thunderops-agent {deployment}")
        _create_private(path, key + cert)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise NetbenchError(f"{path}: cannot read the agents' TLS pair ({e.strerror})") from None
    cut = text.find("-----BEGIN CERTIFICATE-----")
    if cut <= 0:
        raise NetbenchError(f"{path}: not a key and certificate (PEM); delete it to have a new pair made")
    return text[cut:], text[:cut]


def _create_private(path: Path, text: str) -> None:
    """Write `text` to `path` (mode 0600) unless it exists: never replaces what another process made meanwhile."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)


def client_tls(cert_pem: str) -> ssl.SSLContext:
    """A client context that trusts exactly this certificate (host names are not checked: it is pinned)."""
    try:
        ctx = ssl.create_default_context(cadata=cert_pem)
    except ssl.SSLError as e:
        raise NetbenchError(f"the agents' TLS certificate is not valid PEM ({e.reason}); use the deployment's "
                            "certificate") from None
    ctx.check_hostname = False
    return ctx


def server_tls_files(cert_file: str | Path, key_file: str | Path, flags: str = "--ssl-certfile/--ssl-keyfile"
                     ) -> ssl.SSLContext:
    """A server context from a PEM certificate and key on disk; a pair that does not load is one line naming
    `flags`, the options that gave it."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    for f in (cert_file, key_file):
        if not Path(f).is_file():
            raise UserError(f"{f}: no such certificate or key file (check {flags})")
    try:
        ctx.load_cert_chain(cert_file, key_file)
    except ssl.SSLError as e:
        raise UserError(f"{cert_file} and {key_file} are not a PEM certificate and its key ({e.reason}); "
                        f"check {flags}") from None
    return ctx


def server_tls(cert_pem: str, key_pem: str) -> ssl.SSLContext:
    """The agent's server context (OpenSSL loads key pairs from files: a private temporary directory)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="thunderops-tls-") as d:
        cert_file, key_file = Path(d) / "cert.pem", Path(d) / "key.pem"
        cert_file.write_text(cert_pem)
        fd = os.open(key_file, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key_pem)
        try:
            return server_tls_files(cert_file, key_file)
        except UserError:
            raise NetbenchError("agent TLS certificate and key do not load; pass the deployment's pair in "
                                f"{TLS_CERT_ENV}/{TLS_KEY_ENV} or --tls-cert/--tls-key") from None


def load_tls(cert_file: str | Path | None = None, key_file: str | Path | None = None) -> tuple[str, str] | None:
    """The agent's TLS pair from files, else from THUNDEROPS_AGENT_TLS_CERT/KEY (PEM text), else None (HTTP)."""
    if (cert_file is None) != (key_file is None):
        raise NetbenchError("give both --tls-cert and --tls-key (the deployment's certificate and its key)")
    if cert_file is not None:
        try:
            return Path(cert_file).read_text(), Path(key_file).read_text()  # type: ignore[arg-type]
        except OSError as e:
            raise NetbenchError(f"{e.filename}: cannot read agent TLS file ({e.strerror})") from None
    cert, key = os.environ.get(TLS_CERT_ENV, "").strip(), os.environ.get(TLS_KEY_ENV, "").strip()
    if bool(cert) != bool(key):
        raise NetbenchError(f"set both {TLS_CERT_ENV} and {TLS_KEY_ENV}, or neither")
    return (cert + "\n", key + "\n") if cert else None


def parse_peer_mbps(items: list[str]) -> dict[str, float]:
    """`--peer-mbps IP=MBPS` (repeatable) into {IP: Mbit/s}."""
    out = {}
    for item in items:
        peer, sep, rate = item.rpartition("=")
        try:
            out[peer] = float(rate)
            if not sep or not peer:
                raise ValueError
        except ValueError:
            raise NetbenchError(f"--peer-mbps {item!r}: use ADDRESS=MBPS, e.g. 10.0.0.7=400") from None
    return out


def new_token() -> str:
    """A fresh per-deployment token."""
    return secrets.token_urlsafe(32)


def token_path(deployment: str) -> Path:
    return default_home() / "tokens" / f"{deployment}.token"


def deployment_token(deployment: str, create: bool = True) -> str:
    """The deployment's agent token, kept in `$THUNDEROPS_HOME/tokens/<deployment>.token` (mode 0600).

    Provisioning passes it to every node as THUNDEROPS_AGENT_TOKEN; netbench and the controller read it here."""
    path = token_path(deployment)
    if path.exists():
        return load_token(path)
    if not create:
        raise NetbenchError(f"no agent token for deployment {deployment!r} ({path} is missing); "
                            "it is made when the deployment is provisioned")
    _create_private(path, new_token() + "\n")
    return load_token(path)


class TokenBucket:
    """Paces bytes at `mbps` megabits/s. Callers take bytes and wait out any debt, so several streams sharing
    one bucket get `mbps` together. The burst is small so short measurements see the rate, not the burst."""

    def __init__(self, mbps: float, burst_bytes: int = 64 * 1024) -> None:
        self.rate = mbps * 1e6 / 8  # bytes/s
        self.burst = burst_bytes
        self.tokens = 0.0
        self.t = time.monotonic()

    def debit(self, n: int) -> float:
        """Take n bytes; return how long to wait before the next take (seconds)."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.t) * self.rate)
        self.t = now
        self.tokens -= n
        return max(0.0, -self.tokens / self.rate)

    async def take(self, n: int) -> None:
        delay = self.debit(n)
        if delay > 0:
            await asyncio.sleep(delay)


# ---------------------------------------------------------------- GPU inventory


def gpu_inventory(declared_gpu: str | None = None, declared_gpus: int = 0) -> dict[str, Any]:
    """GPUs from nvidia-smi when present, else the declared ones (emulated nodes), else none."""
    smi = shutil.which("nvidia-smi")
    error = None
    if smi:
        try:
            out = subprocess.run(
                [smi, "--query-gpu=index,name,memory.total,uuid", "--format=csv,noheader,nounits"],
                capture_output=True, text=True, timeout=10, check=True,
            ).stdout
            gpus = []
            for line in out.strip().splitlines():
                idx, name, mem, uuid = (p.strip() for p in line.split(",", 3))
                gpus.append({"index": int(idx), "name": name, "memory_mib": int(float(mem)), "uuid": uuid})
            return {"source": "nvidia-smi", "count": len(gpus), "name": gpus[0]["name"] if gpus else None,
                    "gpus": gpus}
        except (subprocess.SubprocessError, OSError, ValueError) as e:
            error = f"nvidia-smi failed: {e}"
    if declared_gpus > 0 or declared_gpu:
        n = declared_gpus or 1
        inv = {"source": "declared", "count": n, "name": declared_gpu,
               "gpus": [{"index": i, "name": declared_gpu} for i in range(n)]}
    else:
        inv = {"source": "none", "count": 0, "name": None, "gpus": []}
    if error:
        inv["error"] = error
    return inv


# ---------------------------------------------------------------- data plane (sink and echo)


@dataclass
class SinkSession:
    """Bytes counted for one bandwidth measurement, over all its streams."""

    id: str
    tool: str = "builtin"
    created: float = field(default_factory=time.monotonic)
    bytes: int = 0
    first: float | None = None
    last: float | None = None
    streams_open: int = 0
    streams_seen: int = 0
    iperf: asyncio.subprocess.Process | None = None

    def report(self) -> dict[str, Any]:
        seconds = (self.last - self.first) if self.first is not None and self.last is not None else 0.0
        gbps = self.bytes * 8 / seconds / 1e9 if seconds > 0 else None
        return {"session": self.id, "tool": self.tool, "bytes": self.bytes, "seconds": seconds, "gbps": gbps,
                "streams_seen": self.streams_seen, "streams_open": self.streams_open}


class _DataProtocol(asyncio.Protocol):
    """One data connection: reads the header line, then counts (sink) or echoes (echo) what follows."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.buf = b""
        self.mode: bytes | None = None
        self.session: SinkSession | None = None
        self.transport: asyncio.Transport | None = None
        self.bucket: TokenBucket | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.bucket = self.agent.rx_bucket_for(peer[0] if peer else "")
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        if self.mode is None:
            self.buf += data
            if b"\n" not in self.buf:
                if len(self.buf) > 256:
                    self.transport.close()
                return
            line, data = self.buf.split(b"\n", 1)
            self.buf = b""
            parts = line.split()
            session = self.agent.sessions.get(parts[2].decode(errors="replace")) if len(parts) == 3 else None
            if parts[:1] != [HEADER_MAGIC] or parts[1] not in (b"S", b"E") or session is None:
                self.transport.close()
                return
            self.mode, self.session = parts[1], session
            if self.mode == b"S":
                session.streams_open += 1
                session.streams_seen += 1
            if not data:
                return
        if self.mode == b"E":
            self.transport.write(data)
            return
        s = self.session
        assert s is not None
        now = time.monotonic()
        if s.first is None:
            s.first = now
        s.last = now
        s.bytes += len(data)
        if self.bucket is not None:
            delay = self.bucket.debit(len(data))
            if delay > 0:
                # Reading less makes TCP flow control slow the sender down: an emulated slow link.
                self.transport.pause_reading()
                asyncio.get_running_loop().call_later(delay, self._resume)

    def _resume(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.mode == b"S" and self.session is not None:
            self.session.streams_open -= 1


async def send_streams(host: str, port: int, session: str, streams: int, duration_s: float,
                       bucket: TokenBucket | None = None, connect_timeout_s: float = 5.0,
                       local_host: str | None = None) -> dict[str, Any]:
    """Send zeros to a sink on `streams` parallel TCP connections for `duration_s`; bytes sent per stream.
    `local_host` binds the source address (so a sink can tell which peer is sending)."""
    header = HEADER_MAGIC + b" S " + session.encode() + b"\n"
    sent = [0] * streams

    async def one(i: int) -> None:
        local_addr = (local_host, 0) if local_host else None
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port, local_addr=local_addr),
                                                connect_timeout_s)
        try:
            writer.transport.set_write_buffer_limits(high=256 * 1024)
            writer.write(header)
            end = time.monotonic() + duration_s
            while time.monotonic() < end:
                if bucket is not None:
                    await bucket.take(len(CHUNK))
                writer.write(CHUNK)
                await asyncio.wait_for(writer.drain(), max(1.0, end - time.monotonic() + connect_timeout_s))
                sent[i] += len(CHUNK)
        finally:
            writer.close()
            try:
                await asyncio.wait_for(writer.wait_closed(), 2.0)
            except (TimeoutError, OSError):
                pass

    t0 = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(streams)))
    seconds = time.monotonic() - t0
    return {"sent_bytes": sum(sent), "per_stream_bytes": sent, "seconds": seconds,
            "gbps_sender": sum(sent) * 8 / seconds / 1e9 if seconds > 0 else None}


async def echo_rtt(host: str, port: int, session: str, samples: int = 10,
                   timeout_s: float = 5.0) -> dict[str, Any]:
    """TCP round trips of one byte through the peer's echo; median and min in milliseconds."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
    try:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        writer.write(HEADER_MAGIC + b" E " + session.encode() + b"\n")
        rtts = []
        for _ in range(samples):
            t0 = time.perf_counter()
            writer.write(b"x")
            await writer.drain()
            got = await asyncio.wait_for(reader.read(1), timeout_s)
            if not got:
                raise ConnectionError("peer closed the echo connection")
            rtts.append((time.perf_counter() - t0) * 1e3)
    finally:
        writer.close()
    return {"rtt_ms": statistics.median(rtts), "min_ms": min(rtts), "samples": len(rtts)}


async def run_with_timeout(argv: list[str], timeout_s: float) -> tuple[int, bytes, bytes]:
    """Run a program to completion: (returncode, stdout, stderr); killed and TimeoutError past `timeout_s`."""
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode or 0, out, err


async def iperf3_client(host: str, port: int, streams: int, duration_s: float,
                        timeout_s: float) -> dict[str, Any]:
    """Run `iperf3 -c` and return the receiver-side rate it reports."""
    exe = shutil.which("iperf3")
    if exe is None:
        raise RuntimeError("iperf3 is not installed on the sending node")
    secs = max(1, round(duration_s))  # iperf3 takes whole seconds
    _, out, err = await run_with_timeout(
        [exe, "-c", host, "-p", str(port), "-P", str(streams), "-t", str(secs), "-J"], timeout_s)
    try:
        data = json.loads(out)
    except json.JSONDecodeError:
        raise RuntimeError(f"iperf3 gave no JSON: {err.decode(errors='replace').strip()[:200]}") from None
    if "error" in data:
        raise RuntimeError(f"iperf3: {data['error']}")
    end = data["end"]
    received = end.get("sum_received") or end["sum"]
    return {"sent_bytes": end.get("sum_sent", {}).get("bytes"), "seconds": received["seconds"],
            "gbps": received["bits_per_second"] / 1e9, "tool": "iperf3"}


# ---------------------------------------------------------------- preemption notices


async def check_preemption(cloud: str, base_url: str | None, timeout_s: float) -> dict[str, Any]:
    """Ask the instance metadata service whether this spot/preemptible node is about to go.

    AWS: a 404 on spot/instance-action means no notice; 200 carries {"action", "time"} (IMDSv2 token first,
    falling back to IMDSv1). GCP: instance/preempted answers TRUE or FALSE."""
    timeout = ClientTimeout(total=timeout_s, connect=timeout_s)
    clouds = ["aws", "gcp"] if cloud == "auto" else [cloud]
    errors = []
    async with ClientSession(timeout=timeout) as http:
        async def aws() -> dict[str, Any]:
            base = (base_url or AWS_METADATA_URL).rstrip("/")
            headers = {}
            try:
                async with http.put(f"{base}/latest/api/token",
                                    headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"}) as r:
                    if r.status == 200:
                        headers["X-aws-ec2-metadata-token"] = await r.text()
            except (TimeoutError, OSError):
                raise
            except Exception:  # noqa: BLE001 - IMDSv1 fallback on any odd token answer
                pass
            async with http.get(base + AWS_NOTICE_PATH, headers=headers) as r:
                if r.status == 404:
                    # Other clouds' services also live at 169.254.169.254: without an IMDSv2 token a 404
                    # says "no notice" but does not prove this is AWS.
                    return {"cloud": "aws", "notice": False, "confirmed": bool(headers)}
                r.raise_for_status()
                body = json.loads(await r.text())
                return {"cloud": "aws", "notice": True, "action": body.get("action"), "time": body.get("time"),
                        "confirmed": True}

        async def gcp() -> dict[str, Any]:
            base = (base_url or GCP_METADATA_URL).rstrip("/")
            async with http.get(base + GCP_PREEMPTED_PATH, headers={"Metadata-Flavor": "Google"}) as r:
                r.raise_for_status()
                if r.headers.get("Metadata-Flavor") != "Google":
                    raise RuntimeError("answer lacks the Metadata-Flavor: Google header (not GCP's service)")
                preempted = (await r.text()).strip().upper() == "TRUE"
                return {"cloud": "gcp", "notice": preempted, "action": "preempted" if preempted else None,
                        "confirmed": True}

        checks = {"aws": aws, "gcp": gcp}
        results = await asyncio.gather(*(checks[c]() for c in clouds), return_exceptions=True)
    answers = {}
    for c, res in zip(clouds, results, strict=True):
        if isinstance(res, dict):
            answers[c] = res
        else:
            errors.append(f"{c}: {type(res).__name__} {res}".strip())
    # GCP's answer is unambiguous (its header), then AWS confirmed by a token or a notice, then a bare AWS 404.
    for res in (answers.get("gcp"), answers.get("aws")):
        if res is not None and res.get("confirmed"):
            return res
    if "aws" in answers:
        return answers["aws"]
    return {"cloud": None, "notice": False, "error": "no metadata service answered (" + "; ".join(errors) + ")"}


# ---------------------------------------------------------------- the agent


class Agent:
    """State of one running agent: config, sink sessions, pacing buckets, cached inventory."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.started = time.monotonic()
        self.sessions: dict[str, SinkSession] = {}
        self.rx_bucket = TokenBucket(config.link_mbps) if config.link_mbps else None
        self.tx_bucket = TokenBucket(config.link_mbps) if config.link_mbps else None
        self.peer_rx = {p: TokenBucket(m) for p, m in config.peer_mbps.items()}
        self.peer_tx = {p: TokenBucket(m) for p, m in config.peer_mbps.items()}
        self.inventory = gpu_inventory(config.gpu, config.gpus)
        self.data_port: int | None = None
        self.iperf_port = config.iperf_port if config.iperf_port is not None else config.port + 2
        self.notice: dict[str, Any] | None = None  # latched once a notice is seen
        self.cloud = config.cloud
        self.ray_nodes: dict[str, tuple[tuple, subprocess.Popen]] = {}  # group -> (its join request, raylet)

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok", "node_id": self.config.node_id, "deployment": self.config.deployment, "version": __version__,
            "uptime_s": round(time.monotonic() - self.started, 3), "pid": os.getpid(),
            "gpus": self.inventory, "data_port": self.data_port, "iperf_port": self.iperf_port,
            "advertise_host": self.config.advertise_host, "node_ip": self.node_ip(),
            "iperf3": shutil.which("iperf3") is not None,
            "link_mbps": self.config.link_mbps, "peer_mbps": self.config.peer_mbps, "tls": self.config.tls is not None,
        }

    def node_ip(self) -> str:
        """The address other nodes of the deployment reach this one at on their private network."""
        from thunderops.serve.ray_cluster import node_ip

        return self.config.advertise_host or node_ip()

    def rx_bucket_for(self, peer: str) -> TokenBucket | None:
        return self.peer_rx.get(peer, self.rx_bucket)

    def expire_sessions(self) -> None:
        now = time.monotonic()
        for sid, s in list(self.sessions.items()):
            if now - s.created > SESSION_TTL_S:
                self.drop_session(sid)

    def drop_session(self, sid: str) -> SinkSession | None:
        s = self.sessions.pop(sid, None)
        if s is not None and s.iperf is not None and s.iperf.returncode is None:
            s.iperf.kill()
        return s

    # -- handlers

    async def h_health(self, request: web.Request) -> web.Response:
        return web.json_response(self.health())

    async def h_gpus(self, request: web.Request) -> web.Response:
        if request.query.get("refresh"):
            self.inventory = await asyncio.to_thread(gpu_inventory, self.config.gpu, self.config.gpus)
        return web.json_response(self.inventory)

    async def h_sink_open(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        tool = body.get("tool", "builtin")
        self.expire_sessions()
        s = SinkSession(id=secrets.token_urlsafe(16), tool=tool)
        if tool == "iperf3":
            exe = shutil.which("iperf3")
            if exe is None:
                return _error(409, "iperf3 is not installed on the receiving node")
            s.iperf = await asyncio.create_subprocess_exec(
                exe, "-s", "-1", "-p", str(self.iperf_port),
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
            await asyncio.sleep(0.2)  # let it bind
            if s.iperf.returncode is not None:
                return _error(500, f"iperf3 server exited at once (port {self.iperf_port} busy?)")
            port = self.iperf_port
        elif tool == "builtin":
            port = self.data_port
        else:
            return _error(400, f"unknown tool {tool!r}; use builtin or iperf3")
        self.sessions[s.id] = s
        # The builtin data port always answers echo for the session (iperf3's one-off server must not see it).
        return web.json_response({"session": s.id, "port": port, "echo_port": self.data_port, "tool": tool})

    async def h_sink_report(self, request: web.Request) -> web.Response:
        s = self.sessions.get(request.match_info["sid"])
        if s is None:
            return _error(404, "no such sink session (expired or never opened)")
        # Wait (briefly) for the streams to finish draining so the report covers them all.
        wait_s = min(float(request.query.get("wait_s", 0)), 30.0)
        deadline = time.monotonic() + wait_s
        while s.streams_open > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return web.json_response(s.report())

    async def h_sink_close(self, request: web.Request) -> web.Response:
        s = self.drop_session(request.match_info["sid"])
        return web.json_response({"closed": s is not None})

    async def h_send(self, request: web.Request) -> web.Response:
        b = await _json_body(request)
        try:
            host, port, streams = str(b["host"]), int(b["port"]), int(b.get("streams", 4))
            duration = float(b.get("duration_s", 2.0))
        except (KeyError, TypeError, ValueError) as e:
            return _error(400, f"send needs host, port, session: {e}")
        if not (1 <= streams <= 64 and 0 < duration <= 120):
            return _error(400, "streams must be 1..64 and duration_s in (0, 120]")
        try:
            if b.get("tool") == "iperf3":
                res = await iperf3_client(host, port, streams, duration, timeout_s=duration + 15)
            else:
                local = None if self.config.host in ("0.0.0.0", "::", "") else self.config.host
                res = await send_streams(host, port, str(b.get("session", "")), streams, duration,
                                         self.peer_tx.get(host, self.tx_bucket), local_host=local)
                res["tool"] = "builtin"
        except (TimeoutError, OSError, RuntimeError, ConnectionError) as e:
            return _error(502, f"sending to {host}:{port} failed: {_describe(e)}")
        return web.json_response(res)

    async def h_rtt(self, request: web.Request) -> web.Response:
        b = await _json_body(request)
        try:
            host, port, session = str(b["host"]), int(b["port"]), str(b["session"])
            samples = max(1, min(int(b.get("samples", 10)), 1000))
        except (KeyError, TypeError, ValueError) as e:
            return _error(400, f"rtt needs host, port, session: {e}")
        try:
            return web.json_response(await echo_rtt(host, port, session, samples))
        except (TimeoutError, OSError, ConnectionError) as e:
            return _error(502, f"round trip to {host}:{port} failed: {_describe(e)}")

    async def h_nccl(self, request: web.Request) -> web.Response:
        b = await _json_body(request)
        size_mb = float(b.get("size_mb", 256))
        iters = int(b.get("iters", 10))
        timeout_s = float(b.get("timeout_s", 180))
        if self.inventory["source"] != "nvidia-smi" or self.inventory["count"] < 2:
            return web.json_response({"skipped": f"needs >= 2 real GPUs (have {self.inventory['count']}, "
                                                 f"{self.inventory['source']})", "pairs": {}})
        try:
            returncode, out, err = await run_with_timeout(
                [sys.executable, "-m", "thunderops.netbench", "nccl", "--size-mb", str(size_mb), "--iters",
                 str(iters)], timeout_s)
        except TimeoutError:
            return _error(504, f"NCCL measurement did not finish within {timeout_s:.0f}s")
        if returncode != 0:
            return _error(500, "NCCL measurement failed: " + err.decode(errors="replace").strip()[-300:])
        return web.json_response(json.loads(out))

    async def h_ray_join(self, request: web.Request) -> web.Response:
        """Join this node to the Ray cluster of an engine spanning nodes (thunderops.serve.ray_cluster): body
        `{"group", "head": "IP:PORT", "gpus": [ids]}` and optionally `"ports"`, the first of this node's own
        block (default: the head's PORT, as on every node of a group). The same request again is a no-op while
        the worker runs in that head's cluster; a new head (the group's head node was replaced, or its engine
        restarted with a new Ray head) restarts it."""
        from thunderops.serve.ray_cluster import RAY_BLOCK, has_node, start_argv, start_node, stop_node

        body = await _json_body(request)
        group, head, gpus = body.get("group"), body.get("head"), body.get("gpus")
        if not isinstance(group, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", group):
            return _error(400, "group must be a plan group id (letters, digits, _ . -)")
        host, _, port_s = head.rpartition(":") if isinstance(head, str) else ("", "", "")
        if not re.fullmatch(r"[A-Za-z0-9.-]{1,253}|\[[0-9A-Fa-f:]+\]", host) or not port_s.isdigit() \
                or not 0 < int(port_s) < 65536 - RAY_BLOCK:
            return _error(400, "head must be the Ray head's HOST:PORT, e.g. 10.0.0.5:10000")
        count = int(self.inventory.get("count") or 0)
        if not isinstance(gpus, list) or not gpus or not all(type(i) is int and 0 <= i < count for i in gpus) \
                or len(set(gpus)) != len(gpus):
            return _error(400, f"gpus must be distinct GPU ids of this node's {count} GPU(s)")
        block = body.get("ports", int(port_s))
        if type(block) is not int or not 0 < block < 65536 - RAY_BLOCK:
            return _error(400, "ports must be the first port of this node's Ray port block")
        instance = body.get("instance")
        if instance is not None and (not isinstance(instance, str) or not 0 < len(instance) <= 256):
            return _error(400, "instance must be this node's plan instance id")  # only ever hashed into a name
        key = (head, tuple(gpus), block, instance)
        old = self.ray_nodes.get(group)
        if old is not None and old[0] == key and old[1].poll() is None:
            # a head restarted on the same address (its engine's supervisor restarted it) no longer knows this
            # raylet, which belongs to the cluster that ended: join the new one
            if instance is None or await asyncio.to_thread(has_node, head, instance) is not False:
                return web.json_response({"group": group, "status": "running", "pid": old[1].pid})
        if old is not None:
            await asyncio.to_thread(stop_node, old[1])
        logs = Path(os.environ.get("THUNDEROPS_LOG_DIR", "~/thunderops-logs")).expanduser()
        logs.mkdir(parents=True, exist_ok=True)
        argv = start_argv(block, len(gpus), self.node_ip(), head_address=head, instance=instance)
        proc = start_node(argv, gpus, logs / f"ray-{group}.log")
        self.ray_nodes[group] = (key, proc)
        return web.json_response({"group": group, "status": "started", "pid": proc.pid})

    async def h_ray_status(self, request: web.Request) -> web.Response:
        return web.json_response({g: {"head": key[0], "gpus": list(key[1]), "ports": key[2], "running": proc.poll() is None,
                                      "pid": proc.pid} for g, (key, proc) in self.ray_nodes.items()})

    async def h_preemption(self, request: web.Request) -> web.Response:
        if self.notice is not None:
            return web.json_response(self.notice)
        if self.cloud == "none":
            return web.json_response({"cloud": None, "notice": False, "error": "metadata checks disabled"})
        res = await check_preemption(self.cloud, self.config.metadata_url, self.config.metadata_timeout_s)
        if res.get("cloud") and res.get("confirmed") and self.cloud == "auto":
            self.cloud = res["cloud"]  # stop asking the other cloud's service
        res["checked_at"] = time.time()
        if res.get("notice"):
            self.notice = res  # a notice never goes away; keep it even if the service stops answering
        return web.json_response(res)

    def build_app(self) -> web.Application:
        token = self.config.token.encode()

        @web.middleware
        async def auth(request: web.Request, handler):  # type: ignore[no-untyped-def]
            given = request.headers.get("Authorization", "")
            presented = given[7:].encode() if given.startswith("Bearer ") else b""
            if not hmac.compare_digest(presented, token):
                return _error(401, "missing or wrong agent token")
            return await handler(request)

        app = web.Application(middlewares=[auth])
        app.add_routes([
            web.get("/v1/health", self.h_health),
            web.get("/v1/gpus", self.h_gpus),
            web.post("/v1/sink", self.h_sink_open),
            web.get("/v1/sink/{sid}", self.h_sink_report),
            web.delete("/v1/sink/{sid}", self.h_sink_close),
            web.post("/v1/send", self.h_send),
            web.post("/v1/rtt", self.h_rtt),
            web.post("/v1/nccl", self.h_nccl),
            web.get("/v1/preemption", self.h_preemption),
            web.post("/v1/ray/join", self.h_ray_join),
            web.get("/v1/ray", self.h_ray_status),
        ])
        return app

    async def start(self) -> web.AppRunner:
        """Bind the data port and the HTTP API; return the runner (call `runner.cleanup()` to stop)."""
        loop = asyncio.get_running_loop()
        data_port = self.config.data_port if self.config.data_port is not None else self.config.port + 1
        self._data_server = await loop.create_server(lambda: _DataProtocol(self), self.config.host, data_port,
                                                     reuse_address=True)
        self.data_port = self._data_server.sockets[0].getsockname()[1]
        runner = web.AppRunner(self.build_app(), access_log=None)
        await runner.setup()
        tls = server_tls(*self.config.tls) if self.config.tls else None
        await web.TCPSite(runner, self.config.host, self.config.port, reuse_address=True, ssl_context=tls).start()
        return runner

    async def stop(self, runner: web.AppRunner) -> None:
        from thunderops.serve.ray_cluster import stop_node

        for sid in list(self.sessions):
            self.drop_session(sid)
        for _, proc in self.ray_nodes.values():
            await asyncio.to_thread(stop_node, proc)
        self._data_server.close()
        await runner.cleanup()


async def _json_body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return body if isinstance(body, dict) else {}


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _describe(e: BaseException) -> str:
    if isinstance(e, asyncio.TimeoutError):
        return "timed out"
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, ConnectionResetError | BrokenPipeError):
        return "connection reset by peer (did it die?)"
    return f"{type(e).__name__}: {e}"


def run_agent(config: AgentConfig, announce: bool = True) -> None:
    """Run the agent until SIGTERM/SIGINT."""

    async def main() -> None:
        agent = Agent(config)
        try:
            runner = await agent.start()
        except OSError as e:
            raise NetbenchError(f"agent cannot listen on {config.host}:{config.port} or its data port "
                                f"({e.strerror}); pick free ports with --port/--data-port") from None
        if announce:
            print(f"thunderops agent {config.node_id or ''} listening on {config.host}:{config.port} "
                  f"({'HTTPS' if config.tls else 'HTTP'}) "
                  f"(data port {agent.data_port}, gpus {agent.inventory['count']} {agent.inventory['source']})",
                  flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await agent.stop(runner)

    asyncio.run(main())


def _main(argv: list[str] | None = None) -> None:
    """`python -m thunderops.agent` (the same options as `thunderops agent`, without loading the whole CLI)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m thunderops.agent")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--data-port", type=int)
    p.add_argument("--iperf-port", type=int)
    p.add_argument("--token-file")
    p.add_argument("--node-id", "--node", dest="node_id", default="")
    p.add_argument("--deployment", default="")
    p.add_argument("--advertise-host")
    p.add_argument("--gpu", default=os.environ.get("THUNDEROPS_AGENT_GPU"))
    p.add_argument("--gpus", type=int, default=int(os.environ.get("THUNDEROPS_AGENT_GPUS", "0") or 0))
    p.add_argument("--link-mbps", type=float)
    p.add_argument("--peer-mbps", action="append", default=[])
    p.add_argument("--cloud", default="auto")
    p.add_argument("--metadata-url")
    p.add_argument("--tls-cert")
    p.add_argument("--tls-key")
    a = p.parse_args(argv)
    try:
        cfg = AgentConfig(token=load_token(a.token_file), host=a.host, port=a.port, data_port=a.data_port,
                          iperf_port=a.iperf_port, node_id=a.node_id, deployment=a.deployment, advertise_host=a.advertise_host,
                          gpu=a.gpu, gpus=a.gpus, link_mbps=a.link_mbps, peer_mbps=parse_peer_mbps(a.peer_mbps), cloud=a.cloud, metadata_url=a.metadata_url,
                          tls=load_tls(a.tls_cert, a.tls_key))
        run_agent(cfg)
    except NetbenchError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    _main()
