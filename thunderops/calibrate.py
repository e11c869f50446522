"""GPU calibration: PyTorch micro-benchmarks on the local GPU(s), fitted into the perf model's efficiencies.

Measures (bf16, CUDA graphs, CUDA-event timing): GEMMs of the model's layer shapes over a range of rows,
causal prefill attention at several lengths, streaming memory bandwidth, whole decoder layers (prefill at
several prompt lengths and batches, decode steps at several batch sizes and contexts, for TP shards of the
layer), and NCCL all-reduce across the local GPUs when there are several. Fits compute, attention, memory and
communication efficiencies plus a per-layer overhead, and writes a calibration file
(`catalogs/calibration/<GPU>.json`) holding the fit and every measurement with the model's prediction.

Needs only torch and numpy on the GPU node: `python -m thunderops.calibrate --out H100.json`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from thunderops.errors import UserError
from thunderops.perf import (
    Calibration,
    Op,
    allreduce_time,
    decode_work,
    layer_compute_time,
    layer_ops,
    op_time,
    prefill_work,
)
from thunderops.specs import GpuSpec, ModelSpec, get_gpu, get_model, gpu_names, norm

DEFAULT_MODELS = ("Llama-3.1-8B", "Llama-3.1-70B", "Llama-2-7B")
PREFILL_SHAPES = ((1, 128), (1, 512), (1, 2048), (1, 8192), (4, 512), (8, 1024))  # (prompts, length)
DECODE_SHAPES = ((1, 512), (8, 1024), (32, 1024), (64, 2048), (128, 1024), (256, 512))  # (batch, context)
GEMM_ROWS = (1, 16, 64, 256, 1024, 4096, 8192)
ATTN_LENGTHS = (512, 1024, 2048, 4096, 8192)
# Serving-only overheads. vLLM replays whole decode steps as CUDA graphs, so a layer costs its kernels
# (kernel_latency_s each, measured) and no more; the per-step CPU cost (scheduling, sampling, input prep,
# overlapped in V1) is set from a public vLLM measurement: Llama-3.1-8B on one H100, batch 1, TPOT 6.48 ms
# (docs/perf.md). Other public points are predictions, not fits.
VLLM_LAYER_OVERHEAD_S = 0.0
VLLM_STEP_OVERHEAD_S = 0.3e-3


class CalibrationError(UserError):
    """Calibration cannot run here (no torch, no GPU) or its inputs are bad."""


def _torch():
    try:
        import torch
    except ImportError:
        raise CalibrationError("thunderops calibrate needs PyTorch with CUDA (pip install torch) "
                               "on a machine with an NVIDIA GPU") from None
    if not torch.cuda.is_available():
        raise CalibrationError("thunderops calibrate needs an NVIDIA GPU, and torch sees none here; "
                               "run it on a GPU node")
    return torch


def detect_gpu(device_name: str, memory_bytes: float) -> GpuSpec:
    """Match torch's device name (e.g. 'NVIDIA H100 80GB HBM3') to the GPU catalog."""
    key = norm(device_name.replace("NVIDIA", ""))
    if "h100" in key:
        name = "H100-PCIE" if "pcie" in key else "H100-NVL" if "nvl" in key else "H100"
        return get_gpu(name)
    best = None
    for n in sorted(gpu_names(), key=len, reverse=True):
        if norm(n) in key:
            best = n
            break
    if best is None:
        raise CalibrationError(f"GPU '{device_name}' is not in the catalog; pass --gpu NAME (one of "
                               f"{', '.join(gpu_names())})")
    spec = get_gpu(best)
    if spec.name == "A100" and memory_bytes > 50e9:
        spec = get_gpu("A100-80GB")
    return spec


# ---------------------------------------------------------------------------------------------- timing


class Bench:
    """CUDA-graph timing of callables on one device."""

    def __init__(self, torch, reps: int = 20):
        self.torch = torch
        self.reps = reps

    def time(self, fn) -> float:
        """Mean seconds per call of fn: warm up on a side stream, capture a CUDA graph, time its replays
        with CUDA events (falls back to eager calls where capture fails)."""
        torch = self.torch
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(s)
        torch.cuda.synchronize()
        run = fn
        try:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn()
            run = g.replay
        except Exception:  # noqa: BLE001 - some kernels cannot be captured; eager timing still counts
            torch.cuda.synchronize()
        run()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(self.reps):
            run()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000.0 / self.reps


# ---------------------------------------------------------------------------------------------- benchmarks


def bench_gemms(torch, bench: Bench, m: ModelSpec, rows=GEMM_ROWS) -> list[dict]:
    """GEMMs of one layer's shapes (TP=1) and the LM head, at several row counts."""
    h, hd = m.hidden, m.head_dim
    shapes = {"qkv": (h, (m.heads + 2 * m.kv_heads) * hd), "o_proj": (m.heads * hd, h),
              "gate_up": (h, 2 * m.intermediate), "down": (m.intermediate, h), "lm_head": (h, m.vocab)}
    out = []
    copies = 4  # distinct weights in turn, so small GEMMs stream them from HBM rather than L2
    for name, (k, n) in shapes.items():
        ws = [torch.randn(k, n, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
        for r in rows:
            x = torch.randn(r, k, device="cuda", dtype=torch.bfloat16)
            y = torch.empty(r, n, device="cuda", dtype=torch.bfloat16)

            def fn(x=x, ws=ws, y=y):
                for w in ws:
                    torch.matmul(x, w, out=y)

            t = bench.time(fn) / copies
            out.append({"kind": "gemm", "model": m.name, "op": name, "m": r, "k": k, "n": n, "measured_s": t})
        ws = []
        torch.cuda.empty_cache()
    return out


def bench_attention(torch, bench: Bench, m: ModelSpec, lengths=ATTN_LENGTHS) -> list[dict]:
    """Causal prefill attention (flash via SDPA) at several lengths, batch chosen to keep ~8k tokens."""
    F = torch.nn.functional
    out = []
    for L in lengths:
        b = max(1, 8192 // L)
        q = torch.randn(b, m.heads, L, m.head_dim, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(b, m.kv_heads, L, m.head_dim, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        fn = _sdpa(F, q, k, v)
        t = bench.time(fn)
        out.append({"kind": "attn_prefill", "model": m.name, "batch": b, "length": L, "measured_s": t})
    return out


def _sdpa(F, q, k, v):
    """Causal SDPA with GQA; repeats K/V heads where this torch lacks enable_gqa."""
    if q.shape[1] != k.shape[1]:
        try:
            F.scaled_dot_product_attention(q[:, :, :8], k[:, :, :8], v[:, :, :8], is_causal=True, enable_gqa=True)
            return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        except (TypeError, RuntimeError):
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)


def bench_memory(torch, bench: Bench) -> list[dict]:
    """Streaming bandwidth: read-only (sum) and copy (read + write) of 2 GiB."""
    n = 2**30  # bf16 elements = 2 GiB
    x = torch.empty(n, device="cuda", dtype=torch.bfloat16).fill_(1)
    y = torch.empty_like(x)
    t_read = bench.time(lambda: torch.sum(x, dtype=torch.float32))
    t_copy = bench.time(lambda: y.copy_(x))
    return [{"kind": "membw", "op": "read", "bytes": 2 * n, "measured_s": t_read},
            {"kind": "membw", "op": "copy", "bytes": 4 * n, "measured_s": t_copy}]


class ShardLayer:
    """One Llama-style decoder layer as one of `tp` GPUs runs it (heads and MLP split, no all-reduce)."""

    def __init__(self, torch, m: ModelSpec, tp: int, decode_impl: str = "matmul"):
        self.torch, self.m, self.tp, self.decode_impl = torch, m, tp, decode_impl
        dt, dev = torch.bfloat16, "cuda"
        h, hd = m.hidden, m.head_dim
        self.qh, self.kvh = m.heads // tp, max(1, m.kv_heads // tp)
        self.inter = m.intermediate // tp
        s = 0.02
        self.w_qkv = torch.randn(h, (self.qh + 2 * self.kvh) * hd, device=dev, dtype=dt) * s
        self.w_o = torch.randn(self.qh * hd, h, device=dev, dtype=dt) * s
        self.w_gu = torch.randn(h, 2 * self.inter, device=dev, dtype=dt) * s
        self.w_d = torch.randn(self.inter, h, device=dev, dtype=dt) * s
        self.n1 = torch.ones(h, device=dev, dtype=dt)
        self.n2 = torch.ones(h, device=dev, dtype=dt)

    def _rope(self, x, cos, sin):
        x1, x2 = x.chunk(2, dim=-1)
        return torch_cat(self.torch, (x1 * cos - x2 * sin, x2 * cos + x1 * sin))

    def prefill(self, x, b: int, L: int, cos, sin):
        F, m = self.torch.nn.functional, self.m
        hd = m.head_dim
        r = F.rms_norm(x, (m.hidden,), self.n1)
        qkv = r @ self.w_qkv
        q, k, v = qkv.split([self.qh * hd, self.kvh * hd, self.kvh * hd], dim=-1)
        q = self._rope(q.view(b, L, self.qh, hd), cos, sin).transpose(1, 2)
        k = self._rope(k.view(b, L, self.kvh, hd), cos, sin).transpose(1, 2)
        v = v.reshape(b, L, self.kvh, hd).transpose(1, 2)
        a = _sdpa(F, q, k, v)().transpose(1, 2).reshape(b * L, self.qh * hd)
        x = x + a @ self.w_o
        r = F.rms_norm(x, (m.hidden,), self.n2)
        g, u = (r @ self.w_gu).chunk(2, dim=-1)
        return x + (F.silu(g) * u) @ self.w_d

    def decode(self, x, kcache, vcache, cos, sin):
        """x: [B, hidden]; caches [B, kv_heads, ctx, hd] (the new token's K/V is written at the last slot)."""
        torch, F, m = self.torch, self.torch.nn.functional, self.m
        hd, B = m.head_dim, x.shape[0]
        r = F.rms_norm(x, (m.hidden,), self.n1)
        qkv = r @ self.w_qkv
        q, k, v = qkv.split([self.qh * hd, self.kvh * hd, self.kvh * hd], dim=-1)
        q = self._rope(q.view(B, self.qh, hd), cos, sin)
        k = self._rope(k.view(B, self.kvh, hd), cos, sin)
        kcache[:, :, -1].copy_(k)
        vcache[:, :, -1].copy_(v.view(B, self.kvh, hd))
        a = decode_attention(torch, q, kcache, vcache, self.decode_impl)
        x = x + a @ self.w_o
        r = F.rms_norm(x, (m.hidden,), self.n2)
        gg, u = (r @ self.w_gu).chunk(2, dim=-1)
        return x + (F.silu(gg) * u) @ self.w_d


def torch_cat(torch, parts):
    return torch.cat(parts, dim=-1)


def decode_attention(torch, q, kcache, vcache, impl: str):
    """One decode step's attention: q [B, H, hd] against caches [B, KVH, ctx, hd] -> [B, H*hd].
    'sdpa': torch's fused kernel with GQA (flash decoding where available); 'matmul': QK^T, softmax, PV."""
    B, H, hd = q.shape
    if impl == "sdpa":
        a = torch.nn.functional.scaled_dot_product_attention(q.unsqueeze(2), kcache, vcache, enable_gqa=True)
        return a.reshape(B, H * hd)
    kvh = kcache.shape[1]
    qg = q.view(B, kvh, H // kvh, hd)
    s = torch.matmul(qg, kcache.transpose(-1, -2)) * (hd**-0.5)
    p = torch.softmax(s.float(), dim=-1).to(q.dtype)
    return torch.matmul(p, vcache).reshape(B, H * hd)


def pick_decode_impl(torch) -> str:
    """The fused kernel when this torch runs it on GQA shapes, else plain matmuls."""
    try:
        q = torch.randn(2, 8, 64, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(2, 2, 128, 64, device="cuda", dtype=torch.bfloat16)
        ref = decode_attention(torch, q, k, k, "matmul")
        got = decode_attention(torch, q, k, k, "sdpa")
        return "sdpa" if torch.allclose(ref.float(), got.float(), atol=2e-2, rtol=2e-2) else "matmul"
    except (TypeError, RuntimeError):
        return "matmul"


DECODE_ATTN_SHAPES = ((1, 4096), (8, 2048), (32, 1024), (64, 2048), (128, 1024), (256, 512))


def bench_decode_attention(torch, bench: Bench, m: ModelSpec, impl: str, shapes=DECODE_ATTN_SHAPES) -> list[dict]:
    """Decode attention alone (KV-cache reads) at several batch sizes and contexts."""
    out = []
    for B, ctx in shapes:
        q = torch.randn(B, m.heads, m.head_dim, device="cuda", dtype=torch.bfloat16)
        kc = [torch.randn(B, m.kv_heads, ctx, m.head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
        t = bench.time(lambda q=q, kc=kc: decode_attention(torch, q, kc[0], kc[1], impl))
        out.append({"kind": "attn_decode", "model": m.name, "impl": impl, "batch": B, "context": ctx,
                    "measured_s": t})
    return out


def _layer_shards(m: ModelSpec) -> tuple[int, ...]:
    """TP shards worth measuring: the whole layer, and splits that still give whole KV heads."""
    return tuple(t for t in (1, 2, 4, 8) if m.heads % t == 0 and (t == 1 or m.kv_heads % t == 0)
                 and m.params_per_layer * m.dtype_bytes / t > 40e6)


def bench_layers(torch, bench: Bench, m: ModelSpec, tps=None, copies: int = 3,
                 prefill_shapes=PREFILL_SHAPES, decode_shapes=DECODE_SHAPES, decode_impl: str = "matmul") -> list[dict]:
    """Whole decoder layers (TP shards), prefill and decode, timed over `copies` distinct layers in a row so
    weights stream from HBM rather than L2."""
    out = []
    hd = m.head_dim
    for tp in tps or _layer_shards(m):
        layers = [ShardLayer(torch, m, tp, decode_impl) for _ in range(copies)]
        for b, L in prefill_shapes:
            x = torch.randn(b * L, m.hidden, device="cuda", dtype=torch.bfloat16)
            cos = torch.randn(1, L, 1, hd // 2, device="cuda", dtype=torch.bfloat16)
            sin = torch.randn_like(cos)

            def fn(x=x, b=b, L=L, cos=cos, sin=sin, layers=layers):
                y = x
                for layer in layers:
                    y = layer.prefill(y, b, L, cos, sin)
                return y

            try:
                t = bench.time(fn) / copies
            except torch.cuda.OutOfMemoryError:
                continue
            out.append({"kind": "layer_prefill", "model": m.name, "tp": tp, "prompts": b, "length": L,
                        "measured_s": t})
        for B, ctx in decode_shapes:
            try:
                x = torch.randn(B, m.hidden, device="cuda", dtype=torch.bfloat16)
                kv = [(torch.randn(B, layers[0].kvh, ctx, hd, device="cuda", dtype=torch.bfloat16),
                       torch.randn(B, layers[0].kvh, ctx, hd, device="cuda", dtype=torch.bfloat16))
                      for _ in layers]
                cos = torch.randn(B, 1, hd // 2, device="cuda", dtype=torch.bfloat16)
                sin = torch.randn_like(cos)

                def fn(x=x, kv=kv, cos=cos, sin=sin, layers=layers):
                    y = x
                    for layer, (kc, vc) in zip(layers, kv, strict=True):
                        y = layer.decode(y, kc, vc, cos, sin)
                    return y

                t = bench.time(fn) / copies
            except torch.cuda.OutOfMemoryError:
                continue
            finally:
                kv = None
                torch.cuda.empty_cache()
            out.append({"kind": "layer_decode", "model": m.name, "tp": tp, "batch": B, "context": ctx,
                        "impl": decode_impl, "measured_s": t})
        layers = []
        torch.cuda.empty_cache()
    return out


def _allreduce_worker(rank: int, world: int, port: int, sizes: list[int], q) -> None:  # pragma: no cover - GPU
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # no NVLink multicast
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world)
    res = []
    for n in sizes:
        x = torch.ones(n // 2, device="cuda", dtype=torch.bfloat16)
        for _ in range(5):
            dist.all_reduce(x)
        torch.cuda.synchronize()
        dist.barrier()
        reps = 20
        t0 = time.perf_counter()
        for _ in range(reps):
            dist.all_reduce(x)
        torch.cuda.synchronize()
        res.append({"kind": "allreduce", "bytes": n, "gpus": world, "measured_s": (time.perf_counter() - t0) / reps})
    if rank == 0:
        q.put(res)
    dist.destroy_process_group()


def bench_allreduce(torch, world: int) -> list[dict]:  # pragma: no cover - needs several GPUs
    """NCCL all-reduce across `world` local GPUs, one process each, messages 64 KiB .. 256 MiB."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    sizes = [2**k for k in range(16, 29, 2)]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_allreduce_worker, args=(r, world, port, sizes, q)) for r in range(world)]
    for p in procs:
        p.start()
    res = q.get(timeout=600)
    for p in procs:
        p.join(timeout=60)
    return res


# ---------------------------------------------------------------------------------------------- prediction + fit


def predict(entry: dict, gpu: GpuSpec, cal: Calibration) -> float:
    """The perf model's time for one measurement."""
    kind = entry["kind"]
    if kind == "gemm":
        r, k, n = entry["m"], entry["k"], entry["n"]
        op = Op(entry["op"], 2.0 * r * k * n, 2.0 * (k * n + r * k + r * n), "gemm", r)
        return op_time(op, gpu, cal)
    if kind == "attn_prefill":
        m = get_model(entry["model"])
        pairs = entry["batch"] * entry["length"] * (entry["length"] + 1) / 2
        return op_time(Op("attn", 4 * pairs * m.heads * m.head_dim, 0.0, "attn", entry["length"]), gpu, cal)
    if kind == "attn_decode":
        m = get_model(entry["model"])
        B, ctx = entry["batch"], entry["context"]
        ops = [op for op in layer_ops(m, 1, B, 0, B * ctx, B) if op.name == "attn_decode"]
        return op_time(ops[0], gpu, cal)
    if kind == "membw":
        return op_time(Op("membw", 0.0, entry["bytes"], "mem"), gpu, cal)
    if kind == "allreduce":
        return allreduce_time(entry["bytes"], entry["gpus"], gpu.intra_link_gbps, cal)
    m = get_model(entry["model"])
    if kind == "layer_prefill":
        work = prefill_work([entry["length"]] * entry["prompts"])
    elif kind == "layer_decode":
        work = decode_work(entry["batch"], entry["batch"] * entry["context"])
    else:
        raise ValueError(f"unknown measurement kind {kind!r}")
    from thunderops.perf import Work

    return layer_compute_time(m, gpu, entry["tp"], Work(work.tokens, work.attn_pairs, work.kv_read_tokens,
                                                         work.decode_seqs, 0.0), cal)


def _log_err(entries: list[dict], gpu: GpuSpec, cal: Calibration) -> float:
    if not entries:
        return 0.0
    e = [math.log(predict(x, gpu, cal) / x["measured_s"]) for x in entries]
    return float(np.mean(np.square(e)))


def _search(entries, gpu, cal, name, grid) -> Calibration:
    best, best_err = cal, _log_err(entries, gpu, cal)
    for v in grid:
        c = replace(cal, **{name: float(v)})
        err = _log_err(entries, gpu, c)
        if err < best_err:
            best, best_err = c, err
    return best


def fit(measurements: list[dict], gpu: GpuSpec, base: Calibration | None = None) -> Calibration:
    """Fit the calibration by least squares on log time (coordinate search over grids).

    Micro-benchmarks set the roofline efficiencies: streaming (GEMV-like GEMMs and the read benchmark) gives
    memory_eff and kernel_latency_s; all GEMMs give compute_eff and gemm_m_half; attention gives attn_eff
    and attn_len_half; all-reduce gives comm_eff and comm_latency_s. Whole-layer measurements marked
    role='fit' (the first model's) set only kv_read_eff (decode attention), elementwise_scale and
    layer_overhead_s; the other models' layers
    (role='test') are held out and show how well the model predicts shapes it was not fitted on."""
    cal = replace(base or Calibration(gpu=gpu.name), gpu=gpu.name, layer_overhead_s=0.0)
    by = {k: [x for x in measurements if x["kind"] == k] for k in
          ("gemm", "attn_prefill", "attn_decode", "membw", "allreduce", "layer_prefill", "layer_decode")}
    mem_bound = [x for x in by["gemm"] if x["m"] <= 16] + [x for x in by["membw"] if x["op"] == "read"]
    for _ in range(3 if mem_bound else 0):
        cal = _search(mem_bound, gpu, cal, "memory_eff", np.arange(0.40, 1.001, 0.005))
        cal = _search(mem_bound, gpu, cal, "kernel_latency_s", [0.0, *np.geomspace(0.5e-6, 30e-6, 40)])
    for _ in range(3 if by["gemm"] else 0):
        cal = _search(by["gemm"], gpu, cal, "compute_eff", np.arange(0.30, 1.001, 0.005))
        cal = _search(by["gemm"], gpu, cal, "gemm_m_half", [0.0, *np.geomspace(1, 2048, 45)])
        cal = _search(by["gemm"], gpu, cal, "roofline_p", [1.5, 2, 2.5, 3, 4, 5, 6, 8, 12, 16, 100])
    for _ in range(3 if by["attn_prefill"] else 0):
        cal = _search(by["attn_prefill"], gpu, cal, "attn_eff", np.arange(0.10, 1.001, 0.005))
        cal = _search(by["attn_prefill"], gpu, cal, "attn_len_half", [0.0, *np.geomspace(8, 8192, 41)])
    if by["allreduce"]:
        big = [x for x in by["allreduce"] if x["bytes"] >= 2**24]
        small = [x for x in by["allreduce"] if x["bytes"] <= 2**18]
        cal = _search(big or by["allreduce"], gpu, cal, "comm_eff", np.arange(0.2, 1.001, 0.01))
        cal = _search(small or by["allreduce"], gpu, cal, "comm_latency_s", np.geomspace(1e-6, 1e-3, 61))
    layers = [x for x in by["layer_prefill"] + by["layer_decode"] if x.get("role", "fit") == "fit"]
    # KV-read efficiency from the decode-attention micro-benchmark (same kernel as the layers), else from
    # the fitted model's decode layers (older files)
    impls = {x.get("impl") for x in by["layer_decode"]}
    attn_dec = [x for x in by["attn_decode"] if x.get("impl") in impls] or by["attn_decode"]
    if attn_dec:
        cal = _search(attn_dec, gpu, cal, "kv_read_eff", np.arange(0.30, 1.001, 0.01))
    decode_layers = [x for x in layers if x["kind"] == "layer_decode"] if not attn_dec else []
    for _ in range(3 if layers else 0):
        if decode_layers:
            cal = _search(decode_layers, gpu, cal, "kv_read_eff", np.arange(0.30, 1.001, 0.01))
        cal = _search(layers, gpu, cal, "elementwise_scale", np.arange(0.5, 3.001, 0.02))
        cal = _search(layers, gpu, cal, "layer_overhead_s", [0.0, *np.geomspace(0.5e-6, 200e-6, 60)])
    return replace(cal, source=f"thunderops calibrate on {gpu.name}, {datetime.now(UTC).date().isoformat()}")


def assign_roles(measurements: list[dict], fit_model: str) -> None:
    """Whole-layer measurements of `fit_model` are fitted on; every other model's are held out."""
    for x in measurements:
        if x["kind"].startswith("layer_"):
            x["role"] = "fit" if x["model"] == fit_model else "test"


def _summary(errs) -> dict:
    errs = np.abs(np.asarray(errs, dtype=float))
    return {"n": int(len(errs)), "median_abs_error_pct": round(float(np.median(errs)), 2),
            "p90_abs_error_pct": round(float(np.percentile(errs, 90)), 2),
            "max_abs_error_pct": round(float(np.max(errs)), 2)}


def annotate(measurements: list[dict], gpu: GpuSpec, cal: Calibration) -> dict:
    """Add predicted_s and error_pct to each measurement; return error summaries per kind and for whole
    layers (all, fitted-on, held-out)."""
    for x in measurements:
        p = predict(x, gpu, cal)
        x["predicted_s"] = p
        x["error_pct"] = 100.0 * (p - x["measured_s"]) / x["measured_s"]
    summary = {kind: _summary([x["error_pct"] for x in measurements if x["kind"] == kind])
               for kind in sorted({x["kind"] for x in measurements})}
    layer = [x for x in measurements if x["kind"].startswith("layer_")]
    if layer:
        summary["layers"] = _summary([x["error_pct"] for x in layer])
        for role in ("fit", "test"):
            errs = [x["error_pct"] for x in layer if x.get("role") == role]
            if errs:
                summary[f"layers_{role}"] = _summary(errs)
    return summary


def serving_calibration(bench: Calibration) -> Calibration:
    """The calibration vLLM-served layers use: the fitted roofline efficiencies and kernel latency carry over;
    the two parameters that describe our unfused PyTorch benchmark layer (its extra elementwise traffic and
    kernels) do not, and the per-step engine cost is vLLM's (see VLLM_STEP_OVERHEAD_S)."""
    return replace(bench, elementwise_scale=1.0, layer_overhead_s=VLLM_LAYER_OVERHEAD_S,
                   step_overhead_s=VLLM_STEP_OVERHEAD_S)


def bench_calibration(doc: dict) -> Calibration:
    """The calibration that predicts this document's benchmark-layer measurements."""
    return replace(Calibration.from_dict(doc["calibration"]), **doc.get("benchmark_layer", {}).get("params", {}))


def build_document(measurements: list[dict], gpu: GpuSpec, device_name: str, meta: dict) -> dict:
    layer_models = [x["model"] for x in measurements if x["kind"].startswith("layer_")]
    if layer_models:
        assign_roles(measurements, meta.get("fit_model") or layer_models[0])
    bench = fit(measurements, gpu)
    summary = annotate(measurements, gpu, bench)
    serving = serving_calibration(bench)
    note = ("whole-layer measurements are of an unfused PyTorch layer (CUDA graphs); these two fitted values "
            "describe it and replace the serving ones when predicting those measurements")
    return {"gpu": gpu.name, "device_name": device_name, "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
            **meta, "calibration": serving.to_dict(),
            "benchmark_layer": {"params": {"elementwise_scale": bench.elementwise_scale,
                                           "layer_overhead_s": bench.layer_overhead_s}, "note": note},
            "errors": summary, "measurements": measurements}


# ---------------------------------------------------------------------------------------------- entry points


def run_calibration(models: list[str] | None = None, gpu: str | None = None, quick: bool = False,
                    reps: int = 20, log=print) -> dict:
    """Run every benchmark on the local GPU(s), fit, and return the calibration document."""
    specs = [get_model(m) for m in (models or DEFAULT_MODELS)]
    torch = _torch()
    props = torch.cuda.get_device_properties(0)
    spec = get_gpu(gpu) if gpu else detect_gpu(props.name, props.total_memory)
    bench = Bench(torch, reps=reps)
    ms: list[dict] = []
    t0 = time.time()
    steps = [("memory bandwidth", lambda: bench_memory(torch, bench))]
    impl = pick_decode_impl(torch)
    for m in specs if not quick else specs[:1]:
        steps.append((f"GEMMs {m.name}", lambda m=m: bench_gemms(torch, bench, m,
                                                                  GEMM_ROWS[::2] if quick else GEMM_ROWS)))
    steps.append(("attention", lambda: bench_attention(torch, bench, specs[0],
                                                       ATTN_LENGTHS[::2] if quick else ATTN_LENGTHS)))
    steps.append((f"decode attention ({impl})", lambda: bench_decode_attention(torch, bench, specs[0], impl)))
    for m in specs:
        steps.append((f"layers {m.name}", lambda m=m: bench_layers(
            torch, bench, m, tps=(1,) if quick else None,
            prefill_shapes=PREFILL_SHAPES[::2] if quick else PREFILL_SHAPES,
            decode_shapes=DECODE_SHAPES[::2] if quick else DECODE_SHAPES, decode_impl=impl)))
    world = torch.cuda.device_count()
    if world > 1:
        steps.append((f"NCCL all-reduce x{world}", lambda: bench_allreduce(torch, world)))
    errors = {}
    for name, step in steps:
        t = time.time()
        try:
            got = step()
        except Exception as e:  # noqa: BLE001 - one failed benchmark should not lose the others
            errors[name] = f"{type(e).__name__}: {e}"[:300]
            log(f"  {name}: FAILED {errors[name]}")
            torch.cuda.empty_cache()
            continue
        ms.extend(got)
        log(f"  {name}: {len(got)} measurements in {time.time() - t:.1f}s")
    if not ms:
        raise CalibrationError(f"every benchmark failed: {errors}")
    meta = {"torch": torch.__version__, "cuda": torch.version.cuda, "gpus": world,
            "models": [m.name for m in specs], "benchmark_errors": errors, "wall_s": round(time.time() - t0, 1)}
    return build_document(ms, spec, props.name, meta)


def write_document(doc: dict, out: str | Path) -> Path:
    """Write atomically (temp file, then rename)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(out)
    return out


def refit_file(path: str | Path, gpu: str | None = None) -> dict:
    """Re-fit a calibration file's stored measurements (after a change to the model; no GPU needed)."""
    try:
        doc = json.loads(Path(path).read_text())
        measurements = doc["measurements"]
        spec = get_gpu(gpu or doc["gpu"])
    except OSError as e:
        raise CalibrationError(f"{path}: cannot read calibration file ({e.strerror})") from None
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CalibrationError(f"{path}: not a calibration file with measurements ({e})") from None
    meta = {k: v for k, v in doc.items() if k not in ("calibration", "errors", "measurements", "gpu",
                                                       "device_name", "measured_at", "benchmark_layer")}
    return {**build_document(measurements, spec, doc.get("device_name", ""), meta),
            "measured_at": doc.get("measured_at")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m thunderops.calibrate", description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", help="model(s) whose layer shapes to measure (repeatable)")
    ap.add_argument("--gpu", help="GPU catalog name (default: detected)")
    ap.add_argument("--out", help="output file (default: catalogs/calibration/<GPU>.json)")
    ap.add_argument("--quick", action="store_true", help="fewer shapes (about a minute)")
    ap.add_argument("--refit", help="re-fit an existing calibration file's measurements (no GPU needed)")
    args = ap.parse_args(argv)
    try:
        if args.refit:
            doc = refit_file(args.refit, args.gpu)
        else:
            doc = run_calibration(args.model, args.gpu, args.quick, log=lambda s: print(s, file=sys.stderr))
        from thunderops.perf import calibration_dir

        out = write_document(doc, args.out or calibration_dir() / f"{doc['gpu']}.json")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(json.dumps({"out": str(out), "calibration": doc["calibration"], "errors": doc["errors"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
