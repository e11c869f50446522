"""vLLM command lines per plan group: flags, KV connectors, pinned backend/dtype, and (marker `vllm`) vLLM's
own parser and engine config."""

from __future__ import annotations

import json

import pytest
from test_serve_plans import node, pd_plan

from thunderops.errors import PlanError
from thunderops.perf import PerfModel, vllm_batch_defaults
from thunderops.plan import Group, Plan, Route, Stage
from thunderops.serve.vllm import (
    LMCACHE,
    NIXL,
    NIXL_PUSH,
    EngineOptions,
    engine_commands,
    engine_phases,
    pinned_settings,
)
from thunderops.specs import get_gpu


def flag(argv: list[str], name: str) -> str:
    assert argv.count(name) == 1, f"{name} appears {argv.count(name)} times in {argv}"
    return argv[argv.index(name) + 1]


def mixed_plan() -> Plan:
    """A 2-node PP prefill group (A100 + L4, uneven layers), a TP=2 decode group, a colocated T4 group,
    and one compressed route."""
    inst = [node("a", "A100", 1, "10.0.0.1"), node("b", "L4", 1, "10.0.0.2"), node("c", "H100", 2, "10.0.0.3"),
            node("t", "T4", 1, "10.0.0.4")]
    groups = [
        Group("pp", "prefill", [Stage("a", "A100", 1, 20), Stage("b", "L4", 1, 12)]),
        Group("dd", "decode", [Stage("c", "H100", 2, 32, gpu_ids=[0, 1])]),
        Group("co", "colocated", [Stage("t", "T4", 1, 32)]),
    ]
    routing = [Route("pp", "dd", 0.7, kv_compression=0.25), Route("co", "co", 0.3)]
    return Plan(model="llama3-8b", budget_per_hour=20, cost_per_hour=9, instances=inst, groups=groups,
                routing=routing, inputs={"max_model_len": 8192})


def test_pd_groups_get_model_parallelism_ports_and_nixl():
    plan = pd_plan()
    cmds = engine_commands(plan, EngineOptions(gpu_memory_utilization=0.85))
    assert [c.group for c in cmds] == ["p0", "p1", "d0", "d1"]
    for c in cmds:
        assert all(isinstance(a, str) for a in c.argv)
        assert c.argv[:3] == ["vllm", "serve", "meta-llama/Llama-3.1-8B"]
        names = c.argv[c.argv.index("--served-model-name") + 1:c.argv.index("--host")]
        assert names == ["meta-llama/Llama-3.1-8B", "Llama-3.1-8B", "llama3-8b"]
        assert flag(c.argv, "--tensor-parallel-size") == "1"
        assert flag(c.argv, "--pipeline-parallel-size") == "1"
        assert flag(c.argv, "--gpu-memory-utilization") == "0.85"
        assert flag(c.argv, "--max-model-len") == "4096"
        assert flag(c.argv, "--port") == str(c.port)
        assert "--distributed-executor-backend" not in c.argv
        kv = json.loads(flag(c.argv, "--kv-transfer-config"))
        assert kv == {"kv_connector": NIXL, "kv_role": "kv_both"}
        assert c.env["VLLM_NIXL_SIDE_CHANNEL_PORT"] == str(c.port + 1000)
        assert "VLLM_API_KEY" not in c.env and not any("key" in a.lower() for a in c.argv)
    # all four groups sit on 127.0.0.1-hosted but distinct instances: each starts at the base port
    assert {c.port for c in cmds} == {8100}


def test_engines_sharing_a_node_get_distinct_ports():
    plan = pd_plan()
    for g in plan.groups:
        g.stages[0].instance = "n0"
    ports = [c.port for c in engine_commands(plan, EngineOptions(base_port=9000))]
    assert ports == [9000, 9001, 9002, 9003]


def test_multi_node_pipeline_uses_ray_and_the_plans_layer_split():
    cmds = {c.group: c for c in engine_commands(mixed_plan())}
    pp = cmds["pp"]
    assert flag(pp.argv, "--pipeline-parallel-size") == "2"
    assert flag(pp.argv, "--distributed-executor-backend") == "ray" and pp.ray
    assert pp.env["VLLM_PP_LAYER_PARTITION"] == "20,12"
    dd = cmds["dd"]
    assert flag(dd.argv, "--tensor-parallel-size") == "2"
    assert "--distributed-executor-backend" not in dd.argv
    assert dd.env["CUDA_VISIBLE_DEVICES"] == "0,1"


def test_compressed_route_uses_lmcache_on_both_sides_and_colocated_has_no_connector():
    cmds = {c.group: c for c in engine_commands(mixed_plan())}
    p_kv = json.loads(flag(cmds["pp"].argv, "--kv-transfer-config"))
    d_kv = json.loads(flag(cmds["dd"].argv, "--kv-transfer-config"))
    assert p_kv["kv_connector"] == d_kv["kv_connector"] == LMCACHE
    assert (p_kv["kv_role"], d_kv["kv_role"]) == ("kv_producer", "kv_consumer")
    assert cmds["pp"].env["LMCACHE_REMOTE_SERDE"] == cmds["dd"].env["LMCACHE_REMOTE_SERDE"] == "cachegen"
    assert "--kv-transfer-config" not in cmds["co"].argv


def test_one_connector_per_deployment_recorded_when_planned():
    """Running engines cannot change their KV connector, so the deployment runs one, chosen with the plan and
    kept by later versions whatever their routes say."""
    plan = pd_plan()
    plan.routing = [Route("p0", "d0", 0.5, kv_compression=0.5), Route("p1", "d1", 0.5)]
    assert {c.connector for c in engine_commands(plan)} == {LMCACHE}  # one compressed route: LMCache everywhere
    plan.inputs["kv_transfer"] = NIXL  # what it was planned with wins over a later version's routes
    assert {c.connector for c in engine_commands(plan)} == {NIXL}
    plan.inputs["kv_transfer"] = "TcpConnector"
    with pytest.raises(PlanError, match="unknown kv_transfer"):
        engine_commands(plan)


def test_colocated_engines_get_nixl_so_a_reschedule_can_flip_them():
    plan = pd_plan()
    plan.groups[0].phase = "colocated"
    cmds = {c.group: c for c in engine_commands(plan)}
    assert json.loads(flag(cmds["p0"].argv, "--kv-transfer-config")) == {"kv_connector": NIXL, "kv_role": "kv_both"}
    assert engine_phases(plan) == {g: ("prefill", "decode", "colocated") for g in ("p0", "p1", "d0", "d1")}


def test_a_pipelined_replica_puts_the_deployment_on_nixl_push():
    """NIXL's pull mode cannot send from a pipeline; its push mode can (same proxy flow), and no mode receives
    into one: a pipelined engine may prefill or be colocated, never decode."""
    plan = mixed_plan()
    plan.routing = [Route("pp", "dd", 0.7), Route("co", "co", 0.3)]
    cmds = {c.group: c for c in engine_commands(plan)}
    for c in cmds.values():
        assert json.loads(flag(c.argv, "--kv-transfer-config")) == {"kv_connector": NIXL_PUSH, "kv_role": "kv_both"}
        assert c.env["VLLM_NIXL_SIDE_CHANNEL_PORT"] == str(c.port + 1000)
    assert engine_phases(plan) == {"pp": ("prefill", "colocated"), "dd": ("prefill", "decode", "colocated"),
                                   "co": ("prefill", "decode", "colocated")}
    plan.inputs["kv_transfer"] = NIXL
    with pytest.raises(PlanError, match="cannot send from a pipeline"):
        engine_commands(plan)


def test_a_decode_pipeline_is_refused():
    plan = mixed_plan()
    plan.groups[0].phase = "decode"
    with pytest.raises(PlanError, match="cannot receive into"):
        engine_commands(plan)


def test_one_attention_backend_and_kv_dtype_across_gpu_generations():
    cmds = engine_commands(mixed_plan())  # includes a T4: no bf16, no FlashAttention 2
    backends = {flag(c.argv, "--attention-backend") for c in cmds}
    dtypes = {(flag(c.argv, "--dtype"), flag(c.argv, "--kv-cache-dtype")) for c in cmds}
    assert backends == {"TRITON_ATTN"} and dtypes == {("float16", "auto")}
    modern = {flag(c.argv, "--attention-backend") for c in engine_commands(pd_plan())}
    assert modern == {"FLASH_ATTN"}
    assert pinned_settings(pd_plan(), EngineOptions(attention_backend="FLASHINFER"))["attention_backend"] == "FLASHINFER"


def test_unequal_tp_within_a_pipeline_is_refused():
    plan = mixed_plan()
    plan.groups[0].stages[1].tp = 2
    with pytest.raises(PlanError, match="same TP degree"):
        engine_commands(plan)


@pytest.mark.parametrize("layers", [[0], [20, 0], [20, 11]])
def test_a_group_not_holding_every_layer_is_refused(layers):
    """A group whose stages hold no layers, or do not add up to the model's, would start an engine serving the
    wrong model (or none): refused with a one-line PlanError before anything starts."""
    plan = mixed_plan()
    g = plan.groups[0]
    g.stages = [Stage(s.instance, s.gpu, s.tp, n) for s, n in zip(g.stages, layers, strict=False)]
    with pytest.raises(PlanError, match="layers"):
        engine_commands(plan)


def test_shell_rendering_quotes_the_json_config():
    c = engine_commands(pd_plan())[0]
    assert "'{\"kv_connector\":\"NixlConnector\",\"kv_role\":\"kv_both\"}'" in c.shell()


@pytest.mark.vllm
def test_every_command_parses_with_vllms_parser_into_an_engine_config(tmp_path, monkeypatch):
    """vLLM's own `vllm serve` parser and EngineArgs -> VllmConfig, on CPU with a local config.json."""
    monkeypatch.setenv("VLLM_TARGET_DEVICE", "cpu")
    from vllm.engine.arg_utils import AsyncEngineArgs
    try:  # vLLM >= 0.2x moved the `vllm serve` parser
        from vllm.entrypoints.common.cli_args import make_arg_parser
    except ImportError:
        from vllm.entrypoints.openai.cli_args import make_arg_parser

    try:
        from vllm.utils.argparse_utils import FlexibleArgumentParser
    except ImportError:
        from vllm.utils import FlexibleArgumentParser
    model_dir = tmp_path / "tiny-llama"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256, "intermediate_size": 512,
        "num_attention_heads": 8, "num_key_value_heads": 4, "num_hidden_layers": 32, "vocab_size": 1024,
        "max_position_embeddings": 8192, "torch_dtype": "bfloat16", "rms_norm_eps": 1e-5}))
    for plan in (pd_plan(), mixed_plan()):
        for cmd in engine_commands(plan):
            argv = [a if a != cmd.argv[2] else str(model_dir) for a in cmd.argv[3:]]
            parser = make_arg_parser(FlexibleArgumentParser())
            args = parser.parse_args(["--model", str(model_dir), *argv])
            config = AsyncEngineArgs.from_cli_args(args).create_engine_config()
            assert config.parallel_config.tensor_parallel_size == int(flag(cmd.argv, "--tensor-parallel-size"))
            assert config.parallel_config.pipeline_parallel_size == int(flag(cmd.argv, "--pipeline-parallel-size"))
            assert config.model_config.max_model_len == int(flag(cmd.argv, "--max-model-len"))
            # our batch limits win over vLLM's own defaults (here the CPU platform's)
            sched = config.scheduler_config
            assert sched.max_num_batched_tokens == int(flag(cmd.argv, "--max-num-batched-tokens"))
            assert sched.max_num_seqs == int(flag(cmd.argv, "--max-num-seqs"))
            if cmd.connector:
                assert config.kv_transfer_config.kv_connector == cmd.connector


def test_older_vllm_pins_the_backend_through_its_environment_variable():
    for c in engine_commands(pd_plan(), EngineOptions(attention_via_env=True)):
        assert "--attention-backend" not in c.argv and c.env["VLLM_ATTENTION_BACKEND"] == "FLASH_ATTN"


def test_every_engine_passes_its_groups_batch_limits_as_planned():
    """vLLM's defaults differ by GPU, so every command pins both limits to what the perf model planned with
    for that group: per group (an H100 group and a T4 group differ), the smallest GPU of a pipeline."""
    plan = mixed_plan()
    pm = PerfModel(plan.model)
    got = {}
    for c in engine_commands(plan):
        gpus = [s.gpu for s in plan.group(c.group).stages]
        got[c.group] = (int(flag(c.argv, "--max-num-batched-tokens")), int(flag(c.argv, "--max-num-seqs")))
        assert got[c.group] == pm.batch_limits(gpus)
    assert got["dd"] == vllm_batch_defaults(get_gpu("H100")) != got["co"] == vllm_batch_defaults(get_gpu("T4"))
    assert got["pp"] == vllm_batch_defaults(get_gpu("L4"))  # A100 + L4 pipeline: the smaller tier
    # an explicit option overrides every engine, and the perf model of the same options agrees
    opts = EngineOptions(max_num_batched_tokens=4096, max_num_seqs=64)
    for c in engine_commands(plan, opts):
        assert (flag(c.argv, "--max-num-batched-tokens"), flag(c.argv, "--max-num-seqs")) == ("4096", "64")
    with pytest.raises(PlanError, match="at least max_num_seqs"):
        engine_commands(plan, EngineOptions(max_num_batched_tokens=128, max_num_seqs=256))


# what CUDA reports (torch.cuda.get_device_properties: name, total_memory in GiB) on real devices
_DEVICES = [("L4", "NVIDIA L4", 22.5), ("A10G", "NVIDIA A10G", 22.2), ("A40", "NVIDIA A40", 44.4),
            ("L40S", "NVIDIA L40S", 44.4), ("A100", "NVIDIA A100-SXM4-40GB", 39.4),
            ("A100-80GB", "NVIDIA A100-SXM4-80GB", 79.2), ("H100", "NVIDIA H100 80GB HBM3", 79.2),
            ("H100-NVL", "NVIDIA H100 NVL", 93.1), ("H200", "NVIDIA H200", 139.8), ("B200", "NVIDIA B200", 178.4)]


@pytest.mark.vllm
@pytest.mark.parametrize(("gpu", "cuda_name", "gib"), _DEVICES)
def test_batch_defaults_match_vllms_own_rule(gpu, cuda_name, gib, monkeypatch):
    """Our reading of the datasheet's GB lands every catalog GPU in the tier vLLM's get_batch_defaults picks
    from what CUDA reports on that device."""
    monkeypatch.setenv("VLLM_TARGET_DEVICE", "cpu")
    from vllm.engine.arg_utils import EngineArgs
    from vllm.platforms import current_platform
    from vllm.usage.usage_lib import UsageContext

    cls = type(current_platform)
    monkeypatch.setattr(cls, "get_device_total_memory", classmethod(lambda c, device_id=0: int(gib * 2**30)))
    monkeypatch.setattr(cls, "get_device_name", classmethod(lambda c, device_id=0: cuda_name))
    monkeypatch.setattr(cls, "is_device_capability", classmethod(lambda c, cap, device_id=0: False))
    monkeypatch.setattr(cls, "is_cpu", classmethod(lambda c: False))
    monkeypatch.setattr(cls, "is_tpu", classmethod(lambda c: False))
    tokens, seqs = EngineArgs.get_batch_defaults(world_size=1)
    server = UsageContext.OPENAI_API_SERVER
    assert vllm_batch_defaults(get_gpu(gpu)) == (tokens[server], seqs[server])
