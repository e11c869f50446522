"""The README's two quickstart commands: CI runs the second one (.ci/run), this runs the first as written."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def quickstart_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, re.S)]


def test_readme_has_exactly_two_quickstart_commands():
    commands = quickstart_commands()
    assert len(commands) == 2
    assert all("\n" not in c for c in commands)


def test_ci_runs_the_readme_test_command_and_nothing_else():
    test_command = quickstart_commands()[1]
    ci_lines = [line for line in (ROOT / ".ci/run").read_text().splitlines()
                if line.strip() and not line.startswith("#") and not line.startswith(("set ", "cd "))]
    assert ci_lines == [test_command]


@pytest.mark.slow
def test_readme_main_job_runs_as_written(tmp_path):
    """Run the first quickstart command in bash from the repo root, exactly as a user would paste it."""
    env = dict(os.environ, THUNDEROPS_HOME=str(tmp_path / "home"))
    env.pop("VIRTUAL_ENV", None)
    proc = subprocess.run(["bash", "-c", quickstart_commands()[0]], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "$/h" in out  # the plan's cost is shown with its unit
    assert not (tmp_path / "home" / "state.db").exists() or "dry-run" in out.lower()
