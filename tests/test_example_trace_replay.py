"""examples/trace_replay.py runs end to end on a generated trace and on the Azure trace when present."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "trace_replay.py"
AZURE = ROOT.parent / "shared" / "reference" / "traces" / "AzureLLMInferenceTrace_conv.csv"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(EXAMPLE), *args], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)


def test_replays_a_generated_trace(tmp_path):
    trace = tmp_path / "t.csv"
    rows = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    rows += [f"2023-11-16 18:00:{i // 10:02d}.{(i % 10) * 100000:07d},{300 + 37 * (i % 20)},{10 + (i % 50)}"
             for i in range(200)]
    trace.write_text("\n".join(rows) + "\n")
    r = run(str(trace), "--speedup", "1", "50", "--requests", "200")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "200 requests at" in lines[0]
    table = [ln.split() for ln in lines[2:4]]
    assert float(table[1][1]) == pytest.approx(50 * float(table[0][1]), rel=0.02)  # rate scales with speed-up
    assert float(table[1][3]) >= float(table[0][3])  # p99 TTFT never better under 50x the load
    assert lines[-1].startswith("goodput:")


def test_bad_trace_is_one_line_exit_2(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    r = run(str(bad))
    assert r.returncode == 2 and "missing column" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.skipif(not AZURE.exists(), reason="Azure trace not present")
def test_replays_the_azure_conversation_trace():
    r = run(str(AZURE), "--requests", "800", "--speedup", "1", "8")
    assert r.returncode == 0, r.stderr
    assert "AzureLLMInferenceTrace_conv" in r.stdout and "goodput:" in r.stdout
