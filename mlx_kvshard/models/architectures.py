"""The mlx-lm model classes: their ModelArgs configure our sharded model, and the unsharded
model is the correctness oracle and the synthetic checkpoint builder."""

from __future__ import annotations

import importlib

# mlx-lm runs mistral through its llama module.
_MLX_LM_MODULE = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}


def mlx_lm_model_class(model_type: str):
    mod = importlib.import_module(f"mlx_lm.models.{_MLX_LM_MODULE[model_type]}")
    return mod.Model, mod.ModelArgs


def load_oracle(model_dir, dtype=None):
    """Load the whole checkpoint into mlx-lm's own single-process model."""
    from mlx_lm.utils import load_model

    model, _ = load_model(model_dir)
    if dtype is not None:
        model.set_dtype(dtype)
    return model
