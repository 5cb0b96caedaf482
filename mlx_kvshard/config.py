"""Model configuration read from a HF `config.json`, without importing MLX.

The ShardPlan and the capacity planner only need shapes, so this stays pure Python.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

# Bytes per element of the dtypes a checkpoint may declare.
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class Quantization:
    bits: int
    group_size: int


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    attention_bias: bool = False
    dtype: str = "float16"
    max_position_embeddings: int | None = None
    quantization: Quantization | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def group_size_q(self) -> int:
        """Query heads per KV head (the GQA group)."""
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        mt = d.get("model_type")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise UserError(
                f"{source}: model_type {mt!r} is not supported; supported: "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        missing = [
            k
            for k in ("hidden_size", "num_hidden_layers", "intermediate_size",
                      "num_attention_heads", "vocab_size")
            if k not in d
        ]
        if missing:
            raise UserError(f"{source}: missing required field(s) {', '.join(missing)}")
        n_heads = int(d["num_attention_heads"])
        n_kv = int(d.get("num_key_value_heads") or n_heads)
        if n_kv <= 0 or n_heads % n_kv:
            raise UserError(
                f"{source}: num_attention_heads={n_heads} is not a multiple of "
                f"num_key_value_heads={n_kv}"
            )
        head_dim = int(d.get("head_dim") or d["hidden_size"] // n_heads)
        q = d.get("quantization") or d.get("quantization_config")
        quant = None
        if q and "bits" in q:
            quant = Quantization(bits=int(q["bits"]), group_size=int(q.get("group_size", 64)))
        dtype = str(d.get("torch_dtype") or d.get("dtype") or "float16")
        if dtype not in DTYPE_BYTES:
            dtype = "float16"
        # qwen2 always has q/k/v bias; llama/mistral only when attention_bias says so.
        bias = bool(d.get("attention_bias", mt == "qwen2"))
        return cls(
            model_type=mt,
            hidden_size=int(d["hidden_size"]),
            num_hidden_layers=int(d["num_hidden_layers"]),
            intermediate_size=int(d["intermediate_size"]),
            num_attention_heads=n_heads,
            num_key_value_heads=n_kv,
            head_dim=head_dim,
            vocab_size=int(d["vocab_size"]),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),  # mlx-lm default
            attention_bias=bias,
            dtype=dtype,
            max_position_embeddings=d.get("max_position_embeddings"),
            quantization=quant,
            raw=dict(d),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise UserError(f"{path} not found: a model directory needs a HF config.json")
        try:
            d = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{path} is not valid JSON ({e}); re-download the model") from None
        return cls.from_dict(d, source=str(path))
