"""Engine batch limits (vLLM's --max-num-batched-tokens / --max-num-seqs): vLLM 0.33.0's per-GPU defaults, the
smallest GPU of a group, explicit overrides, and their effect on memory, capacities, the simulator and emulators."""

from __future__ import annotations

import pytest

from thunderops.errors import PlanError
from thunderops.perf import Layout, PerfModel, StageLayout, vllm_batch_defaults
from thunderops.plan import SLO
from thunderops.sim import homogeneous_plan, simulate
from thunderops.specs import get_gpu
from thunderops.workload import Workload, get_workload

SMALL, MID, LARGE = ("L4", "A10G", "A40", "L40S", "A100", "A100-80GB", "T4"), ("H100", "H100-NVL", "H200"), ("B200",)


def fixed(prompt: int, output: int, rate: float) -> Workload:
    return Workload("fixed", rate, (float(prompt),) * 101, (float(output),) * 101)


def test_tiers_follow_vllms_rule():
    """>= 160 GiB: the largest budget; >= 70 GiB and not an A100: the middle; else the smallest. More tokens
    per step come with more sequences, never fewer."""
    small = {vllm_batch_defaults(get_gpu(g)) for g in SMALL}
    mid = {vllm_batch_defaults(get_gpu(g)) for g in MID}
    large = {vllm_batch_defaults(get_gpu(g)) for g in LARGE}
    assert len(small) == len(mid) == len(large) == 1
    (s_tok, s_seq), (m_tok, m_seq), (l_tok, l_seq) = small.pop(), mid.pop(), large.pop()
    assert s_tok < m_tok < l_tok and s_seq <= m_seq <= l_seq
    assert (s_tok, s_seq) == (2048, 256) and (m_tok, m_seq) == (8192, 1024) and (l_tok, l_seq) == (16384, 1024)
    # the A100 exclusion is by name: same memory as an H100, the small tier
    assert get_gpu("A100-80GB").memory_gb == get_gpu("H100").memory_gb
    assert vllm_batch_defaults(get_gpu("A100-80GB")) == vllm_batch_defaults(get_gpu("L4"))


@pytest.mark.parametrize(("gpus", "expect"), [
    (("H100", "L4"), "L4"), (("L4", "H100"), "L4"), (("B200", "H200"), "H200"), (("H200", "B200", "H100"), "H100"),
    (("H100", "A100-80GB"), "A100-80GB"), (("B200", "B200"), "B200"),
])
def test_a_group_takes_its_smallest_gpus_limits(gpus, expect):
    pm = PerfModel("Llama-3.1-8B")
    want = vllm_batch_defaults(get_gpu(expect))
    assert pm.batch_limits([get_gpu(g) for g in gpus]) == want
    assert pm.batch_limits(list(gpus)) == want  # names work too
    layout = Layout(tuple(StageLayout(get_gpu(g), 1, 0) for g in gpus))
    assert pm.batch_limits(layout) == want


def test_explicit_limits_win_everywhere():
    pm = PerfModel("Llama-3.1-8B", max_batch_tokens=4096, max_num_seqs=64)
    for g in ("L4", "H100", "B200"):
        assert pm.batch_limits([g]) == (4096, 64)
    # one explicit value: the other stays vLLM's default, kept valid for vLLM (tokens >= seqs)
    assert PerfModel("Llama-3.1-8B", max_batch_tokens=16384).batch_limits(["L4"]) == (16384, 256)
    assert PerfModel("Llama-3.1-8B", max_batch_tokens=512).batch_limits(["H100"]) == (512, 512)
    assert PerfModel("Llama-3.1-8B", max_num_seqs=4096).batch_limits(["L4"]) == (4096, 4096)
    with pytest.raises(PlanError, match="at least max_num_seqs"):
        PerfModel("Llama-3.1-8B", max_batch_tokens=100, max_num_seqs=200)
    with pytest.raises(PlanError, match="positive integer"):
        PerfModel("Llama-3.1-8B", max_num_seqs=0)


def test_the_token_budget_sets_the_activation_reserve_and_so_kv_capacity():
    """A bigger step budget means bigger peak activations in vLLM's profiling pass, so less KV cache."""
    b200 = Layout.single("B200", 1, 32)
    default, small = PerfModel("Llama-3.1-8B"), PerfModel("Llama-3.1-8B", max_batch_tokens=2048, max_num_seqs=256)
    assert default.activation_reserve_bytes(1, b200) > small.activation_reserve_bytes(1, b200)
    assert default.kv_capacity_tokens(b200) < small.kv_capacity_tokens(b200)
    # on an L4 the default already is that small tier
    l4 = Layout.single("L4", 1, 32)
    assert default.kv_capacity_tokens(l4) == small.kv_capacity_tokens(l4)


def test_capacities_use_the_layouts_limits():
    wl, slo = get_workload("conversation"), SLO(ttft_s=2.0, tpot_s=0.1)
    h100 = Layout.single("H100", 1, 32)
    default = PerfModel("Llama-3.1-8B")
    tier = PerfModel("Llama-3.1-8B", max_batch_tokens=8192, max_num_seqs=1024)
    for phase in ("decode", "colocated", "prefill"):
        assert default.capacity(h100, phase, wl, slo) == tier.capacity(h100, phase, wl, slo)
    # fewer sequences per batch cap decode
    assert PerfModel("Llama-3.1-8B", max_num_seqs=16).capacity(h100, "decode", wl, slo) \
        < default.capacity(h100, "decode", wl, slo)
    # vLLM's trade-off: a smaller step budget chunks prompts finer, good for TPOT, bad for TTFT
    small, long = PerfModel("Llama-3.1-8B", max_batch_tokens=1024), fixed(6000, 200, 1.0)
    ttft_bound, tpot_bound = SLO(ttft_s=1.0, tpot_s=1.0), SLO(ttft_s=10.0, tpot_s=0.03)
    assert small.capacity(h100, "colocated", long, ttft_bound) < default.capacity(h100, "colocated", long, ttft_bound)
    assert small.capacity(h100, "colocated", long, tpot_bound) > default.capacity(h100, "colocated", long, tpot_bound)


@pytest.mark.parametrize("gpu", ["L4", "H100"])
def test_simulated_colocated_steps_fill_but_never_exceed_the_layouts_budget(gpu, monkeypatch):
    plan = homogeneous_plan("Llama-3.1-8B", gpu, colocated=(1, 1))
    perf = PerfModel(plan.model)
    budget = perf.batch_limits([gpu])[0]
    seen: list[float] = []
    real = perf.mixed_step_time

    def spy(layout, prefill, batch, total_context):
        seen.append(prefill.tokens + batch)
        return real(layout, prefill, batch, total_context)

    monkeypatch.setattr(perf, "mixed_step_time", spy)
    simulate(plan, fixed(3 * budget // 2, 8, 1.0), SLO(), rate=2.0, n=30, seed=1, perf=perf)
    assert seen and max(seen) == budget  # long prompts are chunked to exactly the budget, never more


@pytest.mark.parametrize("gpu", ["L4", "H100"])
def test_simulated_prefill_batches_stay_within_the_layouts_budget(gpu, monkeypatch):
    plan = homogeneous_plan("Llama-3.1-8B", gpu, prefill=(1, 1), decode=(1, 1))
    perf = PerfModel(plan.model)
    budget, prompt = perf.batch_limits([gpu])[0], 300
    batches: list[float] = []
    real = perf.pass_time

    def spy(layout, work):
        if work.attn_pairs > 0:
            batches.append(work.tokens)
        return real(layout, work)

    monkeypatch.setattr(perf, "pass_time", spy)
    simulate(plan, fixed(prompt, 4, 1.0), SLO(), rate=1e4, n=400, seed=2, perf=perf)  # a deep queue
    assert budget - prompt < max(batches) <= budget


def test_plan_emulators_get_their_groups_max_num_seqs(tmp_path, monkeypatch):
    """`thunderops serve emulator --plan --group` (what start_local runs) caps decode batches as planned."""
    import thunderops.serve.emulator as emu
    from thunderops.cli.serve import emulator

    got = {}
    monkeypatch.setattr(emu, "run_emulator", lambda cfg, timing, exit_with_pid=None: got.setdefault("cfg", cfg))
    for gpu in ("L4", "H100"):
        plan = homogeneous_plan("Llama-3.1-8B", gpu, colocated=(1, 1), pp=2)
        path = tmp_path / f"{gpu}.json"
        plan.save(path)
        got.clear()
        emulator(plan=path, group=plan.groups[0].id, delay_scale=0.0)
        assert got["cfg"].max_num_seqs == PerfModel(plan.model).batch_limits([gpu])[1] * 2  # per micro-batch
