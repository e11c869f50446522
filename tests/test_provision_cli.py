"""`thunderops up / status / down` as a user runs them (real processes, real SQLite), with FakeSkyCloud standing
in for the clouds behind SkyPilot's SDK. Includes `up` killed with SIGKILL mid-way: after `thunderops down`,
the clusters that exist but should not == 0."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from fakes.fake_sky import FakeSkyCloud
from provision_helpers import cheapest, plan_of

from thunderops.state import Store

TESTS = Path(__file__).resolve().parent


@pytest.fixture
def cloud(tmp_path, monkeypatch) -> FakeSkyCloud:
    path = tmp_path / "fake-sky.json"
    monkeypatch.setenv("FAKE_SKY_STATE", str(path))
    monkeypatch.setenv("THUNDEROPS_SKY_ADAPTER", "fakes.fake_sky:FakeSkyCloud")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    return FakeSkyCloud(path)


@pytest.fixture
def plan_file(tmp_path) -> Path:
    plan = plan_of([("a100", cheapest("A100-80GB", 1, cloud="gcp"), False),
                    ("l4", cheapest("L4", 1, cloud="aws", spot=True), True)], slack=1.0)
    path = tmp_path / "plan.json"
    plan.save(path)
    return path


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    code = "import sys; from thunderops.cli import main; sys.argv = ['thunderops', *sys.argv[1:]]; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, COLUMNS="200"))


def one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def test_dry_run_prints_plan_tasks_and_cost_and_writes_nothing(plan_file, thunderops_home):
    proc = cli("up", "--plan", str(plan_file), "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "dry run: nothing provisioned" in proc.stdout and "$/h" in proc.stdout
    assert "SkyPilot task: to-dryrun-a100-1" in proc.stdout and "vllm serve" in proc.stdout
    data = json.loads(cli("up", "--plan", str(plan_file), "--dry-run", "--json").stdout)
    assert data["cost_per_hour"] == pytest.approx(sum(i["price_per_hour"] for i in data["plan"]["instances"]))
    tasks = {name: yaml.safe_load(text) for name, text in data["skypilot_tasks"].items()}
    assert set(tasks) == {"to-dryrun-a100-1", "to-dryrun-l4-1", "to-dryrun-router-1"}
    assert tasks["to-dryrun-l4-1"]["resources"]["use_spot"] is True
    # the router reaches each engine on its node: named, not a loopback address the router's own node would answer
    run = tasks["to-dryrun-router-1"]["run"]
    for inst in data["plan"]["instances"]:  # over HTTPS, trusting the deployment's certificate
        assert f"https://<{inst['id']} address>:" in run
    assert "127.0.0.1" not in run and "--engine-cert" in run
    for name in ("to-dryrun-a100-1", "to-dryrun-l4-1"):
        assert "--ssl-certfile" in tasks[name]["run"]
    assert not thunderops_home.exists()  # no state store, no token: a dry run is read-only


def test_dry_run_with_a_rate_and_no_budget_plans_under_the_rate_ceiling(thunderops_home):
    data = json.loads(cli("up", "--model", "llama-3.1-8b", "--workload", "coding", "--rate", "6", "--clouds",
                          "lambda", "--time-limit", "6", "--dry-run", "--json").stdout)
    plan = data["plan"]
    assert plan["inputs"]["rate"] == 6 and plan["inputs"]["budget_per_hour"] is None
    # not the 13.54 $/h default budget: a ceiling from the rate, which the plan stays under
    assert plan["budget_per_hour"] != 13.54 and data["cost_per_hour"] <= plan["budget_per_hour"]
    assert plan["inputs"]["rate_met"] is True
    assert not thunderops_home.exists()


def test_up_notes_a_simulator_check_the_time_limit_had_no_room_for(thunderops_home):
    """A time limit shorter than the baselines' simulations: `up` plans on the perf model's figures and says so
    (on stderr; with --json the plan records why)."""
    args = ("up", "--dry-run", "--budget", "6", "--model", "llama-3.1-8b", "--clouds", "lambda", "--time-limit",
            "0.2")
    proc = cli(*args)
    assert proc.returncode == 0, proc.stderr
    assert "note: simulator check skipped" in " ".join(proc.stderr.split())
    plan = json.loads(cli(*args, "--json").stdout)["plan"]
    assert plan["inputs"]["sim_check"].startswith("skipped") and plan["predicted"]["method"] == "model"
    assert not thunderops_home.exists()


@pytest.mark.slow
def test_dry_run_plans_offline_from_the_shipped_catalogs(thunderops_home):
    proc = cli("up", "--dry-run", "--budget", "6", "--model", "llama-2-7b", "--time-limit", "3")
    assert proc.returncode == 0, proc.stderr
    assert "dry run: nothing provisioned" in proc.stdout and "budget 6.00 $/h" in proc.stdout
    assert not thunderops_home.exists()


def test_bad_input_is_one_line_and_exit_2(plan_file, tmp_path, cloud):
    plan = json.loads(plan_file.read_text())
    one_line_error(cli("up", "--plan", str(plan_file), "--provider", "nope"), "unknown provider 'nope'")
    one_line_error(cli("up", "--plan", str(plan_file), "--budget", "0.5", "--dry-run"), "below the plan's")
    bad = tmp_path / "bad.json"
    plan["instances"][0]["cloud"] = "gpc"
    bad.write_text(json.dumps(plan))
    one_line_error(cli("up", "--plan", str(bad), "--dry-run"), "unknown cloud 'gpc'", "gcp")
    plan["instances"][0]["cloud"], plan["instances"][0]["region"] = "gcp", "us-centrall"
    bad.write_text(json.dumps(plan))
    one_line_error(cli("up", "--plan", str(bad), "--dry-run"), "unknown gcp region 'us-centrall'", "us-central1")
    one_line_error(cli("up", "--dry-run", "--budget", "0.01", "--model", "llama-2-70b", "--time-limit", "1"))
    one_line_error(cli("up", "--plan", str(plan_file), "--name", "Bad-Name"), "not valid")
    cloud.set(enabled=["gcp"])
    one_line_error(cli("up", "--plan", str(plan_file), "--name", "nocreds"), "no credentials for aws",
                   "sky check aws")
    assert cloud.read()["launches"] == []
    one_line_error(cli("status", "nocreds"), "unknown deployment 'nocreds'")  # nothing half-written
    one_line_error(cli("down", "nope"), "unknown deployment 'nope'")
    one_line_error(cli("down"), "--all")


def test_up_status_down_through_the_cli(plan_file, cloud):
    proc = cli("up", "--plan", str(plan_file), "--name", "web", "--no-serve", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["deployment"] == "web" and len(out["nodes"]) == 2
    assert cloud.names() == {"to-web-a100-1", "to-web-l4-1"}
    st = json.loads(cli("status", "web", "--json").stdout)
    assert {n["status"] for n in st["nodes"]} == {"ready"}
    plan = json.loads(plan_file.read_text())
    assert st["deployments"][0]["cost_per_hour"] == pytest.approx(plan["cost_per_hour"])
    assert st["deployments"][0]["spend"] >= 0
    table = cli("status", "web")
    assert table.returncode == 0 and "$/h" in table.stdout and "to-web-a100-1" in table.stdout
    gone = json.loads(cli("down", "web", "--json").stdout)
    assert sorted(gone["terminated"]) == ["to-web-a100-1", "to-web-l4-1"] and cloud.names() == set()
    assert cli("down", "web").returncode == 0  # idempotent
    st = json.loads(cli("status", "web", "--json").stdout)
    assert st["deployments"][0]["status"] == "down" and {n["status"] for n in st["nodes"]} == {"terminated"}


def _leaks(secrets_: list[str], home: Path, *texts: str) -> list[str]:
    """Where any of the secrets shows up: in the given outputs or in any file under THUNDEROPS_HOME outside
    tokens/ (state store, logs, routing tables, wheels)."""
    assert secrets_ and all(len(s) >= 16 for s in secrets_)
    found = [f"output {k}" for k, t in enumerate(texts) for s in secrets_ if s in t]
    for f in home.rglob("*"):
        if f.is_file() and "tokens" not in f.relative_to(home).parts:
            data = f.read_bytes()
            found += [str(f) for s in secrets_ if s.encode() in data]
    return found


def test_agent_token_and_engine_key_never_appear_in_outputs_or_state(plan_file, cloud, thunderops_home):
    up = cli("up", "--plan", str(plan_file), "--name", "web", "--no-serve", "--json")
    assert up.returncode == 0, up.stderr
    tokens = [(thunderops_home / "tokens" / n).read_text().strip() for n in ("web.token", "web.engine.token")]
    key = (thunderops_home / "tokens" / "web.agent-tls.pem").read_text()  # the agents' TLS pair, made by `up`
    key = key[:key.index("-----BEGIN CERTIFICATE-----")]  # its private key (the certificate is public)
    tokens += [line for line in key.splitlines() if not line.startswith("-----")]
    outs = [up.stdout, up.stderr]
    for args in (("status", "web", "--json"), ("status", "web"), ("status",), ("events", "web", "--json"),
                 ("events", "web"), ("down", "web", "--json")):
        proc = cli(*args)
        assert proc.returncode == 0, (args, proc.stderr)
        outs += [proc.stdout, proc.stderr]
    assert _leaks(tokens, thunderops_home, *outs) == []


def test_failed_provisioning_exits_1_with_everything_torn_down(plan_file, cloud):
    cloud.add_rule("to-fail-l4-", "error")
    proc = cli("up", "--plan", str(plan_file), "--name", "fail", "--no-serve")
    assert proc.returncode == 1 and "provisioning failed" in proc.stderr and "torn down" in proc.stderr
    assert cloud.names() == set()
    assert Store().deployment("fail").status == "failed"


@pytest.mark.parametrize("stage", ["launching", "some-up"])
def test_up_killed_with_sigkill_midway_then_down_leaves_no_cluster(plan_file, cloud, stage):
    if stage == "launching":
        cloud.set(launch_delay_s=120)  # every launch still in flight when the kill comes
    else:
        cloud.add_rule("to-kill-l4-", "hang")  # a100 comes up, l4 hangs
    up = subprocess.Popen([sys.executable, "-c", "from thunderops.cli import main; main()", "up", "--plan",
                           str(plan_file), "--name", "kill", "--no-serve"], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, env=dict(os.environ, COLUMNS="200"))
    want = {"to-kill-a100-1", "to-kill-l4-1"}
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        clusters = cloud.read()["clusters"]
        if set(clusters) == want and (stage == "launching" or clusters["to-kill-a100-1"]["status"] == "UP"):
            break
        time.sleep(0.2)
    os.kill(up.pid, signal.SIGKILL)
    up.wait()
    assert cloud.names() == want  # the kill left running (billed) clusters behind
    proc = cli("down", "kill", "--json")
    assert proc.returncode == 0, proc.stderr
    assert cloud.names() == set()
    recs = Store().nodes("kill")
    assert {r.cluster_name for r in recs} == want and {r.status for r in recs} == {"terminated"}
    kinds = [e.kind for e in Store().events("kill")]
    assert kinds[0] == "provision-start" and kinds[-1] == "down"  # the store tells what happened


def _holding(paths: list[str]) -> set[int]:
    """Processes with a file open under any of `paths` (how Ray's processes of a node or cluster are found)."""
    out = set()
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            if any(os.readlink(f"/proc/{d}/fd/{fd}").startswith(tuple(paths)) for fd in os.listdir(f"/proc/{d}/fd")):
                out.add(int(d))
        except OSError:
            continue
    return out - {os.getpid()}


def _wait_event(dep: str, kind: str, timeout_s: float) -> list:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if events := Store().events(dep, kind):
            return events
        time.sleep(0.5)
    raise AssertionError(f"no {kind} event in {timeout_s} s: {[(e.kind, e.message) for e in Store().events(dep)]}")


@pytest.mark.slow
def test_local_emulated_deployment_serves_replaces_a_lost_node_and_down_from_another_shell_ends_it(tmp_path):
    """`up --emulate` on this machine: Ray nodes with declared GPUs, emulated engines pinned to them, the
    router and the controller; the official openai client gets an answer. A node lost (its raylet killed):
    the background controller joins a replacement Ray node to the cluster `up` holds and serves on it, and the
    lost node's Ray agents do not run on. `thunderops down` from another shell ends it all, nothing of Ray left."""
    import openai

    inv = tmp_path / "inv.yaml"
    inv.write_text("nodes:\n  - {name: a100box, gpu: A100-80GB, gpus: 1, price_per_hour: 1.5}\n"
                   "  - {name: l40sbox, gpu: L40S, gpus: 1, price_per_hour: 1.0}\n")
    up = subprocess.Popen([sys.executable, "-c", "from thunderops.cli import main; main()", "up", "--inventory",
                           str(inv), "--emulate", "--model", "llama-2-7b", "--time-limit", "3", "--name", "loc",
                           "--json"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        lines = []
        for line in up.stdout:
            lines.append(line)
            if line.rstrip() == "}":
                break
        assert lines and lines[0].rstrip() == "{", lines[:3]  # --json: nothing but JSON on stdout
        out = json.loads("".join(lines))
        client = openai.OpenAI(base_url=out["endpoint"], api_key=out["api_key"])
        answer = client.completions.create(model="Llama-2-7B", prompt="hello there", max_tokens=4)
        assert answer.usage.completion_tokens == 4
        pids = [out["router_pid"], out["controller_pid"], up.pid]

        lost = next(r for r in Store().nodes("loc") if r.instance_id == "l40sbox")
        temp_dir = lost.meta["temp_dir"]
        assert lost.meta["logs"] and _holding(lost.meta["logs"])  # the raylet and its agents
        os.kill(lost.meta["pids"][0], signal.SIGKILL)  # the machine is gone (its agents are not, by themselves)
        back = _wait_event("loc", "reprovisioned", 120)[0]
        assert back.payload["instances"] == ["l40sboxr1"] and not Store().events("loc", "reprovision-failed")
        new = next(r for r in Store().nodes("loc", live_only=True) if r.instance_id == "l40sboxr1")
        assert new.meta["address"] == lost.meta["address"] and new.meta["emulate"]  # joined the same cluster
        assert Store().node(lost.id).status in ("lost", "terminated")
        assert not _holding(lost.meta["logs"])  # the lost node's orphaned agents were ended with it
        plan = Store().latest_plan("loc")
        assert {i for g in plan.groups for i in g.instances} == {"a100box", "l40sboxr1"}
        for _ in range(4):  # both replicas serve again
            answer = client.completions.create(model="Llama-2-7B", prompt="hello again", max_tokens=2)
            assert answer.usage.completion_tokens == 2
        assert _holding([temp_dir])
        # the engines' key (router -> engines) never shows: not in up --json, status, events, logs, state
        home = Path(os.environ["THUNDEROPS_HOME"])
        engine_key = json.loads((home / "tokens" / "loc.router.json").read_text())["engines"]["engine_key"]
        outs = ["".join(lines)] + [cli(*a).stdout for a in (("status", "loc", "--json"), ("status", "loc"),
                                                            ("events", "loc", "--json"))]
        assert _leaks([engine_key], home, *outs) == []
        proc = cli("down", "loc", "--json")
        assert proc.returncode == 0, proc.stderr
        up.wait(timeout=60)
        assert up.stdout.read() == ""  # nothing after the JSON document, not Ray's note of the lost raylet
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
            time.sleep(0.2)
        assert not any(Path(f"/proc/{p}").exists() for p in pids)
        assert not _holding([temp_dir])  # every Ray process of the deployment, the joined node's included
        st = json.loads(cli("status", "loc", "--json").stdout)
        assert st["deployments"][0]["status"] == "down"
        assert {n["status"] for n in st["nodes"]} == {"terminated"}
        assert sum(u.output_tokens for u in Store().usage("loc")) >= 4  # the router's token counts
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGTERM)
            up.wait(timeout=60)
