"""Synthetic checkpoints: random weights with a fixed seed and a real byte-level BPE
tokenizer trained locally, written in HF format. Used by `tiny`, the tests and the
benchmarks, so nothing ever needs a download."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

# A small fixed corpus: the tokenizer must come out identical on every machine.
_CORPUS = """\
The quick brown fox jumps over the lazy dog. A desk of Mac Minis cabled by Thunderbolt
runs one model as one engine. Each rank holds a slice of every layer and a slice of the
key value cache by attention head. Hello world! Once upon a time there was a cluster of
small computers that wanted to think together. They passed activations around a ring,
two all-reduces per layer, and never moved the cache. Numbers: 0 1 2 3 4 5 6 7 8 9 10 100.
What is the capital of France? Paris. Write a poem about the sea. The sea is wide and deep.
"""

SPECIAL_TOKENS = ["<|bos|>", "<|eos|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}"
    "{% else %}<|assistant|>{{ m['content'] }}<|eos|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def write_tokenizer(path: Path, vocab_size: int = 512) -> int:
    """Train a byte-level BPE tokenizer on the fixed corpus; return its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS.splitlines() * 4, trainer)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|bos|>",
        "eos_token": "<|eos|>",
        "model_max_length": 1 << 20,
        "chat_template": CHAT_TEMPLATE,
    }, indent=1))
    return tok.get_vocab_size()


def llama_config(**overrides: Any) -> dict:
    cfg = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 128,
        "num_hidden_layers": 2,
        "intermediate_size": 256,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "bos_token_id": 0,
        "eos_token_id": 1,
    }
    cfg.update(overrides)
    return cfg


def write_checkpoint(path: str | Path, config: dict, seed: int = 0,
                     quantize: tuple[int, int] | None = None, shards: int = 1,
                     std: float = 0.08, quant_predicate=None, quant_mode: str = "affine") -> Path:
    """Write config.json, safetensors (optionally split in `shards` files with an index)
    and tokenizer files. `quantize=(bits, group_size)` writes an MLX-quantized checkpoint
    the way mlx-community publishes them; `quant_predicate(path, module)` (mlx-lm's
    convert --quant-predicate: False, True or a dict of per-module parameters) and
    `quant_mode` go to mlx-lm's own quantize_model, which records per-module entries."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from .architectures import mlx_lm_model_class

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = dict(config)
    n_tokens = write_tokenizer(path)
    config.setdefault("vocab_size", n_tokens)
    if config["vocab_size"] < n_tokens:
        raise ValueError(f"vocab_size {config['vocab_size']} < tokenizer's {n_tokens} tokens")
    model_cls, args_cls = mlx_lm_model_class(config["model_type"])
    model = model_cls(args_cls.from_dict(config))
    dtype = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}[config["torch_dtype"]]
    keys = mx.random.split(mx.random.key(seed), len(tree_flatten(model.parameters())))
    params = {}
    for i, (name, p) in enumerate(sorted(tree_flatten(model.parameters()))):
        if name.endswith("norm.weight"):
            value = 1.0 + 0.1 * mx.random.normal(p.shape, key=keys[i])
        else:
            value = std * mx.random.normal(p.shape, key=keys[i])
        params[name] = value.astype(dtype)
    model.load_weights(list(params.items()))
    if quantize and (quant_predicate or quant_mode != "affine"):
        from mlx_lm.utils import quantize_model

        bits, group_size = quantize
        model, config = quantize_model(model, config, group_size, bits, mode=quant_mode,
                                       quant_predicate=quant_predicate)
        # record the modules left unquantized as `false` (mlx-lm reads both forms)
        for name, module in model.named_modules():
            if hasattr(module, "to_quantized") and name:
                config["quantization"][name] = False
        config["quantization_config"] = config["quantization"]
    elif quantize:
        bits, group_size = quantize
        nn.quantize(model, group_size=group_size, bits=bits)
        config["quantization"] = {"group_size": group_size, "bits": bits}
    weights = dict(tree_flatten(model.parameters()))
    mx.eval(weights)
    names = sorted(weights)
    if shards == 1:
        mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
    else:
        index = {"metadata": {}, "weight_map": {}}
        per = -(-len(names) // shards)
        for s in range(shards):
            fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: weights[n] for n in names[s * per:(s + 1) * per]}
            mx.save_safetensors(str(path / fname), part, metadata={"format": "mlx"})
            index["weight_map"].update({n: fname for n in part})
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    (path / "config.json").write_text(json.dumps(config, indent=1))
    return path


def write_atomically(final: Path, build) -> Path:
    """Build a checkpoint in a temp dir beside `final` and rename it into place, so
    concurrent ranks never see a half-written model."""
    if (final / "config.json").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=final.name + ".", dir=final.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, final)
        except OSError:  # another process won the race; theirs is identical
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
