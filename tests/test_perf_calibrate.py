"""Calibration: the fit recovers known efficiencies, files re-fit reproducibly, device names map to the
catalog, the CLI re-fits without a GPU; the real benchmarks run where a GPU is present."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import pytest

from thunderops import calibrate as cal
from thunderops.perf import Calibration, calibration_dir
from thunderops.specs import get_gpu, get_model


def synthetic(true: Calibration, noise: float = 0.03, seed: int = 0) -> list[dict]:
    """Measurements as a GPU obeying `true` would give them, with multiplicative noise."""
    rng = random.Random(seed)
    gpu, m = get_gpu("H100"), get_model("Llama-3.1-8B")
    ms = []
    for name, (k, n) in {"qkv": (m.hidden, 6144), "down": (m.intermediate, m.hidden), "lm_head": (m.hidden, m.vocab)}.items():
        for r in cal.GEMM_ROWS:
            ms.append({"kind": "gemm", "model": m.name, "op": name, "m": r, "k": k, "n": n})
    ms += [{"kind": "attn_prefill", "model": m.name, "batch": max(1, 8192 // L), "length": L} for L in cal.ATTN_LENGTHS]
    ms += [{"kind": "attn_decode", "model": m.name, "impl": "sdpa", "batch": b, "context": c}
           for b, c in cal.DECODE_ATTN_SHAPES]
    ms.append({"kind": "membw", "op": "read", "bytes": 2**31})
    for model in ("Llama-3.1-8B", "Llama-2-7B"):
        for tp in (1, 2):
            ms += [{"kind": "layer_prefill", "model": model, "tp": tp, "prompts": b, "length": L}
                   for b, L in cal.PREFILL_SHAPES]
            ms += [{"kind": "layer_decode", "model": model, "tp": tp, "batch": b, "context": c, "impl": "sdpa"}
                   for b, c in cal.DECODE_SHAPES]
    for x in ms:
        x["measured_s"] = cal.predict(x, gpu, true) * rng.uniform(1 - noise, 1 + noise)
    return ms


TRUE = Calibration(gpu="H100", compute_eff=0.62, attn_eff=0.45, memory_eff=0.83, gemm_m_half=60.0,
                   attn_len_half=200.0, kernel_latency_s=4e-6, kv_read_eff=0.7, roofline_p=4.0,
                   elementwise_scale=1.4, layer_overhead_s=30e-6)


def test_fit_recovers_known_efficiencies():
    fitted = cal.fit(synthetic(TRUE), get_gpu("H100"))
    for name, tol in (("compute_eff", 0.03), ("memory_eff", 0.03), ("attn_eff", 0.03), ("kv_read_eff", 0.03)):
        assert getattr(fitted, name) == pytest.approx(getattr(TRUE, name), abs=tol), name
    assert fitted.elementwise_scale == pytest.approx(TRUE.elementwise_scale, rel=0.25)


def test_document_holds_fit_errors_and_held_out_layers():
    gpu = get_gpu("H100")
    doc = cal.build_document(synthetic(TRUE, noise=0.02), gpu, "fake H100", {"torch": "none"})
    layers = [x for x in doc["measurements"] if x["kind"].startswith("layer_")]
    assert {x["role"] for x in layers} == {"fit", "test"}
    assert {x["model"] for x in layers if x["role"] == "fit"} == {"Llama-3.1-8B"}
    assert doc["errors"]["layers_test"]["median_abs_error_pct"] < 5  # held-out shapes, same physics
    # serving calibration drops the benchmark-layer parameters; bench_calibration restores them
    assert doc["calibration"]["elementwise_scale"] == 1.0
    assert doc["calibration"]["step_overhead_s"] == cal.VLLM_STEP_OVERHEAD_S
    assert cal.bench_calibration(doc).elementwise_scale == pytest.approx(doc["benchmark_layer"]["params"]["elementwise_scale"])


def test_noisy_measurements_raise_the_reported_error():
    gpu = get_gpu("H100")
    clean = cal.build_document(synthetic(TRUE, noise=0.01), gpu, "x", {})
    noisy = cal.build_document(synthetic(TRUE, noise=0.3, seed=1), gpu, "x", {})
    assert noisy["errors"]["layers"]["median_abs_error_pct"] > clean["errors"]["layers"]["median_abs_error_pct"]


def test_refit_of_shipped_files_is_reproducible(tmp_path):
    for gpu in ("H100", "H200"):
        path = calibration_dir() / f"{gpu}.json"
        shipped = json.loads(path.read_text())
        doc = cal.refit_file(path)
        for k in ("compute_eff", "memory_eff", "attn_eff", "kv_read_eff"):
            assert doc["calibration"][k] == pytest.approx(shipped["calibration"][k], abs=0.02), (gpu, k)
        assert doc["errors"]["layers"]["median_abs_error_pct"] <= 10.0
        assert doc["measured_at"] == shipped["measured_at"]


def test_detect_gpu_from_device_names():
    assert cal.detect_gpu("NVIDIA H100 80GB HBM3", 85e9).name == "H100"
    assert cal.detect_gpu("NVIDIA H100 PCIe", 85e9).name == "H100-PCIE"
    assert cal.detect_gpu("NVIDIA H200", 150e9).name == "H200"
    assert cal.detect_gpu("NVIDIA A100-SXM4-80GB", 85e9).name == "A100-80GB"
    assert cal.detect_gpu("NVIDIA L40S", 48e9).name == "L40S"
    with pytest.raises(cal.CalibrationError, match="--gpu"):
        cal.detect_gpu("Some Future GPU", 1e9)


def test_refit_cli_writes_atomically(tmp_path, monkeypatch):
    out = tmp_path / "H100.json"
    assert cal.main(["--refit", str(calibration_dir() / "H100.json"), "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["gpu"] == "H100" and doc["measurements"]
    assert not list(tmp_path.glob("*.tmp"))
    bad = tmp_path / "bad.json"
    bad.write_text('{"gpu": "H100"}')
    assert cal.main(["--refit", str(bad), "--out", str(tmp_path / "x.json")]) == 2
    assert not (tmp_path / "x.json").exists()


def test_serving_calibration_keeps_the_measured_roofline():
    bench = replace(TRUE, step_overhead_s=5e-3)
    serving = cal.serving_calibration(bench)
    assert serving.compute_eff == bench.compute_eff and serving.kv_read_eff == bench.kv_read_eff
    assert serving.layer_overhead_s == cal.VLLM_LAYER_OVERHEAD_S and serving.elementwise_scale == 1.0


@pytest.mark.gpu
def test_quick_calibration_on_a_real_gpu(tmp_path):
    doc = cal.run_calibration(["Llama-3.1-8B"], quick=True, reps=5, log=lambda s: None)
    assert doc["errors"]["layers"]["median_abs_error_pct"] < 25
    cal.write_document(doc, tmp_path / "x.json")


def test_thunderops_calibrate_refit_cli(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "H200.json"
    code = "import sys; from thunderops.cli import main; sys.argv = ['thunderops', *sys.argv[1:]]; main()"
    r = subprocess.run([sys.executable, "-c", code, "calibrate", "--refit", str(calibration_dir() / "H200.json"),
                        "--out", str(out), "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["calibration"]["gpu"] == "H200" and summary["errors"]["layers"]["n"] > 0
    assert json.loads(out.read_text())["gpu"] == "H200"
