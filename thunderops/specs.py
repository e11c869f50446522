"""GPU and model specs from `catalogs/gpus.csv` and `catalogs/models.csv`, or a Hugging Face config.json.

Names are forgiving: case, '-', '_' and spaces do not matter, and each row lists aliases
(`llama-30b`, `A100-80GB`, `a100_80gb` all resolve).
"""

from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from thunderops.errors import SpecError, suggest


def catalog_dir() -> Path:
    """Where the shipped catalogs live: `$THUNDEROPS_CATALOGS`, else the repo's `catalogs/`
    (reached through the `thunderops/catalogs` link, which also puts them into a built wheel)."""
    override = os.environ.get("THUNDEROPS_CATALOGS")
    return Path(override) if override else Path(__file__).resolve().parent / "catalogs"


def norm(name: str) -> str:
    """Canonical key for forgiving name lookups: lower case, no separators."""
    return re.sub(r"[\s_\-./]+", "", name.strip().lower())


@dataclass(frozen=True)
class GpuSpec:
    """Datasheet facts for one GPU type. Bandwidths in GB/s, compute in dense bf16 TFLOP/s."""

    name: str
    memory_gb: float
    memory_gbps: float
    bf16_tflops: float
    intra_link: str
    intra_link_gbps: float  # bidirectional GB/s between GPUs of one node, as datasheets give it
    arch: str = ""  # NVIDIA compute capability as "sm90", AMD's target as "gfx942"
    source: str = ""
    as_of: str = ""

    @property
    def memory_bytes(self) -> float:
        return self.memory_gb * 1e9


@dataclass(frozen=True)
class ModelSpec:
    """Transformer shape. Dense models have experts == 1."""

    name: str
    hf_id: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    max_position: int = 4096
    experts: int = 1
    experts_per_token: int = 1
    dtype_bytes: int = 2
    source: str = ""

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def params_per_layer(self) -> int:
        """Weights of one decoder layer (attention + MLP incl. all experts + norms)."""
        attn = self.hidden * self.head_dim * (self.heads + 2 * self.kv_heads) + self.heads * self.head_dim * self.hidden
        mlp = 3 * self.hidden * self.intermediate * self.experts
        router = self.hidden * self.experts if self.experts > 1 else 0
        return attn + mlp + router + 2 * self.hidden

    @property
    def active_params_per_layer(self) -> int:
        """Weights one token touches in one layer (top-k experts for MoE)."""
        attn = self.hidden * self.head_dim * (self.heads + 2 * self.kv_heads) + self.heads * self.head_dim * self.hidden
        return attn + 3 * self.hidden * self.intermediate * self.experts_per_token + 2 * self.hidden

    @property
    def embedding_params(self) -> int:
        """Input embedding plus LM head (untied)."""
        return 2 * self.vocab * self.hidden

    @property
    def params(self) -> int:
        return self.layers * self.params_per_layer + self.embedding_params + self.hidden

    @property
    def weight_bytes(self) -> float:
        return float(self.params * self.dtype_bytes)

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V for one token across all layers (vLLM's formula: 2 x layers x kv_heads x head_dim x dtype)."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes

    @property
    def kv_bytes_per_token_per_layer(self) -> int:
        return 2 * self.kv_heads * self.head_dim * self.dtype_bytes


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@cache
def gpu_table() -> dict[str, GpuSpec]:
    """All known GPUs keyed by every normalised name and alias."""
    table: dict[str, GpuSpec] = {}
    for row in _read_csv(catalog_dir() / "gpus.csv"):
        spec = GpuSpec(
            name=row["gpu"],
            memory_gb=float(row["memory_gb"]),
            memory_gbps=float(row["memory_gbps"]),
            bf16_tflops=float(row["bf16_tflops"]),
            intra_link=row["intra_link"],
            intra_link_gbps=float(row["intra_link_gbps"]),
            arch=row.get("arch") or "",
            source=row["source"],
            as_of=row["as_of"],
        )
        for alias in [row["gpu"], *filter(None, row["aliases"].split(";"))]:
            table[norm(alias)] = spec
    return table


@cache
def model_table() -> dict[str, ModelSpec]:
    """All known models keyed by every normalised name, alias and HF id."""
    table: dict[str, ModelSpec] = {}
    for row in _read_csv(catalog_dir() / "models.csv"):
        spec = ModelSpec(
            name=row["model"],
            hf_id=row["hf_id"],
            layers=int(row["layers"]),
            hidden=int(row["hidden"]),
            heads=int(row["heads"]),
            kv_heads=int(row["kv_heads"]),
            intermediate=int(row["intermediate"]),
            vocab=int(row["vocab"]),
            max_position=int(row["max_position"]),
            experts=int(row["experts"]),
            experts_per_token=int(row["experts_per_token"]),
            source=row["source"],
        )
        for alias in [row["model"], row["hf_id"], row["hf_id"].split("/")[-1], *filter(None, row["aliases"].split(";"))]:
            table[norm(alias)] = spec
    return table


def model_keys(name: str) -> set[str]:
    """Every normalised name the catalog knows the model named `name` by (its aliases, HF id, catalog name);
    empty for a model outside the catalog. Looks nothing up on disk, so it is safe on names from the network."""
    spec = model_table().get(norm(name))
    return {k for k, v in model_table().items() if v == spec} if spec is not None else set()


def served_names(name: str) -> list[str]:
    """The names an engine of model `name` answers to (vLLM's --served-model-name list, first = the one engines
    are sent): its HF id, catalog name and `name` itself; just `name` for a model the catalog does not know."""
    try:
        spec = get_model(name)
    except (SpecError, OSError):
        return [name]
    return list(dict.fromkeys([spec.hf_id, spec.name, name]))


def gpu_names() -> list[str]:
    return sorted({s.name for s in gpu_table().values()})


def model_names() -> list[str]:
    return sorted({s.name for s in model_table().values()})


def get_gpu(name: str | GpuSpec) -> GpuSpec:
    """Look a GPU up by any of its names; unknown names raise SpecError with the nearest names."""
    if isinstance(name, GpuSpec):
        return name
    spec = gpu_table().get(norm(name))
    if spec is None:
        raise SpecError(f"unknown GPU '{name}'{suggest(name, gpu_names())}; `thunderops catalog gpus` lists them")
    return spec


def get_model(name: str | ModelSpec) -> ModelSpec:
    """Look a model up by name, alias or HF id, or load it from a Hugging Face config.json path."""
    if isinstance(name, ModelSpec):
        return name
    path = Path(name)
    if name.endswith(".json") or path.is_file() or (path.is_dir() and (path / "config.json").is_file()):
        return load_hf_config(path / "config.json" if path.is_dir() else path)
    spec = model_table().get(norm(name))
    if spec is None:
        raise SpecError(
            f"unknown model '{name}'{suggest(name, model_names())}; "
            "`thunderops catalog models` lists them, or pass a Hugging Face config.json path"
        )
    return spec


def load_hf_config(path: Path) -> ModelSpec:
    """Build a ModelSpec from a Hugging Face `config.json` (Llama, Qwen2, Mistral, Mixtral style)."""
    try:
        cfg = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise SpecError(f"{path}: no such file; pass a Hugging Face config.json path or a model name") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SpecError(f"{path}: not valid JSON ({e}); pass a Hugging Face config.json") from None
    if not isinstance(cfg, dict):
        raise SpecError(f"{path}: expected a JSON object like a Hugging Face config.json")
    try:
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        spec = ModelSpec(
            name=str(cfg.get("_name_or_path") or Path(path).parent.name or "custom"),
            hf_id=str(cfg.get("_name_or_path") or Path(path).parent),
            layers=int(cfg["num_hidden_layers"]),
            hidden=hidden,
            heads=heads,
            kv_heads=int(cfg.get("num_key_value_heads") or heads),
            intermediate=int(cfg["intermediate_size"]),
            vocab=int(cfg["vocab_size"]),
            max_position=int(cfg.get("max_position_embeddings") or 4096),
            experts=int(cfg.get("num_local_experts") or 1),
            experts_per_token=int(cfg.get("num_experts_per_tok") or 1),
            dtype_bytes=4 if cfg.get("torch_dtype") == "float32" else 2,
            source=str(path),
        )
    except KeyError as e:
        raise SpecError(f"{path}: missing key {e} in config.json; is this a decoder-only transformer config?") from None
    except (TypeError, ValueError) as e:
        raise SpecError(f"{path}: bad value in config.json ({e})") from None
    if min(spec.layers, spec.hidden, spec.heads, spec.kv_heads, spec.intermediate, spec.vocab) <= 0:
        raise SpecError(f"{path}: layer counts and sizes must be positive")
    if spec.hidden % spec.heads or spec.heads % spec.kv_heads:
        raise SpecError(f"{path}: hidden_size must divide by num_attention_heads, and heads by num_key_value_heads")
    return spec
