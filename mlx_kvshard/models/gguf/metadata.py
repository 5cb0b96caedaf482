"""What a GGUF file says about its model: an HF-style config.json from the metadata, and the
tokenizer (vocabulary, merges, special tokens, chat template) as tokenizer files.

The tokenizer goes through transformers' own GGUF tokenizer conversion
(`integrations/gguf/gguf_tokenizer_mapping.py`), fed from the `gguf` package's reader:
transformers' own GGUF metadata reader needs torch, its tokenizer builders do not.
"""

from __future__ import annotations

import json
from collections import Counter
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import UserError
from .rope import ROPE_FREQS, llama3_rope_scaling

ARCHITECTURES = ("llama", "qwen2", "qwen3")  # mistral files say "llama"

# llama.cpp treats these control tokens as end of generation besides the file's eos_token_id
# (llama-vocab.cpp, "auto-detect EOG tokens"); chat models end their turns with them.
END_OF_GENERATION = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
                     "<|end_of_text|>", "<EOT>", "<|eom_id|>")
_CONTROL = 3  # llama.cpp token type of special (control) tokens


class GGUFModel:
    """One GGUF file's metadata, read once (the reader memory-maps the tensor data)."""

    def __init__(self, path: Path):
        from gguf import GGUFReader

        self.path = Path(path)
        try:
            self.reader = GGUFReader(self.path)
        except Exception as e:  # a truncated or foreign file: the reader raises many kinds
            raise UserError(f"{self.path}: not a readable GGUF file ({type(e).__name__}: {e}); "
                            f"re-download it") from None
        self.arch = str(self.value("general.architecture"))
        if self.arch not in ARCHITECTURES:
            raise UserError(f"{self.path}: GGUF architecture {self.arch!r} is not supported; "
                            f"supported: {', '.join(ARCHITECTURES)} (llama-family)")

    def value(self, key: str, default: Any = None) -> Any:
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

    def arch_value(self, key: str, default: Any = None) -> Any:
        return self.value(f"{self.arch}.{key}", default)

    def required(self, key: str) -> int:
        value = self.arch_value(key)
        if value is None:
            raise UserError(f"{self.path}: metadata {self.arch}.{key} is missing; the file is incomplete "
                            f"or was not written by llama.cpp's converter")
        return int(value)

    @cached_property
    def tensor_names(self) -> set[str]:
        return {t.name for t in self.reader.tensors}

    @property
    def n_heads(self) -> int:
        return self.required("attention.head_count")

    @property
    def head_dim(self) -> int:
        return int(self.arch_value("attention.key_length") or self.required("embedding_length") // self.n_heads)

    def config(self) -> dict:
        """config.json for mlx-lm's model class of this architecture."""
        if self.arch_value("rope.scaling.type", "none") not in ("none",):
            raise UserError(f"{self.path}: rope scaling (rope.scaling.type "
                            f"{self.arch_value('rope.scaling.type')!r}) is not implemented for GGUF files; "
                            f"convert the original HF checkpoint with mlx_lm.convert instead")
        n_heads = self.n_heads
        vocab = len(self.reader.fields["tokenizer.ggml.tokens"].data)
        embd = next(t for t in self.reader.tensors if t.name == "token_embd.weight")
        vocab = int(embd.shape[1]) if len(embd.shape) > 1 else vocab
        float_types = {t.tensor_type.name for t in self.reader.tensors}
        cfg = {
            "model_type": self.arch,
            "architectures": [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                               "qwen3": "Qwen3ForCausalLM"}[self.arch]],
            "hidden_size": self.required("embedding_length"),
            "num_hidden_layers": self.required("block_count"),
            "intermediate_size": self.required("feed_forward_length"),
            "num_attention_heads": n_heads,
            "num_key_value_heads": int(self.arch_value("attention.head_count_kv") or n_heads),
            "head_dim": self.head_dim,
            "rms_norm_eps": float(self.arch_value("attention.layer_norm_rms_epsilon", 1e-6)),
            "rope_theta": float(self.arch_value("rope.freq_base", 10000.0)),
            "max_position_embeddings": int(self.arch_value("context_length", 4096)),
            "vocab_size": vocab,
            "tie_word_embeddings": "output.weight" not in self.tensor_names,
            "attention_bias": "blk.0.attn_q.bias" in self.tensor_names,
            # llama.cpp computes in float16; a file holding bfloat16 tensors keeps them
            "torch_dtype": "bfloat16" if "BF16" in float_types else "float16",
        }
        if ROPE_FREQS in self.tensor_names:
            factors = next(t for t in self.reader.tensors if t.name == ROPE_FREQS)
            scaling = llama3_rope_scaling(np.asarray(factors.data, dtype=np.float64).ravel(), cfg["rope_theta"],
                                          self.head_dim, self.path)
            if scaling is not None:
                cfg["rope_scaling"] = scaling
        for key, name in (("bos_token_id", "tokenizer.ggml.bos_token_id"), ("eos_token_id", "tokenizer.ggml.eos_token_id")):
            if name in self.reader.fields:
                cfg[key] = int(self.value(name))
        return cfg

    def quantization(self, module_bits: dict[str, tuple[int, int] | None]) -> dict | None:
        """config.json's `quantization` for the modules as loaded: the most common (bits, group)
        as defaults, every other module its own entry, float matrices `false`."""
        qs = [q for q in module_bits.values() if q is not None]
        if not qs:
            return None
        bits, group = Counter(qs).most_common(1)[0][0]
        out: dict[str, Any] = {"group_size": group, "bits": bits, "mode": "affine"}
        for module, q in sorted(module_bits.items()):
            if q is None:
                out[module] = False
            elif q != (bits, group):
                out[module] = {"group_size": q[1], "bits": q[0], "mode": "affine"}
        return out

    # ---- tokenizer ---------------------------------------------------------------------
    def tokenizer_dict(self) -> dict:
        """The file's tokenizer in the shape transformers' GGUF tokenizer builders take."""
        keys = {"model": "tokenizer_type", "pre": "pre_tokenizer_type", "tokens": "tokens",
                "scores": "scores", "token_type": "token_type", "merges": "merges",
                "add_space_prefix": "add_prefix_space", "bos_token_id": "bos_token_id",
                "eos_token_id": "eos_token_id", "unknown_token_id": "unk_token_id",
                "padding_token_id": "pad_token_id"}
        return {name: self.value(f"tokenizer.ggml.{key}") for key, name in keys.items()
                if f"tokenizer.ggml.{key}" in self.reader.fields}

    def write_tokenizer(self, out: Path) -> list[int]:
        """tokenizer.json, tokenizer_config.json (special tokens, chat template, add_bos_token) into
        `out`; returns the end-of-generation token ids."""
        from tokenizers import pre_tokenizers, processors
        from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

        d = self.tokenizer_dict()
        if d.get("tokenizer_type") not in ("gpt2", "llama"):
            raise UserError(f"{self.path}: tokenizer model {d.get('tokenizer_type')!r} is not supported; "
                            f"supported: gpt2 (byte-level BPE) and llama (SentencePiece)")
        try:
            tok, _ = convert_gguf_tokenizer(self.arch, d)
        except Exception as e:
            raise UserError(f"{self.path}: could not build its tokenizer ({type(e).__name__}: {e})") from None
        if d.get("pre_tokenizer_type") == "smollm":
            # llama.cpp's smollm pre-tokenizer splits digits one by one before the GPT-2 split
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
        tokens = d["tokens"]
        special = {name: tokens[d[key]] for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                                                           ("unk_token", "unk_token_id"), ("pad_token", "pad_token_id"))
                   if d.get(key) is not None and d[key] < len(tokens)}
        add_bos = bool(self.value("tokenizer.ggml.add_bos_token", d.get("tokenizer_type") == "llama"))
        if add_bos and "bos_token" in special:  # as llama.cpp: the file's BOS before every text
            bos = special["bos_token"]
            tok.post_processor = processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, d["bos_token_id"])])
        out.mkdir(parents=True, exist_ok=True)
        tok.save(str(out / "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1 << 20,
                  "add_bos_token": add_bos, "add_eos_token": bool(self.value("tokenizer.ggml.add_eos_token", False)),
                  **special}
        template = self.value("tokenizer.chat_template")
        if template:
            config["chat_template"] = str(template)
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
        types = d.get("token_type") or [0] * len(tokens)
        eog = [d["eos_token_id"]] if d.get("eos_token_id") is not None else []
        eog += [i for i, (t, ty) in enumerate(zip(tokens, types))
                if t in END_OF_GENERATION and ty == _CONTROL and i not in eog]
        return eog
