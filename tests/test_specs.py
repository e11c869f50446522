"""GPU and model specs: forgiving names, nearest-name suggestions, Hugging Face config.json loading."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from thunderops.errors import SpecError
from thunderops.specs import get_gpu, get_model, gpu_names, load_hf_config, model_names

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "price-snapshot"

LLAMA_30B_CONFIG = {  # huggyllama/llama-30b config.json
    "architectures": ["LlamaForCausalLM"], "hidden_size": 6656, "intermediate_size": 17920,
    "max_position_embeddings": 2048, "num_attention_heads": 52, "num_hidden_layers": 60, "vocab_size": 32000,
    "torch_dtype": "float16", "_name_or_path": "huggyllama/llama-30b",
}


@pytest.mark.parametrize("alias, name", [
    ("llama-30b", "LLaMA-30B"), ("LLaMA_30B", "LLaMA-30B"), ("huggyllama/llama-30b", "LLaMA-30B"),
    ("meta-llama/Llama-3.1-8B", "Llama-3.1-8B"), ("llama3-8b", "Llama-3.1-8B"), ("Llama 2 70B", "Llama-2-70B"),
    ("mixtral-8x7b", "Mixtral-8x7B"), ("qwen2.5-72b", "Qwen2.5-72B"), ("Llama-2-13b-hf", "Llama-2-13B"),
])
def test_model_names_are_forgiving(alias, name):
    assert get_model(alias).name == name


@pytest.mark.parametrize("alias, name", [
    ("A100-80GB", "A100-80GB"), ("a100_80gb", "A100-80GB"), ("A100 80GB", "A100-80GB"), ("a100", "A100"),
    ("h100-sxm5", "H100"), ("H100-MEGA", "H100"), ("rtx a6000", "RTXA6000"), ("l40s", "L40S"),
])
def test_gpu_names_are_forgiving(alias, name):
    assert get_gpu(alias).name == name


def test_unknown_names_suggest_the_nearest():
    with pytest.raises(SpecError, match=r"unknown GPU 'A100-80G8'.*did you mean: A100-80GB"):
        get_gpu("A100-80G8")
    with pytest.raises(SpecError, match=r"did you mean: Llama-3.1-70B") as e:
        get_model("Llama-3.1-7OB")
    assert "config.json" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(SpecError) as e:
        get_gpu("zzzzzz")
    assert "did you mean" not in str(e.value) and "thunderops catalog gpus" in str(e.value)


def test_required_models_have_their_published_shapes():
    # The LLaMA-30B: 60 layers, hidden 6656, 52 heads, FFN 17920, vocab 32000.
    m = get_model("llama-30b")
    assert (m.layers, m.hidden, m.heads, m.kv_heads, m.intermediate, m.vocab) == (60, 6656, 52, 52, 17920, 32000)
    for name in ["Llama-2-7B", "Llama-2-13B", "Llama-2-70B", "Llama-3.1-8B", "Llama-3.1-70B", "Qwen2.5-72B",
                 "Mixtral-8x7B"]:
        assert name in model_names()


@pytest.mark.parametrize("name, billions", [
    # Parameter counts as the model cards / HF safetensors report them.
    ("Llama-2-7B", 6.74), ("Llama-2-13B", 13.02), ("Llama-2-70B", 68.98), ("Llama-3.1-8B", 8.03),
    ("Llama-3.1-70B", 70.55), ("Mixtral-8x7B", 46.70), ("Qwen2.5-72B", 72.71), ("LLaMA-30B", 32.53),
])
def test_parameter_counts_match_published_sizes(name, billions):
    assert get_model(name).params / 1e9 == pytest.approx(billions, rel=0.005)


def test_kv_cache_bytes_follow_vllm_formula():
    # 2 (K,V) x layers x kv_heads x head_dim x 2 bytes: Llama-2-7B 512 KiB/token, Llama-3.1-8B (GQA) 128 KiB.
    assert get_model("Llama-2-7B").kv_bytes_per_token == 2 * 32 * 32 * 128 * 2 == 512 * 1024
    assert get_model("Llama-3.1-8B").kv_bytes_per_token == 128 * 1024
    m = get_model("Mixtral-8x7B")
    assert m.experts == 8 and m.experts_per_token == 2 and m.active_params_per_layer < m.params_per_layer


@pytest.mark.skipif(not (REFERENCE / "gpu_specs.csv").exists(), reason="reference specs not present")
def test_gpu_specs_match_the_reference_datasheets():
    ref = {r["gpu"]: r for r in csv.DictReader(open(REFERENCE / "gpu_specs.csv"))}
    for ref_name, ours in [("H100-SXM5", "H100"), ("H100-PCIe", "H100-PCIe"), ("H100-NVL", "H100-NVL")]:
        spec = get_gpu(ours)
        r = ref[ref_name]
        assert (spec.memory_gb, spec.memory_gbps, spec.bf16_tflops) == (
            float(r["mem_GB"]), float(r["mem_bw_GBps"]), float(r["dense_bf16_fp16_TFLOPS"]))
    assert {"H100", "H200", "B200", "A100", "A100-80GB", "L4", "L40S", "A10G", "T4", "RTX4090", "A40"} <= set(gpu_names())


def test_hf_config_json_loads_as_a_model(tmp_path):
    path = tmp_path / "llama-30b" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(LLAMA_30B_CONFIG))
    for ref in (str(path), str(path.parent)):
        m = get_model(ref)
        assert (m.layers, m.hidden, m.heads, m.kv_heads, m.intermediate, m.vocab, m.max_position) == (
            60, 6656, 52, 52, 17920, 32000, 2048)
        assert m.params == get_model("llama-30b").params  # same shape as the shipped row
    moe = {**LLAMA_30B_CONFIG, "num_key_value_heads": 4, "num_local_experts": 8, "num_experts_per_tok": 2,
           "torch_dtype": "float32"}
    (tmp_path / "moe.json").write_text(json.dumps(moe))
    m = load_hf_config(tmp_path / "moe.json")
    assert (m.kv_heads, m.experts, m.experts_per_token, m.dtype_bytes) == (4, 8, 2, 4)


@pytest.mark.parametrize("content, fragment", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    (json.dumps({k: v for k, v in LLAMA_30B_CONFIG.items() if k != "num_hidden_layers"}), "missing key"),
    (json.dumps({**LLAMA_30B_CONFIG, "hidden_size": "wide"}), "bad value"),
    (json.dumps({**LLAMA_30B_CONFIG, "num_key_value_heads": 5}), "divide"),
    (json.dumps({**LLAMA_30B_CONFIG, "num_hidden_layers": 0}), "positive"),
])
def test_bad_hf_configs_are_one_clear_line(tmp_path, content, fragment):
    path = tmp_path / "config.json"
    path.write_text(content)
    with pytest.raises(SpecError) as e:
        get_model(str(path))
    assert fragment in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(SpecError, match="no such file"):
        get_model(str(tmp_path / "missing" / "config.json"))
