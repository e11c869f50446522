"""Property-based tests (hypothesis): any catalog or trace file gives rows or one clear UserError line."""

from __future__ import annotations

import csv
import datetime as dt
import io
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from thunderops.catalog import OFFER_COLUMNS, load_offers
from thunderops.errors import UserError
from thunderops.specs import get_gpu, gpu_names
from thunderops.workload import load_trace

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

junk = st.one_of(st.text(max_size=12), st.sampled_from(["", "nan", "inf", "-1", "0", "1e400", "1,5", '"', "\n",
                                                       "A\n100", "8\n"]))
positive = st.floats(min_value=0.001, max_value=1e4, allow_nan=False).map(lambda x: f"{x:.4f}")
maybe_positive = st.one_of(st.just(""), positive)


def valid_row() -> st.SearchStrategy[dict]:
    return st.fixed_dictionaries({
        "cloud": st.sampled_from(["aws", "gcp", "lambda", "MyCloud"]),
        "region": st.sampled_from(["us-east-1", "eu-west4", "Texas, US, NA"]),
        "zone": st.sampled_from(["", "a", "b", "c"]),
        "instance_type": st.text(alphabet="abcdefgh0123456789.-_", min_size=1, max_size=10),
        "accelerator": st.sampled_from(["", "A100", "H100-MEGA"]),
        "gpu": st.sampled_from(gpu_names() + ["a100_80gb", "h100 sxm5", "RTX-4090"]),
        "gpus_per_node": st.sampled_from(["1", "2", "8", "8.0", "16"]),
        "vcpus": maybe_positive, "memory_gib": maybe_positive, "gpu_memory_gib": maybe_positive,
        "price_ondemand": positive, "price_spot": maybe_positive,
        "host_price_ondemand": st.just(""), "host_price_spot": st.just(""),
        "network_gbps": st.sampled_from(["", "100", "3200"]),
        "source": st.just("test"), "as_of": st.sampled_from(["2026-11-01", "2025-01-31"]),
    })


def mutated_row() -> st.SearchStrategy[dict]:
    """A valid row with some fields replaced by junk."""
    return st.tuples(valid_row(), st.dictionaries(st.sampled_from(OFFER_COLUMNS), junk, max_size=3)).map(
        lambda pair: {**pair[0], **pair[1]})


def to_csv(rows: list[dict], columns: list[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def write_temp(data: str | bytes, suffix: str = ".csv") -> Path:
    f = tempfile.NamedTemporaryFile("wb", suffix=suffix, delete=False)
    with f:
        f.write(data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data)
    return Path(f.name)


def check_offers_or_error(path: Path) -> None:
    try:
        df = load_offers(path)
    except UserError as e:
        assert "\n" not in str(e).strip() and str(path) in str(e), str(e)
        return
    assert len(df) > 0
    assert (df["price_ondemand"] > 0).all() and np.isfinite(df["price_ondemand"]).all()
    assert ((df["price_spot"] > 0) | df["price_spot"].isna()).all()
    assert (df["gpus_per_node"] >= 1).all()
    assert all(get_gpu(g).name == g for g in df["gpu"])
    assert np.allclose(df["price_per_gpu_ondemand"] * df["gpus_per_node"], df["price_ondemand"])
    assert df["price_per_gpu_ondemand"].is_monotonic_increasing


@SETTINGS
@given(st.lists(valid_row(), min_size=1, max_size=8))
def test_valid_rows_all_load(rows):
    # Unique keys, as the loader insists on one row per instance type, region and zone.
    seen, unique = set(), []
    for r in rows:
        key = (r["cloud"].lower(), r["instance_type"], r["region"], r["zone"])
        if key not in seen:
            seen.add(key)
            unique.append(r)
    path = write_temp(to_csv(unique, OFFER_COLUMNS))
    try:
        df = load_offers(path)
        assert len(df) == len(unique)
        assert sorted(df["price_ondemand"].round(4)) == sorted(float(r["price_ondemand"]) for r in unique)
        check_offers_or_error(path)
    finally:
        path.unlink()


@SETTINGS
@given(st.lists(mutated_row(), min_size=0, max_size=6),
       st.lists(st.sampled_from(OFFER_COLUMNS), unique=True, min_size=10, max_size=len(OFFER_COLUMNS)))
def test_mutated_catalogs_give_rows_or_one_clear_line(rows, columns):
    path = write_temp(to_csv(rows, columns))
    try:
        check_offers_or_error(path)
    finally:
        path.unlink()


@SETTINGS
@given(st.one_of(st.binary(max_size=300), st.text(max_size=300)))
def test_arbitrary_files_never_crash_the_catalog_loader(data):
    header = ",".join(OFFER_COLUMNS) + "\n"
    for content in (data, header + data if isinstance(data, str) else header.encode() + data):
        path = write_temp(content)
        try:
            check_offers_or_error(path)
        finally:
            path.unlink()


# -------------------------------------------------------------------------------------------------- traces

good_stamp = st.one_of(st.floats(min_value=0, max_value=1e6, allow_nan=False).map(repr),
                      st.datetimes(min_value=dt.datetime(1990, 1, 1)).map(lambda d: d.isoformat(sep=" ")))
good_tokens = st.integers(min_value=1, max_value=100_000).map(str)
extreme = st.one_of(junk, st.floats().map(repr), st.integers().map(str),
                    st.integers(min_value=2**62, max_value=2**80).map(str), st.sampled_from(["1e308", "-1e308"]),
                    st.datetimes().map(lambda d: d.isoformat()))


@SETTINGS
@given(st.lists(st.tuples(good_stamp, good_tokens, good_tokens).map(list), max_size=10),
       st.lists(st.tuples(st.integers(0, 9), st.integers(0, 2), extreme), max_size=2), st.booleans())
def test_any_trace_gives_a_workload_or_one_clear_line(rows, mutations, full_header):
    for i, col, value in mutations:  # a few cells of an otherwise good trace replaced by extreme values
        if i < len(rows):
            rows[i][col] = value
    columns = ["TIMESTAMP", "ContextTokens", "GeneratedTokens"] if full_header else ["TIMESTAMP", "ContextTokens"]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(columns)
    w.writerows(r[: len(columns)] for r in rows)
    path = write_temp(buf.getvalue())
    try:
        try:
            wl = load_trace(path)
        except UserError as e:
            assert str(path) in str(e) and "\n" not in str(e).strip()
            return
        assert wl.rate > 0 and math.isfinite(wl.rate)
        assert len(wl.trace) >= 2 and (wl.trace.prompt >= 1).all() and (wl.trace.output >= 1).all()
        assert np.all(np.diff(wl.trace.arrival) >= 0) and wl.trace.arrival[0] == 0
        assert all(math.isfinite(q) for q in wl.prompt_quantiles + wl.output_quantiles)
        assert wl.with_rate(wl.rate * 2).trace.arrival[-1] == pytest.approx(wl.trace.arrival[-1] / 2)
    finally:
        path.unlink()


@SETTINGS
@given(st.one_of(st.binary(max_size=200), st.text(max_size=200)))
def test_arbitrary_files_never_crash_the_trace_loader(data):
    for content in (data, ("TIMESTAMP,ContextTokens,GeneratedTokens\n" + data) if isinstance(data, str) else data):
        path = write_temp(content)
        try:
            try:
                load_trace(path)
            except UserError as e:
                assert "\n" not in str(e).strip()
        finally:
            path.unlink()
