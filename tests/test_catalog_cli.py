"""`thunderops catalog ...` as a user runs it: the console script in a subprocess."""

from __future__ import annotations

import json
import os
import socket
import subprocess

import pandas as pd
import pytest

from thunderops.catalog import skypilot_catalog_dir


def run(exe: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "200", **(env or {})})


def test_list_json_is_filtered_sorted_and_priced(thunderops_cli):
    proc = run(thunderops_cli, "catalog", "list", "--gpu", "a100_80gb", "--cloud", "aws", "--cloud", "GCP",
               "--spot", "--max-price-per-gpu", "3", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert rows and {r["gpu"] for r in rows} == {"A100-80GB"} and {r["cloud"] for r in rows} <= {"aws", "gcp"}
    per_gpu = [r["price_per_gpu_spot"] for r in rows]
    assert per_gpu == sorted(per_gpu) and max(per_gpu) <= 3
    assert all(r["source"] and r["as_of"] and r["price_ondemand"] > 0 for r in rows)


def test_list_table_says_dollars_per_hour(thunderops_cli):
    proc = run(thunderops_cli, "catalog", "list", "--gpu", "H100", "--limit", "3")
    assert proc.returncode == 0, proc.stderr
    assert "$/h" in proc.stdout and "$/GPU-h" in proc.stdout and "more (--limit 0 shows all)" in proc.stdout


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["catalog", "list", "--gpu", "H1OO"], "unknown GPU 'H1OO'"),
        (["catalog", "list", "--cloud", "awz"], "did you mean: aws"),
        (["catalog", "list", "--gpu", "H100", "--max-price-per-gpu", "0.01"], "no offers match"),
        (["catalog", "list", "--catalog", "/nonexistent/offers.csv"], "no such catalog"),
        (["catalog", "export-skypilot", "/tmp", "--cloud", "nocloud"], "unknown cloud"),
        (["catalog", "refresh", "--cloud", "ibmm"], "unknown cloud 'ibmm'"),
        (["catalog", "export-skypilot", "/dev/null/x", "--cloud", "lambda"], "cannot write SkyPilot catalogs"),
    ],
)
def test_bad_input_exits_2_with_one_line(thunderops_cli, args, fragment):
    proc = run(thunderops_cli, *args)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert fragment in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_bad_catalog_row_names_file_and_line(thunderops_cli, tmp_path):
    from thunderops.catalog import OFFER_COLUMNS

    bad = tmp_path / "bad.csv"
    bad.write_text(",".join(OFFER_COLUMNS) + "\n"
                   + "aws,us-east-1,,g6.xlarge,L4,L4,1,4,16,24,-0.8,,,,,test,2026-11-01\n")
    proc = run(thunderops_cli, "catalog", "list", "--catalog", str(bad))
    assert proc.returncode == 2 and f"{bad}:2: price_ondemand='-0.8'" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_gpus_and_models(thunderops_cli):
    gpus = json.loads(run(thunderops_cli, "catalog", "gpus", "--json").stdout)
    h100 = next(g for g in gpus if g["gpu"] == "H100")
    assert h100["memory_gb"] == 80 and "aws" in h100["clouds"] and h100["min_price_per_gpu_ondemand"] > 0
    assert (h100["arch"], h100["not_servable"]) == ("sm90", None)
    v100 = next(g for g in gpus if g["gpu"] == "V100")
    assert v100["arch"] == "sm70" and "CUDA 13" in v100["not_servable"]
    models = json.loads(run(thunderops_cli, "catalog", "models", "--json").stdout)
    llama30 = next(m for m in models if m["model"] == "LLaMA-30B")
    assert (llama30["layers"], llama30["hidden"], llama30["heads"], llama30["intermediate"]) == (60, 6656, 52, 17920)
    table = run(thunderops_cli, "catalog", "models")
    assert table.returncode == 0 and "Mixtral" in table.stdout


def test_export_skypilot_writes_v8_catalogs(thunderops_cli, tmp_path):
    proc = run(thunderops_cli, "catalog", "export-skypilot", str(tmp_path), "--cloud", "lambda", "--cloud", "gcp")
    assert proc.returncode == 0, proc.stderr
    base = skypilot_catalog_dir(tmp_path)
    assert sorted(p.name for p in base.iterdir()) == ["common", "gcp", "lambda"]
    assert len(pd.read_csv(base / "lambda" / "vms.csv")) > 0
    clouds = pd.read_csv(base / "common" / "accelerators.csv")["Clouds"]  # only the exported clouds
    assert set(",".join(clouds).split(",")) == {"GCP", "Lambda"}
    assert f"SKY_RUNTIME_DIR={tmp_path}" in proc.stdout


def test_refresh_offline_is_one_line_and_writes_nothing(thunderops_cli, tmp_path, thunderops_home):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = run(thunderops_cli, "catalog", "refresh", "--timeout", "2",
               env={"THUNDEROPS_SKYPILOT_CATALOG_URL": f"http://127.0.0.1:{port}/v8"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("offline: cannot reach 127.0.0.1") and len(proc.stdout.strip().splitlines()) == 1
    assert not (thunderops_home / "catalogs").exists()
