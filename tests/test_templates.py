"""SkyPilot task templates: rendering escapes every value (no YAML or shell injection), every rendered task
loads with SkyPilot's own `sky.Task.from_yaml_config`, and SkyPilot's optimizer, reading our catalog exported
into a temp SKY_RUNTIME_DIR, picks the same instance and $/h as the plan for each node."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from provision_helpers import cheapest, plan_of

from thunderops.catalog import export_skypilot, load_offers
from thunderops.provision import Ports
from thunderops.provision.package import wheel_name
from thunderops.provision.skypilot import sky_zone
from thunderops.provision.tasks import (
    EngineLaunch,
    accelerator_names,
    cluster_name,
    deployment_of,
    engine_task,
    render,
    router_task,
)

EVIL = ["$(touch PWNED)", "`touch PWNED`", "a'b\"c", "x; touch PWNED", "new\nline: {evil: [1]}", "--flag=*"]


def _stub(bindir: Path, name: str) -> None:
    """An executable that records its argv (and one env var) as JSON, then exits (an agent after a second:
    the node's job ends with its agent, and takes the engines' lines along)."""
    path = bindir / name
    path.write_text(f"#!{sys.executable}\nimport json, os, sys, time\n"
                    f"with open(os.environ['RECORD_DIR'] + '/{name}.json', 'a') as f:\n"
                    "    f.write(json.dumps({'argv': sys.argv[1:], 'K': os.environ.get('K')}) + '\\n')\n"
                    "if sys.argv[1:2] == ['agent']:\n    time.sleep(1)\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def _run_script(script: str, envs: dict, tmp_path: Path, expect: tuple[str, ...] = ()) -> dict[str, list]:
    bindir, home, rec = tmp_path / "bin", tmp_path / "home", tmp_path / "rec"
    for d in (bindir, home, rec):
        d.mkdir(parents=True, exist_ok=True)
    for name in ("thunderops", "vllm", "python3"):
        _stub(bindir, name)
    env = {"PATH": f"{bindir}:/usr/bin:/bin", "HOME": str(home), "RECORD_DIR": str(rec),
           **{k: str(v) for k, v in envs.items()}}
    proc = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    deadline = time.monotonic() + 30  # background processes may still be writing after the script returns
    while time.monotonic() < deadline and not all((rec / f"{n}.json").exists() for n in expect):
        time.sleep(0.05)
    time.sleep(0.2)
    assert not list(tmp_path.rglob("PWNED")), "shell injection: a value was executed"
    return {p.stem: [json.loads(line) for line in p.read_text().splitlines()] for p in rec.glob("*.json")}


def test_rendering_escapes_every_value_for_yaml_and_shell(tmp_path):
    plan = plan_of([("i0", cheapest("A100-80GB", 1, cloud="gcp"), False)])
    evil_engine = EngineLaunch(["vllm", "serve", *EVIL], {"K": "v; touch PWNED $(touch PWNED)"}, "g0; touch PWNED", 8100)
    inst = plan.instances[0]
    inst.id = "i0'; touch PWNED; '"
    cfg = engine_task(plan, inst, deployment="d1", node_id="n$(touch PWNED)", cluster=cluster_name("d1", inst.id),
                      pip_spec="thunderops[serve]; touch PWNED", launches=[evil_engine], agent_token="s3cr'et")
    text = render(cfg)
    assert yaml.safe_load(text) == cfg  # YAML round trip: nothing broke out of its value
    assert cfg["secrets"] == {"THUNDEROPS_AGENT_TOKEN": "s3cr'et"} and "s3cr'et" not in json.dumps(cfg["envs"])
    with_tls = engine_task(plan, inst, deployment="d1", node_id="n1", cluster=cluster_name("d1", inst.id),
                           launches=[evil_engine], agent_token="t", agent_tls=("CERT PEM", "KEY PEM"))
    assert with_tls["secrets"] == {"THUNDEROPS_AGENT_TOKEN": "t", "THUNDEROPS_AGENT_TLS_CERT": "CERT PEM",
                                   "THUNDEROPS_AGENT_TLS_KEY": "KEY PEM"}
    assert "KEY PEM" not in json.dumps(with_tls["envs"])
    assert cfg["name"] == cluster_name("d1", inst.id) and deployment_of(cfg["name"]) == "d1"
    rec = _run_script(cfg["run"], cfg["envs"], tmp_path, expect=("thunderops",))
    calls = sorted(rec["thunderops"], key=lambda c: c["argv"][0])
    assert calls[0]["argv"][:4] == ["agent", "--node", "n$(touch PWNED)", "--deployment"]
    assert calls[1] == {"argv": ["serve", "supervise", "--", "vllm", "serve", *EVIL],
                        "K": "v; touch PWNED $(touch PWNED)"}  # each engine runs under its supervisor
    rec = _run_script(cfg["setup"], cfg["envs"], tmp_path / "setup", expect=("python3",))
    assert rec["python3"][-1]["argv"] == ["-m", "pip", "install", "thunderops[serve]; touch PWNED"]


def test_router_task_quotes_its_command_and_mounts_the_plan(tmp_path):
    plan = plan_of([("p0", cheapest("L4", 1, cloud="aws"), False)])
    plan.instances[0].host = "10.0.0.7"
    plan_path = tmp_path / "plan with space'.json"
    cfg = router_task(plan, deployment="d1", plan_path=plan_path, port=8080, api_key="k")
    assert yaml.safe_load(render(cfg)) == cfg
    assert cfg["file_mounts"] == {"~/thunderops/plan.json": str(plan_path)}
    rec = _run_script(cfg["run"], cfg["envs"], tmp_path, expect=("thunderops",))
    argv = rec["thunderops"][0]["argv"]
    assert argv[:3] == ["serve", "router", "--plan"] and argv[3].endswith("/home/thunderops/plan.json")
    assert argv[argv.index("--endpoint") + 1] == "g0=http://10.0.0.7:8100"


def test_engine_task_runs_the_serving_steps_vllm_commands_and_opens_their_ports():
    row = cheapest("A10G", 4, cloud="aws")
    plan = plan_of([("i0", row, False)])
    cfg = engine_task(plan, plan.instances[0], deployment="d1", node_id="n1", cluster="to-d1-i0-1",
                      accelerator="A10G")
    assert "vllm serve" in cfg["run"] and "--tensor-parallel-size 4" in cfg["run"]
    p = Ports()
    assert set(cfg["resources"]["ports"]) >= {p.engine, p.kv, p.agent, p.agent + 1, p.agent + 2}
    assert cfg["resources"]["accelerators"] == {"A10G": 4}
    assert cfg["resources"]["infra"] == f"aws/{row['region']}/{row['zone']}"


_SKY_CHECK = textwrap.dedent("""
    import json, sys
    import socket
    def _offline(*a, **k):
        raise OSError("network disabled by the test: SkyPilot must read only the exported catalog")
    socket.socket.connect = _offline
    import sky, sky.check
    enabled = [sky.CLOUD_REGISTRY.from_str(c) for c in json.loads(sys.argv[2])]
    # as SkyPilot's own tests do: mark clouds enabled, skip the credential checks
    sky.check.get_cached_enabled_clouds_or_refresh = lambda *a, **k: enabled
    sky.check.check_capability = lambda *a, **k: None
    out = []
    for item in json.load(open(sys.argv[1])):
        task = sky.Task.from_yaml_config(item["config"])
        if not item["optimize"]:
            out.append({"name": task.name})
            continue
        with sky.Dag() as dag:
            dag.add(task)
        sky.Optimizer.optimize(dag, quiet=True)
        r = task.best_resources
        out.append({"name": task.name, "cloud": str(r.cloud).lower(), "region": r.region, "zone": r.zone,
                    "instance_type": r.instance_type, "spot": r.use_spot, "cost": r.get_cost(3600)})
    print("RESULT " + json.dumps(out))
""")


@pytest.mark.slow
def test_every_task_validates_in_skypilot_and_its_optimizer_picks_the_plans_instance_and_price(tmp_path):
    offers = load_offers()
    rows = []
    for cloud in sorted(offers["cloud"].unique()):
        one = offers[(offers["cloud"] == cloud) & (offers["gpus_per_node"] == 1)]
        if one.empty:
            continue
        rows.append((f"{cloud}od", one.iloc[0], False))
        spot = one[one["price_spot"].notna()].sort_values("price_spot")
        if not spot.empty:
            rows.append((f"{cloud}sp", spot.iloc[0], True))
    plan = plan_of(rows)
    accel = accelerator_names(plan)
    wheel = tmp_path / wheel_name()  # a file mount's source must exist for SkyPilot to accept the task
    wheel.write_bytes(b"")
    items = []
    for inst in plan.instances:
        cfg = engine_task(plan, inst.__class__(**{**inst.__dict__, "zone": sky_zone(inst)}), deployment="d1",
                          node_id=inst.id, cluster=cluster_name("d1", inst.id), accelerator=accel[inst.id],
                          agent_token="t", wheel=wheel)
        items.append({"config": yaml.safe_load(render(cfg)), "optimize": True})
    items.append({"config": yaml.safe_load(render(router_task(plan, deployment="d1", plan_path=tmp_path, wheel=wheel))),
                  "optimize": False})
    runtime = tmp_path / "sky-runtime"
    export_skypilot(runtime)  # the product's export alone is enough for SkyPilot's optimizer, offline
    (tmp_path / "items.json").write_text(json.dumps(items))
    env = dict(os.environ, SKY_RUNTIME_DIR=str(runtime), HOME=str(tmp_path / "home"))
    proc = subprocess.run([sys.executable, "-c", _SKY_CHECK, str(tmp_path / "items.json"),
                           json.dumps(sorted({i.cloud for i in plan.instances}))],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert len(result) == len(plan.instances) + 1
    assert len({i.cloud for i in plan.instances}) >= 6
    for inst, got in zip(plan.instances, result, strict=False):
        want = (inst.cloud, inst.region, inst.instance_type, inst.spot)
        assert (got["cloud"], got["region"], got["instance_type"], got["spot"]) == want, inst.id
        if sky_zone(inst):
            assert got["zone"] == inst.zone, inst.id
        assert got["cost"] == pytest.approx(inst.price_per_hour, rel=1e-6), inst.id
