"""Performance model: closed-form operator costs, memory facts, regimes, monotonicity, capacities, errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from thunderops.errors import PlanError, UserError, WorkloadError
from thunderops.perf import (
    Calibration,
    DoesNotFitError,
    Layout,
    ParallelismError,
    PerfModel,
    StageLayout,
    Work,
    allreduce_time,
    calibration_dir,
    decode_work,
    layer_ops,
    layout_of,
    load_calibration_file,
    mg1_miss_probability,
    op_time,
    prefill_work,
    tpot_miss_probability,
    usable_memory_bytes,
)
from thunderops.plan import SLO
from thunderops.sim import homogeneous_plan
from thunderops.specs import ModelSpec, get_gpu, get_model
from thunderops.workload import get_workload

H100 = get_gpu("H100")
A100 = get_gpu("A100-80GB")
L4 = get_gpu("L4")


def gemm_flops(ops):
    return sum(op.flops for op in ops if op.kind == "gemm")


# -- closed-form FLOPs and bytes of a layer


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_layer_gemm_flops_and_weight_bytes_closed_form(tp):
    m = get_model("Llama-3.1-8B")
    T = 3000
    ops = layer_ops(m, tp, T)
    h, hd, I = m.hidden, m.head_dim, m.intermediate  # noqa: E741
    # q, k, v, o projections + gate, up, down: 2 FLOPs per multiply-accumulate
    expected = 2 * T * (h * (m.heads + 2 * m.kv_heads) * hd + m.heads * hd * h + 3 * h * I) / tp
    assert gemm_flops(ops) == pytest.approx(expected, rel=1e-12)
    # every GEMM reads its weight shard once: the layer's matmul weights / tp
    assert {op.name for op in ops} >= {"qkv", "o_proj", "gate_up", "down"}
    one_token = layer_ops(m, tp, 1)
    weight_bytes = sum(op.bytes for op in one_token if op.kind == "gemm")
    matmul_params = m.params_per_layer - 2 * h
    assert weight_bytes == pytest.approx(m.dtype_bytes * matmul_params / tp, rel=0.01)


def test_prefill_attention_flops_are_causal_quadratic():
    m = get_model("Llama-2-7B")
    L = 4096
    w = prefill_work([L])
    (attn,) = [op for op in layer_ops(m, 1, w.tokens, w.attn_pairs) if op.kind == "attn"]
    # QK^T and PV over the lower triangle: 2 matmuls x 2 FLOPs x L(L+1)/2 pairs x head_dim x heads
    assert attn.flops == pytest.approx(4 * L * (L + 1) / 2 * m.head_dim * m.heads)
    w2 = prefill_work([2 * L])
    (attn2,) = [op for op in layer_ops(m, 1, w2.tokens, w2.attn_pairs) if op.kind == "attn"]
    assert attn2.flops / attn.flops == pytest.approx(4, rel=1e-3)


def test_decode_attention_reads_the_kv_cache_once():
    m = get_model("Llama-3.1-70B")
    for tp in (1, 8, 16):
        B, ctx = 32, 1000
        ops = layer_ops(m, tp, B, 0, B * ctx, B)
        (kv,) = [op for op in ops if op.name == "attn_decode"]
        kv_heads = max(1, m.kv_heads / tp)  # replicated once tp exceeds the KV heads
        assert kv.bytes >= B * ctx * 2 * kv_heads * m.head_dim * m.dtype_bytes
        assert kv.bytes < 1.01 * B * ctx * 2 * kv_heads * m.head_dim * m.dtype_bytes + 1e6


def test_moe_touches_only_routed_experts_for_one_token():
    m = get_model("Mixtral-8x7B")
    one = {op.name: op for op in layer_ops(m, 1, 1)}
    many = {op.name: op for op in layer_ops(m, 1, 4096)}
    expert_bytes = 3 * m.hidden * m.intermediate * m.dtype_bytes
    assert one["experts"].bytes == pytest.approx(m.experts_per_token * expert_bytes, rel=0.01)
    activations = m.dtype_bytes * 4096 * m.experts_per_token * (2 * m.hidden + 3 * m.intermediate)
    assert many["experts"].bytes == pytest.approx(m.experts * expert_bytes + activations, rel=0.01)
    assert one["experts"].flops == pytest.approx(2 * m.experts_per_token * 3 * m.hidden * m.intermediate)


def test_ring_allreduce_formula():
    cal = Calibration(comm_eff=1.0, comm_latency_s=0.0)
    nbytes = 1e9
    # 2(tp-1)/tp of the message over one direction of a 900 GB/s (bidirectional) link
    assert allreduce_time(nbytes, 8, 900, cal) == pytest.approx(2 * 7 / 8 * nbytes / 450e9)
    assert allreduce_time(nbytes, 1, 900, cal) == 0.0


# -- memory facts


def test_llama2_70b_does_not_fit_one_80gb_gpu_in_bf16():
    pm = PerfModel("Llama-2-70B")
    assert get_model("Llama-2-70B").weight_bytes > 130e9
    assert not pm.fits(Layout.single("H100", 1, 80))
    assert not pm.fits(Layout.single("A100-80GB", 1, 80))
    assert pm.fits(Layout.single("H100", 4, 80))
    assert pm.kv_capacity_tokens(Layout.single("H100", 1, 80)) == 0
    with pytest.raises(DoesNotFitError, match="add GPUs"):
        pm.require_fit(Layout.single("H100", 1, 80))


def test_kv_capacity_follows_vllms_formula():
    """vLLM: tokens = (total x utilization - weights - peak activations) / (2 x layers x kv_heads x head_dim
    x dtype) per GPU. One public vLLM log (issue 33263): 'Available KV cache memory: 18.78 GiB' ->
    'GPU KV cache size: 175,856 tokens' for Qwen3-1.7B (28 layers, 8 KV heads of 128)."""
    qwen = ModelSpec("Qwen3-1.7B", "Qwen/Qwen3-1.7B", 28, 2048, 16, 8, 6144, 151936)
    assert 18.78 * 2**30 / qwen.kv_bytes_per_token == pytest.approx(175_856, rel=1e-3)
    pm = PerfModel("Llama-3.1-8B", mem_util=0.9)
    layout = Layout.single("H100", 1, 32)
    m = pm.model
    free = usable_memory_bytes(H100) * 0.9 - m.weight_bytes - pm.activation_reserve_bytes(1, layout)
    assert pm.kv_capacity_tokens(layout) == int(free / m.kv_bytes_per_token)
    # TP shards both the weights and the KV heads: capacity more than doubles from 1 to 2 GPUs
    two = pm.kv_capacity_tokens(Layout.single("H100", 2, 32))
    assert two > 2 * pm.kv_capacity_tokens(layout)
    # utilization is the lever vLLM exposes
    assert PerfModel("Llama-3.1-8B", mem_util=0.5).kv_capacity_tokens(layout) < pm.kv_capacity_tokens(layout)


# -- regimes


def test_decode_is_memory_bound_and_prefill_compute_bound():
    m = get_model("Llama-3.1-8B")
    cal = Calibration(roofline_p=100.0, kernel_latency_s=0.0)
    peak, bw = H100.bf16_tflops * 1e12, H100.memory_gbps * 1e9
    for op in layer_ops(m, 1, 8):  # 8 decode sequences: GEMMs limited by streaming the weights
        if op.kind == "gemm":
            assert op.bytes / (bw * cal.memory_eff) > op.flops / (peak * cal.compute_eff)
    for op in layer_ops(m, 1, 4096, 4096 * 4097 / 2):  # a 4k-token prompt: limited by FLOPs
        if op.kind in ("gemm", "attn"):
            assert op.flops / (peak * cal.compute_eff) > op.bytes / (bw * cal.memory_eff)
    pm = PerfModel(m)
    layout = Layout.single("H100", 1, 32)
    # decode: 8x the batch costs far less than 8x the time (weights are read once per step)
    assert pm.decode_step_time(layout, 64, 64 * 512) < 2 * pm.decode_step_time(layout, 8, 8 * 512)
    # prefill: time grows about linearly with tokens once compute-bound
    t1, t2 = pm.prefill_time(layout, [2048]), pm.prefill_time(layout, [2048] * 4)
    assert 3.3 < t2 / t1 < 4.5
    # one decode step of a single sequence streams the whole model at about the memory bandwidth
    lower = m.weight_bytes / (H100.memory_gbps * 1e9)
    assert lower < pm.decode_step_time(layout, 1, 100) < 2.5 * lower


def test_faster_gpu_is_faster():
    pm = PerfModel("Llama-3.1-8B")
    for gpu in ("H100", "A100-80GB", "L40S"):
        assert pm.fits(Layout.single(gpu, 1, 32))
    h, a, l40 = (Layout.single(g, 1, 32) for g in ("H100", "A100-80GB", "L40S"))
    assert pm.prefill_time(h, [1000]) < pm.prefill_time(a, [1000])
    assert pm.decode_step_time(h, 16, 16000) < pm.decode_step_time(a, 16, 16000) < pm.decode_step_time(l40, 16, 16000)


# -- monotonicity


WL = get_workload("conversation")
SLO_ = SLO(ttft_s=1.0, tpot_s=0.05, attainment=0.9)


@pytest.mark.parametrize("phase", ["prefill", "decode", "colocated"])
def test_capacity_monotone_in_gpus(phase):
    pm = PerfModel("Llama-3.1-70B")
    caps = [pm.capacity(Layout.single("H100", tp, 80), phase, WL, SLO_) for tp in (2, 4, 8)]
    assert caps[0] <= caps[1] <= caps[2]
    assert caps[2] > 0


@pytest.mark.parametrize("phase", ["prefill", "decode", "colocated"])
def test_capacity_monotone_in_links(phase):
    pm = PerfModel("Llama-3.1-70B")
    stages = ((H100, 4), (H100, 4))
    caps, times = [], []
    for gbps in (5, 25, 100, 400, math.inf):
        layout = Layout(tuple(StageLayout(g, tp, 40) for g, tp in stages), pp_link_gbps=gbps)
        caps.append(pm.capacity(layout, phase, WL, SLO_))
        times.append(pm.prefill_time(layout, [2000, 3000]))
    assert all(a <= b + 1e-9 for a, b in zip(caps, caps[1:], strict=False))
    assert all(a >= b for a, b in zip(times, times[1:], strict=False))
    tp_times = [pm.decode_step_time(Layout(((StageLayout(H100, 8, 80)),), tp_link_gbps=bw), 64, 64000)
                for bw in (64, 300, 900)]
    assert tp_times[0] > tp_times[1] > tp_times[2]


def test_capacity_monotone_in_memory_bandwidth():
    from dataclasses import replace

    pm = PerfModel("Llama-3.1-8B")
    times = []
    for gbps in (1000, 2000, 3350, 5000):
        gpu = replace(H100, name=f"H100-{gbps}", memory_gbps=gbps)
        layout = Layout.single(gpu, 1, 32)
        times.append((pm.decode_step_time(layout, 32, 32000), pm.capacity(layout, "decode", WL, SLO_)))
    assert all(a[0] > b[0] and a[1] <= b[1] for a, b in zip(times, times[1:], strict=False))


def test_capacity_decreases_with_tighter_slo_and_is_cached():
    pm = PerfModel("Llama-3.1-8B")
    layout = Layout.single("H100", 1, 32)
    loose = pm.capacity(layout, "decode", WL, SLO(2.0, 0.1))
    tight = pm.capacity(layout, "decode", WL, SLO(2.0, 0.02))
    assert tight < loose
    assert pm.capacity(layout, "decode", WL, SLO(2.0, 0.001)) == 0.0  # below one step's time
    assert pm.capacity(layout, "prefill", WL, SLO(0.001, 0.1)) == 0.0
    before = len(pm._cap_cache)
    pm.capacity(layout, "decode", WL, SLO(2.0, 0.1))
    assert len(pm._cap_cache) == before


# -- heterogeneous pipelines and layer split


def test_share_of_requests_longer_than_a_length(tmp_path):
    wl = get_workload("coding")
    drawn = wl.sample(100_000, seed=3)
    for tokens in (1000, 2500, 5000):
        assert wl.share_longer_than(tokens) == pytest.approx(np.mean(drawn.prompt + drawn.output > tokens), abs=0.01)
    assert wl.share_longer_than(wl.prompt_quantiles[-1] + wl.output_quantiles[-1]) == 0.0
    # a trace counts its own (prompt, output) pairs: here long prompts come with short outputs
    path = tmp_path / "trace.csv"
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "".join(
        f"2023-11-16 18:15:{k:02d}.000,{p},{o}\n" for k, (p, o) in enumerate([(100, 900)] * 5 + [(900, 100)] * 5)))
    trace = get_workload(str(path))
    assert trace.share_longer_than(999) == 1.0 and trace.share_longer_than(1000) == 0.0


def test_requests_longer_than_the_kv_cache_count_against_the_attainment():
    """One H100 holds LLaMA-30B with about 2,500 tokens of KV; 29 % of `coding` requests are longer and are never
    served. So no rate meets a 90 % attainment (as in the simulator, which rejects them), a 60 % one is met."""
    from thunderops.sim import simulate

    pm = PerfModel("llama-30b")
    plan = homogeneous_plan("llama-30b", "H100", colocated=(1, 1), gpus_per_node=1)
    layout = pm.split_layers([("H100", 1)], "colocated")
    wl = get_workload("coding")
    assert 0.2 < wl.share_longer_than(pm.kv_capacity_tokens(layout)) < 0.4
    for phase in ("prefill", "decode", "colocated"):
        assert pm.capacity(layout, phase, wl, SLO(2.0, 0.1, 0.9)) == 0.0, phase
        assert pm.capacity(layout, phase, wl, SLO(2.0, 0.1, 0.6)) > 0, phase
    sim = simulate(plan, wl, SLO(2.0, 0.1, 0.9), rate=0.2, n=400, perf=pm)
    assert sim.rejected > 0.2 * 400 and sim.summary()["slo_attainment"] < 0.8
    # a workload that fits is not charged
    short = get_workload("coding").__class__("short", 1.0, tuple([500.0] * 101), tuple([100.0] * 101))
    assert short.share_longer_than(pm.kv_capacity_tokens(layout)) == 0.0
    assert pm.capacity(layout, "colocated", short, SLO(2.0, 0.1, 0.9)) > 0


def test_split_layers_follows_stage_speed_and_memory():
    pm = PerfModel("Llama-3.1-70B")
    layout = pm.split_layers([(H100, 2), (A100, 2)], "prefill")
    assert layout is not None and layout.layers == 80
    fast, slow = layout.stages
    assert fast.layers > slow.layers  # the H100 stage (3x the FLOPs) takes more layers
    assert pm.fits(layout)
    # stage times end up balanced within one layer's time
    w = prefill_work([2048])
    t = [pm.stage_time(layout, i, w) for i in range(2)]
    one_layer = max(t[0] / fast.layers, t[1] / slow.layers)
    assert abs(t[0] - t[1]) <= one_layer * 1.01
    # memory caps a stage: small GPUs cannot take their speed share of a large model
    assert pm.split_layers([(L4, 1), (L4, 1)], "decode") is None
    # the slowest stage sets a full pipeline's pace
    assert pm.interval_time(layout, w) == pytest.approx(max(t) + pm.step_overhead(layout))


def test_kv_transfer_time_scales_with_link_and_compression():
    pm = PerfModel("Llama-3.1-70B")
    raw = pm.kv_transfer_time(2000, 10)
    assert raw == pytest.approx(2000 * pm.model.kv_bytes_per_token * 8 / 10e9, rel=0.01)
    assert pm.kv_transfer_time(2000, 100) < raw
    assert pm.kv_transfer_time(2000, 10, compression=0.25) == pytest.approx(raw / 4, rel=0.01)
    with pytest.raises(PlanError):
        pm.kv_transfer_time(2000, 0)


def test_layout_of_reads_plan_links():
    plan = homogeneous_plan("Llama-3.1-70B", "A100-80GB", prefill=(1, 4), pp=2, gpus_per_node=4, network_gbps=50)
    g = plan.groups[0]
    layout = layout_of(plan, g, PerfModel(plan.model))
    assert layout.pp == 2 and layout.pp_link_gbps == 50
    a, b = g.stages[0].instance, g.stages[1].instance
    plan.bandwidth_gbps = {a: {b: 12.5}}
    assert layout_of(plan, g).pp_link_gbps == 12.5


# -- queueing formula


def test_mg1_miss_probability_limits():
    lat = np.full(10, 0.1)
    assert mg1_miss_probability(0.0, 0.1, 0.01, lat, 0.5) == 0.0
    assert mg1_miss_probability(20.0, 0.1, 0.01, lat, 0.5) == 1.0
    p = [mg1_miss_probability(lam, 0.1, 0.01, lat, 0.5) for lam in (1, 5, 8, 9.5)]
    assert p == sorted(p) and p[-1] > p[0]


def test_colocated_tpot_tail_grows_with_rate_and_hits_short_requests():
    steps = np.array([5.0, 12.0, 50.0, 400.0])
    extra = np.array([0.001, 0.01, 0.05, 0.2])  # mixed steps' extra seconds per prompt, long tail
    assert tpot_miss_probability(steps, 3.0, 0.06, extra, 0.05) == 1.0  # pure steps alone miss
    assert tpot_miss_probability(steps, 3.0, 0.01, np.zeros(4), 0.05) == 0.0  # no prompts to interfere
    p = [tpot_miss_probability(steps, lam, 0.01, extra, 0.05) for lam in (0.5, 2.0, 5.0, 10.0)]
    assert p == sorted(p) and p[-1] > p[1] > 0
    # a request with few steps meets one long prompt's mixed steps more often than the long request averages it out
    short = tpot_miss_probability(np.array([5.0]), 2.0, 0.01, extra, 0.05)
    long = tpot_miss_probability(np.array([400.0]), 2.0, 0.01, extra, 0.05)
    assert short > long


# -- calibration files


def test_shipped_calibrations_load_and_apply():
    for gpu in ("H100", "H200"):
        cal, doc = load_calibration_file(calibration_dir() / f"{gpu}.json")
        assert cal.gpu == gpu and 0.3 < cal.compute_eff <= 1 and 0.3 < cal.memory_eff <= 1
        assert doc["measurements"] and all("predicted_s" in x for x in doc["measurements"])
        assert PerfModel("Llama-3.1-8B").calibration_for(get_gpu(gpu)) == cal
    custom = Calibration(gpu="H100", compute_eff=0.35)
    slow = PerfModel("Llama-3.1-8B", calibration={"H100": custom})
    layout = Layout.single("H100", 1, 32)
    assert slow.prefill_time(layout, [4096]) > PerfModel("Llama-3.1-8B").prefill_time(layout, [4096])


def test_bad_calibration_file(tmp_path):
    p = tmp_path / "x.json"
    p.write_text("{nope")
    with pytest.raises(PlanError, match="not valid JSON"):
        load_calibration_file(p)
    p.write_text(json.dumps({"calibration": {"compute_eff": 7}}))
    with pytest.raises(PlanError, match="out of range"):
        load_calibration_file(p)


# -- bad input


def test_tp_must_divide_heads():
    pm = PerfModel("LLaMA-30B")  # 52 heads
    with pytest.raises(ParallelismError, match="does not divide"):
        pm.kv_capacity_tokens(Layout.single("H100", 8, 60))
    assert not pm.fits(Layout.single("H100", 8, 60))
    assert pm.fits(Layout.single("H100", 4, 60))
    with pytest.raises(ParallelismError, match="layers"):
        pm.prefill_time(Layout.single("H100", 4, 59), [100])
    with pytest.raises(UserError):
        pm.split_layers([(H100, 8)], "prefill")


def test_unknown_phase_and_bad_rate():
    pm = PerfModel("Llama-3.1-8B")
    with pytest.raises(PlanError, match="phase"):
        pm.capacity(Layout.single("H100", 1, 32), "both", WL, SLO_)
    for rate in (0, -1, float("nan")):
        with pytest.raises(WorkloadError):
            WL.with_rate(rate)


def test_work_helpers():
    w = prefill_work([3, 5])
    assert w.tokens == 8 and w.attn_pairs == 6 + 15 and w.logit_rows == 2
    d = decode_work(4, 400)
    assert d.scaled(0.5) == Work(2, 0, 200, 2, 2)
    assert op_time(layer_ops(get_model("Llama-3.1-8B"), 1, 1)[0], H100, Calibration()) > 0


def test_memoised_layer_times_stay_bounded_and_change_no_figure(monkeypatch):
    """The (GPU, TP, link, work) memo gives what a fresh model computes, and clears itself when full."""
    import thunderops.perf as perf_mod

    monkeypatch.setattr(perf_mod, "LAYER_CACHE_MAX", 50)
    warm = PerfModel("Llama-3.1-8B")
    layout = warm.split_layers([("H100", 1)], "decode")
    works = [(b, b * 1500) for b in range(1, 120)]
    first = [warm.decode_step_time(layout, b, ctx) for b, ctx in works]
    assert 0 < len(warm._layer_cache) <= 50
    again = [warm.decode_step_time(layout, b, ctx) for b, ctx in works]  # partly from the memo
    fresh = PerfModel("Llama-3.1-8B")
    assert first == again == [fresh.decode_step_time(layout, b, ctx) for b, ctx in works]
