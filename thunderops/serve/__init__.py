"""Serving: vLLM command lines per plan group (`vllm`), the OpenAI-compatible P/D router (`router`), the engine
emulator (`emulator`), the Ray cluster of an engine spanning nodes (`ray_cluster`), and `start_local`, which
starts a whole deployment's serving side on this machine."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from thunderops.errors import UserError
from thunderops.plan import Plan


class ServeError(UserError):
    """Serving could not start (a port taken, an engine that never became healthy, vLLM missing)."""


@dataclass
class ServingHandle:
    """A running local deployment: the router `endpoint`, its `api_key`, and the processes behind it."""

    endpoint: str
    api_key: str
    model: str
    router_pid: int
    engine_pids: dict[str, int]
    engine_urls: dict[str, str]
    workdir: str
    logs: dict[str, str] = field(default_factory=dict)
    engine_key: str = ""  # the engines' own bearer token (router -> engine); never given to clients

    @property
    def admin_url(self) -> str:
        return self.endpoint.removesuffix("/v1")

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the router and every engine (SIGTERM, then SIGKILL after `timeout_s`)."""
        stop_pids([self.router_pid, *self.engine_pids.values()], timeout_s)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> ServingHandle:
        return cls(**d)  # type: ignore[arg-type]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of ours counts as gone
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return True


def stop_pids(pids: list[int], timeout_s: float = 5.0) -> None:
    """SIGTERM each process group we started, then SIGKILL whatever is left after `timeout_s`."""
    for pid in pids:
        try:
            os.killpg(pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + timeout_s
    for pid in pids:
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _alive(pid):
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            _alive(pid)


def wait_healthy(url: str, pid: int, timeout_s: float, log: str | None = None) -> None:
    """Poll `url`/health until it answers 200; raise ServeError if the process exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _alive(pid):
            tail = Path(log).read_text()[-800:] if log and Path(log).exists() else ""
            raise ServeError(f"process for {url} exited before becoming healthy; log tail: {tail.strip()!r}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.05)
    raise ServeError(f"{url} did not become healthy within {timeout_s:.0f}s; see {log or 'its log'}")


def _spawn(argv: list[str], env: dict[str, str], log: Path) -> int:
    with open(log, "ab") as out:
        p = subprocess.Popen(argv, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, start_new_session=True)
    return p.pid


def serve_module_argv(*args: str) -> list[str]:
    """Run `thunderops serve ARGS...` with this interpreter (no reliance on PATH)."""
    return [sys.executable, "-m", "thunderops.serve", *args]


def start_local(
    plan: Plan,
    emulate: bool = True,
    *,
    api_key: str | None = None,
    host: str = "127.0.0.1",
    router_port: int | None = None,
    speedup: float = 1.0,
    delay_scale: float = 1.0,
    workdir: str | Path | None = None,
    usage_db: str | None = None,
    deployment: str | None = None,
    timeout_s: float = 60.0,
) -> ServingHandle:
    """Start the serving side of `plan` on this machine: one engine per group (the emulator, timed by the
    performance model for the group's GPUs and layout, or real `vllm serve` when `emulate=False`) on free
    ports, then the router. Returns once everything answers /health. With `usage_db` and `deployment`, the
    router appends token usage to that state store."""
    from thunderops.serve.router import RoutingTable
    from thunderops.serve.vllm import engine_commands, max_model_len

    api_key = api_key or os.environ.get("THUNDEROPS_API_KEY") or f"tok-{secrets.token_urlsafe(24)}"
    engine_key = secrets.token_urlsafe(24)
    wd = Path(workdir or tempfile.mkdtemp(prefix="thunderops-serve-"))
    wd.mkdir(parents=True, exist_ok=True)
    plan_path = wd / "plan.json"
    plan.save(plan_path)
    mml = max_model_len(plan)
    pids: dict[str, int] = {}
    urls: dict[str, str] = {}
    logs: dict[str, str] = {}
    started: list[int] = []
    try:
        if emulate:
            for g in plan.groups:
                port = free_port(host)
                log = wd / f"engine-{g.id}.log"
                argv = serve_module_argv(
                    "emulator", "--plan", str(plan_path), "--group", g.id, "--host", host, "--port", str(port),
                    "--speedup", str(speedup), "--delay-scale", str(delay_scale), "--max-model-len", str(mml))
                pid = _spawn(argv, {"THUNDEROPS_ENGINE_KEY": engine_key}, log)
                started.append(pid)
                pids[g.id], urls[g.id], logs[g.id] = pid, f"http://{host}:{port}", str(log)
        else:
            import shutil

            if shutil.which("vllm") is None:
                raise ServeError("`vllm` is not on PATH; install it (pip install 'thunderops[serve]') or use --emulate")
            for cmd in engine_commands(plan):  # all on this machine: every engine gets its own free ports
                cmd.argv[cmd.argv.index("--port") + 1] = str(port := free_port(host))
                cmd.argv[cmd.argv.index("--host") + 1] = host
                if "VLLM_NIXL_SIDE_CHANNEL_PORT" in cmd.env:
                    cmd.env["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(free_port(host))
                    cmd.env["VLLM_NIXL_SIDE_CHANNEL_HOST"] = host
                log = wd / f"engine-{cmd.group}.log"
                pid = _spawn(cmd.argv, {**cmd.env, "VLLM_API_KEY": engine_key}, log)
                started.append(pid)
                pids[cmd.group], urls[cmd.group], logs[cmd.group] = pid, f"http://{host}:{port}", str(log)
        for gid, url in urls.items():
            wait_healthy(url, pids[gid], timeout_s if emulate else max(timeout_s, 1800), logs[gid])
        table_path = wd / "routing.json"
        table_path.write_text(json.dumps(RoutingTable.from_plan(plan, urls).to_dict()))
        rport = router_port or free_port(host)
        rlog = wd / "router.log"
        argv = serve_module_argv("router", "--routing", str(table_path), "--model", plan.model,
                                 "--host", host, "--port", str(rport), "--max-model-len", str(mml))
        if usage_db and deployment:
            argv += ["--usage-db", usage_db, "--deployment", deployment]
        rpid = _spawn(argv, {"THUNDEROPS_API_KEY": api_key, "THUNDEROPS_ENGINE_KEY": engine_key}, rlog)
        started.append(rpid)
        logs["router"] = str(rlog)
        wait_healthy(f"http://{host}:{rport}", rpid, timeout_s, str(rlog))
    except BaseException:
        stop_pids(started)
        raise
    return ServingHandle(f"http://{host}:{rport}/v1", api_key, plan.model, rpid, pids, urls, str(wd), logs, engine_key)
