"""Workloads: presets match the Azure 2023 traces, traces load and rescale, bad traces are one clear line."""

from __future__ import annotations

import os
import subprocess

import numpy as np
import pandas as pd
import pytest

from thunderops.errors import WorkloadError
from thunderops.workload import get_workload, load_trace


@pytest.mark.parametrize("preset, prompt_p50, output_p50", [("coding", 1469, 13), ("conversation", 1020, 129)])
def test_presets_match_the_published_trace_medians(preset, prompt_p50, output_p50):
    # design.md / the traces' README: code prompt p50 1469, output 13; conversation 1020 / 129.
    wl = get_workload(preset)
    assert wl.percentile("prompt", 50) == pytest.approx(prompt_p50, abs=1)
    assert wl.percentile("output", 50) == pytest.approx(output_p50, abs=1)


@pytest.mark.parametrize("preset, file", [("coding", "AzureLLMInferenceTrace_code.csv"),
                                          ("conversation", "AzureLLMInferenceTrace_conv.csv")])
def test_presets_match_the_trace_files(reference_traces, preset, file):
    raw = pd.read_csv(reference_traces / file)
    wl = get_workload(preset)
    for which, col in (("prompt", "ContextTokens"), ("output", "GeneratedTokens")):
        for q in (10, 50, 90, 99):
            assert wl.percentile(which, q) == pytest.approx(np.percentile(raw[col], q), rel=0.02, abs=1)
    stamps = pd.to_datetime(raw["TIMESTAMP"])
    rate = (len(raw) - 1) / (stamps.max() - stamps.min()).total_seconds()
    assert wl.rate == pytest.approx(rate, rel=0.01)
    # The loader reads the same file to the same distribution.
    trace = load_trace(reference_traces / file)
    assert trace.percentile("prompt", 50) == pytest.approx(wl.percentile("prompt", 50), abs=1)
    assert len(trace.trace) == len(raw)


def test_sampling_a_preset_follows_its_rate_and_lengths():
    wl = get_workload("conversation", rate=20)
    reqs = wl.sample(20_000, seed=3)
    assert len(reqs) == 20_000 and np.all(np.diff(reqs.arrival) > 0)
    assert len(reqs) / reqs.arrival[-1] == pytest.approx(20, rel=0.03)
    assert np.median(reqs.prompt) == pytest.approx(wl.percentile("prompt", 50), rel=0.05)
    assert np.median(reqs.output) == pytest.approx(wl.percentile("output", 50), rel=0.05)
    assert reqs.prompt.min() >= 1 and reqs.output.min() >= 1
    again, other = wl.sample(20_000, seed=3), wl.sample(20_000, seed=4)
    assert np.array_equal(again.prompt, reqs.prompt) and np.array_equal(again.arrival, reqs.arrival)  # seeded
    assert not np.array_equal(other.prompt, reqs.prompt)


def test_trace_rescaling_compresses_time_and_keeps_lengths(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                    "2023-11-16 18:00:00.0000000,100,10\n2023-11-16 18:00:02.5000000,200,20\n"
                    "2023-11-16 18:00:01.0000000,300,30\n2023-11-16 18:00:04.0000000,400,40\n")
    wl = load_trace(path)
    assert wl.rate == pytest.approx(3 / 4)
    assert wl.trace.arrival.tolist() == [0, 1.0, 2.5, 4.0] and wl.trace.prompt.tolist() == [100, 300, 200, 400]
    fast = get_workload(str(path), rate=3.0)
    assert fast.rate == 3.0 and fast.trace.arrival.tolist() == pytest.approx([0, 0.25, 0.625, 1.0])
    assert fast.trace.output.tolist() == wl.trace.output.tolist()
    reqs = fast.sample(10)  # replays, cycling past the end
    assert reqs.prompt.tolist() == [100, 300, 200, 400] * 2 + [100, 300]
    assert np.all(np.diff(reqs.arrival) > 0)
    seconds = tmp_path / "s.csv"
    seconds.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n0,5,1\n10,6,2\n")
    assert load_trace(seconds).rate == pytest.approx(0.1)


@pytest.mark.parametrize("content, fragment", [
    ("TIME,ContextTokens,GeneratedTokens\n0,1,1\n1,1,1\n", "missing column(s) TIMESTAMP"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n0,1,1\n1,x,1\n", ":3: bad number"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n0,1,1\nyesterday,1,1\n", ":3: bad number or timestamp"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n0,1,1\n1,0,1\n", ":3: token counts"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n0,1,1\n1,1,99999999999999999999\n", ":3: token counts"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n0,1,1\n", "at least 2 requests"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n5,1,1\n5,2,2\n", "one timestamp"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n1e308,1,1\n-1e308,2,2\n", "span"),
    # found by test_catalog_properties: a subnormal span made the rate infinite
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n0.0,1,1\n2.225073858507203e-309,1,1\n", "too short for a request rate"),
])
def test_bad_traces_name_file_and_row(tmp_path, content, fragment):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(WorkloadError) as e:
        load_trace(path)
    assert fragment in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)


def test_bad_names_and_rates():
    with pytest.raises(WorkloadError, match="did you mean: coding"):
        get_workload("codding")
    for rate in (0, -1, float("nan"), float("inf")):
        with pytest.raises(WorkloadError, match="positive"):
            get_workload("coding", rate=rate)
    with pytest.raises(WorkloadError, match="no-such.csv"):
        get_workload("/nonexistent/no-such.csv")


def test_workload_show_cli(thunderops_cli, tmp_path):
    ok = subprocess.run([thunderops_cli, "workload", "show", "coding", "--rate", "4", "--json"], capture_output=True,
                        text=True, timeout=60)
    assert ok.returncode == 0 and '"rate_rps": 4.0' in ok.stdout and '"prompt_p50": 1469' in ok.stdout
    bad = tmp_path / "bad.csv"
    bad.write_text("TIMESTAMP,ContextTokens\n0,1\n")
    for args in (["workload", "show", str(bad)], ["workload", "show", "coding", "--rate", "-2"],
                 ["workload", "show", "nonsense"]):
        proc = subprocess.run([thunderops_cli, *args], capture_output=True, text=True, timeout=60,
                              env={**os.environ, "COLUMNS": "200"})
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
