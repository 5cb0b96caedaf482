"""The embedded default model `tiny`: a deterministic synthetic Llama (random weights,
8 query / 4 KV heads, fp32) with a locally built byte-level BPE tokenizer. Its text is
gibberish; it exists so the whole runtime runs anywhere with no download."""

from __future__ import annotations

from pathlib import Path

from ..paths import cache_root  # noqa: F401  (re-exported: older imports name it here)
from .synth import llama_config, write_atomically, write_checkpoint

TINY_VERSION = 1  # bump when the recipe changes, so stale caches are rebuilt
TINY_CONFIG = llama_config(hidden_size=256, num_hidden_layers=4, intermediate_size=512,
                           num_attention_heads=8, num_key_value_heads=4)


def tiny_model_dir() -> Path:
    final = cache_root() / f"tiny-v{TINY_VERSION}"
    return write_atomically(final, lambda tmp: write_checkpoint(tmp, TINY_CONFIG, seed=0))
