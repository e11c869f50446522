"""Shared test setup: every test gets its own THUNDEROPS_HOME; marked tests skip when their thing is absent."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import pytest

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"


def _has_gpu() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


def _has_cloud() -> bool:
    # Real-cloud tests cost money: they run only when asked for and credentials exist.
    return os.environ.get("THUNDEROPS_CLOUD_TESTS") == "1" and (
        bool(os.environ.get("AWS_ACCESS_KEY_ID")) or Path("~/.aws/credentials").expanduser().exists()
        or Path("~/.config/gcloud").expanduser().exists()
    )


SKIPS = {
    "gpu": (_has_gpu, "needs an NVIDIA GPU and torch"),
    "vllm": (lambda: importlib.util.find_spec("vllm") is not None, "needs vLLM installed (pip install thunderops[serve])"),
    "cloud": (_has_cloud, "needs cloud credentials and THUNDEROPS_CLOUD_TESTS=1"),
}


def pytest_collection_modifyitems(config, items):
    cache: dict[str, bool] = {}
    for item in items:
        for marker, (check, why) in SKIPS.items():
            if marker in item.keywords:
                if marker not in cache:
                    cache[marker] = check()
                if not cache[marker]:
                    item.add_marker(pytest.mark.skip(reason=why))


@pytest.fixture(autouse=True)
def thunderops_home(tmp_path, monkeypatch) -> Path:
    """Isolate the state store (and anything else under THUNDEROPS_HOME) per test."""
    home = tmp_path / "thunderops-home"
    monkeypatch.setenv("THUNDEROPS_HOME", str(home))
    return home


@pytest.fixture
def reference_traces() -> Path:
    """The Azure 2023 traces beside the checkout (tests only; the product never reads them)."""
    path = REFERENCE / "traces"
    if not (path / "AzureLLMInferenceTrace_code.csv").exists():
        pytest.skip("reference traces not present beside the checkout")
    return path


@pytest.fixture
def thunderops_cli() -> str:
    exe = shutil.which("thunderops")
    if exe is None:
        pytest.skip("thunderops console script not on PATH (pip install -e .)")
    return exe


def system_tool(names: tuple[str, ...], apt_package: str) -> str:
    """Path of a system program the tests need; installed from Debian's packages when missing and we may
    (root with apt-get: a clean CI machine has only what the repo installs), else the test skips."""
    for name in names:
        if exe := shutil.which(name):
            return exe
    if os.geteuid() == 0 and shutil.which("apt-get") and os.environ.get("THUNDEROPS_NO_APT") != "1":
        import subprocess

        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        try:
            subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=300)
            subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", apt_package],
                           env=env, capture_output=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired):
            pass
        for name in names:
            if exe := shutil.which(name):
                return exe
    pytest.skip(f"{names[0]} is not installed (apt-get install -y {apt_package})")


@pytest.fixture
def agents():
    """Real node-agent processes (`thunderops agent`), all stopped after the test."""
    from test_agent import AgentProcs  # tests/ is on sys.path under pytest

    procs = AgentProcs()
    try:
        yield procs
    finally:
        procs.stop_all()
