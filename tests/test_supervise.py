"""Engines on a node run under `thunderops serve supervise`: an engine that exits is started again on its own
port, the node's other engines and its agent are not taken along, and when the node's job ends (its agent
exits) every engine goes with it. Real processes: the node's rendered SkyPilot `run` script under bash, the
real supervisor, engine emulators answering vLLM's /health."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from provision_helpers import cheapest, plan_of
from test_controller import wait_for

from thunderops.provision.tasks import EngineLaunch, cluster_name, engine_task
from thunderops.serve import free_port, serve_module_argv
from thunderops.serve.supervise import restart_delay

CLI = [sys.executable, "-c", "import sys; from thunderops.cli import main; sys.argv[0] = 'thunderops'; main()"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is gone for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_restart_delay_doubles_while_the_engine_keeps_failing_and_resets_after_a_good_run():
    d = restart_delay(5, None, 10, 300, 600)
    assert d == 10
    d = restart_delay(5, d, 10, 300, 600)
    assert d == 20
    for _ in range(10):
        d = restart_delay(5, d, 10, 300, 600)
    assert d == 300  # capped
    assert restart_delay(3600, d, 10, 300, 600) == 10  # it served a while: start afresh


def test_supervised_engine_comes_back_on_its_port_and_stops_with_the_supervisor(tmp_path):
    port = free_port()
    sup = subprocess.Popen([*CLI, "serve", "supervise", "--delay", "0.2", "--",
                            *serve_module_argv("emulator", "--port", str(port), "--delay-scale", "0")],
                           stdout=subprocess.DEVNULL, stderr=open(tmp_path / "sup.log", "w"), start_new_session=True)
    try:
        def engine_pid() -> int | None:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
            except httpx.HTTPError:
                return None
            if r.status_code != 200:
                return None
            kids = Path(f"/proc/{sup.pid}/task/{sup.pid}/children").read_text().split()
            return int(kids[0]) if kids else None

        first = wait_for(engine_pid, 60, "the engine to answer")
        os.kill(first, signal.SIGKILL)  # the engine crashes
        second = wait_for(lambda: (p := engine_pid()) and p != first and p, 60, "the engine to come back")
        assert sup.poll() is None and not _alive(first)
        assert "restart 1 in 0.2 s" in (tmp_path / "sup.log").read_text()
        sup.send_signal(signal.SIGTERM)  # the job ends: the supervisor hands SIGTERM to the engine and exits
        sup.wait(30)
        wait_for(lambda: not _alive(second), 30, "the engine to stop with its supervisor")
    finally:
        if sup.poll() is None:
            os.killpg(sup.pid, signal.SIGKILL)


def test_an_engine_that_cannot_start_is_retried_with_growing_delays_and_its_code_returned(tmp_path):
    r = subprocess.run([*CLI, "serve", "supervise", "--delay", "0.1", "--max-restarts", "3", "--",
                        sys.executable, "-c", "raise SystemExit(3)"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 3
    assert [ln.split("in ")[-1] for ln in r.stderr.splitlines() if "restart " in ln] == ["0.1 s", "0.2 s", "0.4 s"]
    missing = subprocess.run([*CLI, "serve", "supervise", "--delay", "0", "--max-restarts", "0", "--",
                              str(tmp_path / "no-such-engine")], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 127 and "cannot start" in missing.stderr


ENGINE = """
import os, sys, time
log = sys.argv[1]
with open(log, "a") as f:
    f.write(f"{os.getpid()}\\n")
starts = open(log).read().split()
if sys.argv[2] == "crash-once" and len(starts) == 1:
    raise SystemExit(1)
time.sleep(120)
"""


@pytest.mark.slow
def test_one_engine_crashing_on_a_node_leaves_the_others_and_the_job_running(tmp_path):
    """The node's real run script: engine a crashes once and is restarted (after the supervisor's 10 s), engine
    b and the agent are untouched, the job goes on; when the agent exits the job ends and no engine is left."""
    bindir, home = tmp_path / "bin", tmp_path / "home"
    bindir.mkdir()
    home.mkdir()
    (tmp_path / "engine.py").write_text(ENGINE)
    # `thunderops` on the node: the real CLI, but the agent is a stand-in that waits to be killed
    (bindir / "thunderops").write_text(
        f"#!{sys.executable}\nimport os, sys, time\n"
        "if sys.argv[1:2] == ['agent']:\n"
        f"    open({str(tmp_path / 'agent.pid')!r}, 'w').write(str(os.getpid()))\n"
        "    time.sleep(600)\n"
        "    raise SystemExit(0)\n"
        f"os.execv({sys.executable!r}, [{sys.executable!r}, '-c', "
        "'import sys; from thunderops.cli import main; sys.argv[0] = \"thunderops\"; main()', *sys.argv[1:]])\n")
    (bindir / "thunderops").chmod(0o755)
    launches = [EngineLaunch([sys.executable, str(tmp_path / "engine.py"), str(tmp_path / f"{name}.log"), mode],
                             {}, f"engine-{name}", 8100 + k)
                for k, (name, mode) in enumerate((("a", "crash-once"), ("b", "steady")))]
    plan = plan_of([("i0", cheapest("A100-80GB", 1, cloud="gcp"), False)])
    cfg = engine_task(plan, plan.instances[0], deployment="d1", node_id="n1",
                      cluster=cluster_name("d1", "i0"), launches=launches, agent_token="t")
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "HOME": str(home),
           **{k: str(v) for k, v in cfg["envs"].items()}}
    job = subprocess.Popen(["bash", "-c", cfg["run"]], cwd=tmp_path, env=env, start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def starts(name: str) -> list[int]:
            p = tmp_path / f"{name}.log"
            return [int(x) for x in p.read_text().split()] if p.exists() else []

        wait_for(lambda: len(starts("a")) == 2, 60, "engine a to be restarted by its supervisor")
        assert len(starts("b")) == 1 and _alive(starts("b")[0])  # b was not taken along
        assert job.poll() is None  # nor the node's job
        assert "restart 1" in (home / "thunderops-logs" / "engine-a.log").read_text()
        os.kill(int((tmp_path / "agent.pid").read_text()), signal.SIGTERM)  # the agent exits: the job ends
        job.wait(30)
        wait_for(lambda: not any(_alive(p) for p in (starts("a")[-1], starts("b")[0])), 30,
              "the engines to end with the job")
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
        for name in ("a", "b"):
            for pid in starts(name):
                if _alive(pid):
                    os.kill(pid, signal.SIGKILL)
