"""Perf-model accuracy: predicted vs measured per-layer prefill and decode times, from the calibration files
measured on real GPUs (`catalogs/calibration/*.json`, written by `thunderops calibrate`), plus public vLLM
serving measurements. No GPU needed: the measurements are stored in the files and re-predicted here with
the current model code.

Last line: goal (10 %) / median absolute error of per-layer times over all calibrated GPUs (>= 1 meets it).
"""

from __future__ import annotations

import json
import sys

import numpy as np

from thunderops.calibrate import bench_calibration, predict
from thunderops.perf import Layout, PerfModel, calibration_dir
from thunderops.specs import get_gpu

GOAL_PCT = 10.0

# Public vLLM measurements (bf16, single GPU, no TP): (label, model, gpu, batch, context, measured TPOT s, source).
PUBLIC = [
    ("H100 Llama-3.1-8B bs1 TPOT", "Llama-3.1-8B", "H100", 1, 250, 6.48e-3,
     "yobitelcomm.github.io/bench/recipes/concurrency-sweep (vLLM 0.21, conc=1, tpot_p50; used to set the "
     "0.3 ms step overhead)"),
    ("H100 Llama-3.1-8B bs4 TPOT", "Llama-3.1-8B", "H100", 4, 250, 6.59e-3,
     "same page, conc=4 (prefills of other requests ride in some steps)"),
    ("A100-40GB Llama-3.1-8B bs1 TPOT", "Llama-3.1-8B", "A100", 1, 1088, 1 / 75,
     "johnmusgrave.com/p/vllm-throughput-latency-sweep-on (vLLM 0.23, 1024 in / 128 out, ~75 tok/s at C=1)"),
]


def layer_rows(doc: dict) -> list[dict]:
    gpu = get_gpu(doc["gpu"])
    cal = bench_calibration(doc)
    rows = []
    for x in doc["measurements"]:
        if not x["kind"].startswith("layer_"):
            continue
        p = predict(x, gpu, cal)
        shape = (f"{x['prompts']}x{x['length']} tok" if x["kind"] == "layer_prefill"
                 else f"B={x['batch']} ctx={x['context']}")
        rows.append({"gpu": doc["gpu"], "model": x["model"], "tp": x["tp"], "phase": x["kind"][6:], "shape": shape,
                     "role": x.get("role", ""), "measured_us": x["measured_s"] * 1e6, "predicted_us": p * 1e6,
                     "err_pct": 100 * (p - x["measured_s"]) / x["measured_s"]})
    return rows


def main() -> int:
    files = sorted(calibration_dir().glob("*.json"))
    if not files:
        print("no calibration files in catalogs/calibration; run `thunderops calibrate` on a GPU node")
        return 2
    all_rows = []
    for f in files:
        doc = json.loads(f.read_text())
        rows = layer_rows(doc)
        all_rows += rows
        print(f"\n== {doc['gpu']} ({doc.get('device_name', '?')}, torch {doc.get('torch', '?')}, "
              f"measured {doc.get('measured_at', '?')}) ==")
        print(f"{'model':<14}{'tp':>3} {'phase':<8}{'shape':<18}{'role':<5}{'measured us':>12}{'predicted us':>13}"
              f"{'err %':>8}")
        for r in rows:
            print(f"{r['model']:<14}{r['tp']:>3} {r['phase']:<8}{r['shape']:<18}{r['role']:<5}{r['measured_us']:>12.1f}"
                  f"{r['predicted_us']:>13.1f}{r['err_pct']:>8.1f}")
        for phase in ("prefill", "decode"):
            for role in ("fit", "test"):
                e = [abs(r["err_pct"]) for r in rows if r["phase"] == phase and r["role"] == role]
                if e:
                    print(f"  {phase:<8} {role:<4} layers: n={len(e):3d}  median |err| {np.median(e):5.1f} %  "
                          f"p90 {np.percentile(e, 90):5.1f} %")
        e = [abs(r["err_pct"]) for r in rows]
        print(f"  all layers: n={len(e)}  median |err| {np.median(e):.1f} %  p90 {np.percentile(e, 90):.1f} %")

    print("\n== public vLLM measurements (whole model, one GPU) ==")
    for label, model, gpu, batch, ctx, measured, source in PUBLIC:
        pm = PerfModel(model)
        cal = pm.calibration_for(get_gpu(gpu))
        note = "calibrated" if cal.source.startswith("thunderops calibrate") else "datasheet defaults"
        pred = pm.decode_step_time(Layout.single(gpu, 1, pm.model.layers), batch, batch * ctx)
        print(f"{label:<34} measured {measured * 1e3:6.2f} ms  predicted {pred * 1e3:6.2f} ms  "
              f"err {100 * (pred - measured) / measured:+6.1f} %  ({note}; {source})")

    errs = np.abs([r["err_pct"] for r in all_rows])
    for phase in ("prefill", "decode"):
        e = [abs(r["err_pct"]) for r in all_rows if r["phase"] == phase]
        print(f"per-layer {phase}: median |err| {np.median(e):.1f} % over {len(e)} measurements")
    med = float(np.median(errs))
    print(f"perf model accuracy ratio (goal {GOAL_PCT:.0f} % / median |err| {med:.2f} %): {GOAL_PCT / med:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
