"""Model configuration read from a HF `config.json`, without importing MLX.

The ShardPlan and the capacity planner only need shapes, so this stays pure Python.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from .errors import UserError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

# Bytes per element of the dtypes a checkpoint may declare.
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


# MLX's weight quantization modes (mx.quantize): affine stores a scale and a bias per group in
# the model dtype; the microscaling formats store one 8-bit scale per group and no bias.
QUANT_MODES = ("affine", "mxfp4", "mxfp8", "nvfp4")


@dataclass(frozen=True)
class Quantization:
    bits: int
    group_size: int
    mode: str = "affine"

    @property
    def has_biases(self) -> bool:
        return self.mode == "affine"

    def params(self) -> dict:
        """Keyword arguments of MLX's to_quantized / nn.quantize class_predicate."""
        return {"group_size": self.group_size, "bits": self.bits, "mode": self.mode}

    def linear_bytes(self, out_features: int, in_features: int, param_bytes: int) -> int:
        """Packed weight plus per-group scales (and biases, affine) of one matrix."""
        groups = out_features * (in_features // self.group_size)
        per_group = 2 * param_bytes if self.has_biases else 1
        return out_features * in_features * self.bits // 8 + groups * per_group

    @classmethod
    def from_dict(cls, d: dict, source: str, where: str) -> "Quantization":
        mode = str(d.get("mode", "affine"))
        if mode not in QUANT_MODES:
            raise UserError(f"{source}: quantization {where} has mode {mode!r}, which MLX cannot run; "
                            f"supported modes: {', '.join(QUANT_MODES)}")
        if d.get("global_scale"):
            raise UserError(f"{source}: quantization {where} uses an nvfp4 global_scale, which is not "
                            f"implemented; use a checkpoint quantized without it")
        defaults = {"affine": (64, 4), "mxfp4": (32, 4), "mxfp8": (32, 8), "nvfp4": (16, 4)}[mode]
        try:
            return cls(bits=int(d.get("bits") or defaults[1]), group_size=int(d.get("group_size") or defaults[0]),
                       mode=mode)
        except (TypeError, ValueError):
            raise UserError(f"{source}: quantization {where} has non-integer bits/group_size: {d}") from None


def _parse_quantization(q: Any, source: str) -> tuple[Quantization | None, tuple]:
    """mlx-lm's `quantization`: defaults (bits, group_size, mode) plus per-module entries, each
    a dict of its own parameters or false for a module left unquantized."""
    if not isinstance(q, dict) or "bits" not in q:
        return None, ()
    default = Quantization.from_dict(q, source, "defaults")
    overrides = []
    for key, value in q.items():
        if isinstance(value, dict):
            overrides.append((key, Quantization.from_dict(value, source, f"of {key}")))
        elif value is False:
            overrides.append((key, None))
    return default, tuple(overrides)


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
    quantization: Quantization | None = None  # the default of every quantized module
    # (module path, its own quantization or None: left unquantized), as mlx-lm writes them
    quant_overrides: tuple[tuple[str, Quantization | None], ...] = ()
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def group_size_q(self) -> int:
        """Query heads per KV head (the GQA group)."""
        return self.num_attention_heads // self.num_key_value_heads

    @cached_property
    def _override_map(self) -> dict[str, Quantization | None]:
        return dict(self.quant_overrides)

    def quant_for(self, module: str) -> Quantization | None:
        """How module `module` ("model.layers.3.mlp.down_proj", "lm_head") is stored, assuming
        (as mlx-lm's converter does) that every quantizable module without an entry of its own
        takes the defaults."""
        if module in self._override_map:
            return self._override_map[module]
        return self.quantization

    def quantized_modules(self, module: str) -> list[Quantization]:
        """The distinct quantizations of `module` ("mlp.down_proj") over all layers."""
        qs = {self.quant_for(f"model.layers.{i}.{module}") for i in range(self.num_hidden_layers)}
        return sorted((q for q in qs if q is not None), key=lambda q: (q.group_size, q.bits, q.mode))

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
        quant, overrides = _parse_quantization(d.get("quantization") or d.get("quantization_config"), source)
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
            quant_overrides=overrides,
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
