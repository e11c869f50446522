"""Nodes install the thunderops that launched them (it is not on PyPI): `up` builds a wheel of the running
thunderops, ships it with SkyPilot `file_mounts` and the setup script installs `<wheel>[serve]`; `--pip-spec`
overrides it. The install step runs real pip on the shipped file, laid out as a node sees it."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from fakes.fake_sky import FakeSkyCloud
from provision_helpers import cheapest, plan_of

from thunderops.errors import ProvisionError
from thunderops.provision.package import REMOTE_DIR, build_wheel, pip_spec_for, remote_path, wheel_name
from thunderops.provision.skypilot import SkyPilotProvider
from thunderops.provision.tasks import render
from thunderops.state import Store


def _plan():
    return plan_of([("a100", cheapest("A100-80GB", 1, cloud="gcp"), False),
                    ("l4", cheapest("L4", 1, cloud="aws", spot=True), True)], slack=1.0)


def _launches(cloud: FakeSkyCloud) -> list[dict]:
    """Record every task config the provider hands to the (fake) cloud."""
    seen: list[dict] = []
    real = cloud.launch

    def launch(cluster, task_config, on_stage):
        seen.append(yaml.safe_load(render(task_config)))  # what SkyPilot would get, as YAML
        return real(cluster, task_config, on_stage)

    cloud.launch = launch
    return seen


def _node_install(config: dict, home: Path, target: Path) -> subprocess.CompletedProcess:
    """Do what a node does: SkyPilot copies each file mount under the home directory, then setup runs
    `pip install "$THUNDEROPS_PIP_SPEC"` from there (real pip; --no-deps: no vLLM here)."""
    for remote, local in config["file_mounts"].items():
        dest = home / remote.removeprefix("~/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(Path(local).read_bytes())
    spec = config["envs"]["THUNDEROPS_PIP_SPEC"]
    return subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                           "--target", str(target), spec], cwd=home, capture_output=True, text=True, timeout=300)


def test_up_ships_a_wheel_of_this_thunderops_and_nodes_install_it_with_serve(tmp_path, thunderops_home):
    import sky

    cloud = FakeSkyCloud(tmp_path / "fake-sky.json")
    seen = _launches(cloud)
    p = SkyPilotProvider(Store(), cloud, launch_timeout_s=10, cancel_grace_s=5)
    plan = _plan()
    p.store.create_deployment("d1", provider="skypilot", model=plan.model, budget_per_hour=plan.budget_per_hour)
    p.store.add_plan("d1", plan)
    try:
        assert p.up("d1", plan).ok
    finally:
        p.down("d1")
    wheel = thunderops_home / "deployments" / "d1" / wheel_name()
    assert wheel.is_file()
    assert len(seen) == 2
    for config in seen:
        assert config["file_mounts"] == {f"~/{REMOTE_DIR}/{wheel.name}": str(wheel)}
        assert config["envs"]["THUNDEROPS_PIP_SPEC"] == f"./{REMOTE_DIR}/{wheel.name}[serve]"
        sky.Task.from_yaml_config(copy.deepcopy(config))  # SkyPilot accepts the mount (its source must exist)
    proc = _node_install(seen[0], tmp_path / "node-home", tmp_path / "site")
    assert proc.returncode == 0, proc.stderr
    site = tmp_path / "site"
    for f in ("thunderops/serve/router.py", "thunderops/templates/engine.yaml", "thunderops/catalogs/gpus.csv"):
        assert (site / f).is_file(), f
    meta = next(site.glob("thunderops-*.dist-info")) / "METADATA"
    assert "Provides-Extra: serve" in meta.read_text()  # `[serve]` pulls in vLLM on a real node
    assert "thunderops = thunderops.cli:main" in (meta.parent / "entry_points.txt").read_text()


def test_pip_spec_overrides_the_wheel_and_nothing_is_built(tmp_path, thunderops_home):
    cloud = FakeSkyCloud(tmp_path / "fake-sky.json")
    seen = _launches(cloud)
    spec = "thunderops[serve] @ git+https://github.com/example/thunderops@main"
    p = SkyPilotProvider(Store(), cloud, launch_timeout_s=10, cancel_grace_s=5, pip_spec=spec)
    plan = _plan()
    p.store.create_deployment("d2", provider="skypilot", model=plan.model, budget_per_hour=plan.budget_per_hour)
    p.store.add_plan("d2", plan)
    try:
        assert p.up("d2", plan).ok
    finally:
        p.down("d2")
    assert [c["envs"]["THUNDEROPS_PIP_SPEC"] for c in seen] == [spec, spec]
    assert all("file_mounts" not in c for c in seen)
    assert not list(thunderops_home.rglob("*.whl"))


def test_pip_spec_naming_a_local_wheel_ships_it(tmp_path, thunderops_home):
    """A local wheel path is no use on a node: it is shipped like thunderops' own (with each task's extras)."""
    cloud = FakeSkyCloud(tmp_path / "fake-sky.json")
    seen = _launches(cloud)
    wheel = tmp_path / "dist" / "thunderops-9.9.9-py3-none-any.whl"
    wheel.parent.mkdir()
    wheel.write_bytes(b"PK")
    p = SkyPilotProvider(Store(), cloud, launch_timeout_s=10, cancel_grace_s=5, pip_spec=f"{wheel}[serve]")
    plan = _plan()
    p.store.create_deployment("d3", provider="skypilot", model=plan.model, budget_per_hour=plan.budget_per_hour)
    p.store.add_plan("d3", plan)
    try:
        assert p.up("d3", plan).ok
    finally:
        p.down("d3")
    assert all(c["file_mounts"] == {remote_path(wheel): str(wheel)} for c in seen)
    assert all(c["envs"]["THUNDEROPS_PIP_SPEC"] == pip_spec_for(wheel, "serve") for c in seen)
    assert not list(thunderops_home.rglob("*.whl"))  # nothing built


def test_pip_spec_naming_a_local_directory_is_one_line_exit_2(tmp_path):
    code = "import sys; from thunderops.cli import main; sys.argv = ['thunderops', *sys.argv[1:]]; main()"
    proc = subprocess.run([sys.executable, "-c", code, "up", "--budget", "10", "--pip-spec", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "local path the nodes cannot read" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("spec,wheel", [("thunderops[serve]", False), ("thunderops==0.1", False),
                                        ("thunderops[serve] @ git+https://github.com/example/thunderops@main", False),
                                        ("{wheel}", True), ("{wheel}[serve]", True)])
def test_pip_spec_is_a_path_only_when_it_looks_like_one(tmp_path, monkeypatch, spec, wheel):
    from thunderops.provision.package import resolve_pip_spec

    monkeypatch.chdir(tmp_path)
    (tmp_path / "thunderops").mkdir()  # a directory named like the package must not turn the name into a path
    whl = tmp_path / "dist" / "thunderops-1.0-py3-none-any.whl"
    whl.parent.mkdir()
    whl.write_bytes(b"PK")
    req, shipped = resolve_pip_spec(spec.format(wheel="./dist/" + whl.name))
    assert (shipped == whl.resolve()) if wheel else (req == spec and shipped is None)
    with pytest.raises(ProvisionError, match="no such file"):
        resolve_pip_spec("./dist/missing.whl")


def test_dry_run_shows_the_wheel_mount_without_building_it(tmp_path, thunderops_home):
    path = tmp_path / "plan.json"
    _plan().save(path)
    code = "import sys; from thunderops.cli import main; sys.argv = ['thunderops', *sys.argv[1:]]; main()"
    proc = subprocess.run([sys.executable, "-c", code, "up", "--plan", str(path), "--dry-run", "--json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    tasks = {n: yaml.safe_load(t) for n, t in json.loads(proc.stdout)["skypilot_tasks"].items()}
    for name, cfg in tasks.items():
        spec = cfg["envs"]["THUNDEROPS_PIP_SPEC"]
        assert spec.startswith(f"./{REMOTE_DIR}/thunderops-") and spec.endswith("[serve]" if "router" not in name
                                                                               else ".whl"), spec
        assert any(k.startswith(f"~/{REMOTE_DIR}/") for k in cfg["file_mounts"])
    assert not thunderops_home.exists()  # shown, not built


def test_an_installed_copy_without_source_repacks_itself_into_an_installable_wheel(tmp_path):
    """Run from a plain (non-editable) install: the wheel is rebuilt from the installed files."""
    first = build_wheel(tmp_path / "src-build")
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(site),
                    str(first)], check=True, capture_output=True, timeout=300)
    code = ("import sys, thunderops; from thunderops.provision.package import build_wheel, source_tree; "
            "assert source_tree() is None, source_tree(); assert thunderops.__file__.startswith(sys.argv[2]); "
            "print(build_wheel(sys.argv[1]))")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "repacked"), str(site)], capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(site)), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    repacked = Path(proc.stdout.strip())
    assert repacked.name == first.name

    def names(whl: Path) -> set[str]:
        return {n for n in zipfile.ZipFile(whl).namelist() if "__pycache__" not in n}

    assert names(repacked) == names(first)
    site2 = tmp_path / "site2"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target",
                    str(site2), str(repacked)], check=True, capture_output=True, timeout=300)
    assert (site2 / "thunderops" / "serve" / "router.py").read_bytes() == \
        (site / "thunderops" / "serve" / "router.py").read_bytes()



def test_a_wheel_that_cannot_be_built_is_one_error_before_anything_is_launched(tmp_path, monkeypatch):
    from thunderops import errors
    from thunderops.provision import package

    broken = tmp_path / "src"
    broken.mkdir()
    (broken / "pyproject.toml").write_text('[project]\nname = "thunderops"\nversion = "not a version"\n')
    monkeypatch.setattr(package, "source_tree", lambda: broken)
    monkeypatch.setattr(package, "_built", [])
    cloud = FakeSkyCloud(tmp_path / "fake-sky.json")
    seen = _launches(cloud)
    p = SkyPilotProvider(Store(), cloud, launch_timeout_s=10, cancel_grace_s=5)
    plan = _plan()
    p.store.create_deployment("d3", provider="skypilot", model=plan.model, budget_per_hour=plan.budget_per_hour)
    p.store.add_plan("d3", plan)
    with pytest.raises(errors.ProvisionError) as err:
        p.up("d3", plan)
    msg = str(err.value)
    assert "\n" not in msg and "could not build a thunderops wheel" in msg and "--pip-spec" in msg
    assert seen == [] and cloud.names() == set() and p.store.nodes("d3") == []


def test_engine_nodes_install_lmcache_only_where_the_deployment_compresses_kv(tmp_path):
    from thunderops.provision.tasks import engine_task

    plan = _plan()
    inst = plan.instances[0]

    def spec(p, **kw):
        return engine_task(p, inst, deployment="d", node_id="n", cluster="c", **kw)["envs"]["THUNDEROPS_PIP_SPEC"]

    assert spec(plan) == "thunderops[serve]"
    lm = copy.deepcopy(plan)
    lm.inputs["kv_transfer"] = "LMCacheConnectorV1"
    assert spec(lm) == "thunderops[serve,lmcache]"
    whl = tmp_path / "thunderops-1.0-py3-none-any.whl"
    assert spec(lm, wheel=whl) == pip_spec_for(whl, "serve,lmcache")
    assert spec(lm, pip_spec="thunderops==0.1") == "thunderops==0.1"  # the user's spec as given
