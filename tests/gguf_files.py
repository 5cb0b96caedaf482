"""Synthetic GGUF files for the tests, written with the `gguf` package's own writer the way
llama.cpp's converter lays them out (tensor names, q/k row permutation for llama, tokenizer
metadata), from a synthetic HF checkpoint (models/synth.py): random weights, a real BPE
tokenizer. Types the `gguf` package can quantize (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0,
Q5_1) quantize the checkpoint's weights; the K types, which it can only dequantize, are
random blocks with small, valid scales."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T

from mlx_kvshard.models.synth import llama_config, write_atomically, write_checkpoint

# byte offsets of the float16 scale fields in one block of the K types, and the magnitude
# that keeps their weights near the checkpoint's std
K_SCALE_FIELDS = {T.Q4_K: ((0, 2), 1e-4), T.Q5_K: ((0, 2), 5e-5), T.Q6_K: ((208,), 2e-5),
                  T.Q3_K: ((108,), 4e-4), T.Q2_K: ((80, 82), 3e-3)}
GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
              "post_attention_layernorm": "ffn_norm", "self_attn.q_norm": "attn_q_norm",
              "self_attn.k_norm": "attn_k_norm"}

# name -> (HF config, GGML type per mlx-lm module, default type): uneven splits at world 3
# (4 KV heads: 2,1,1; MLP 512 in 16 groups of 32: 6,5,5 off the 256-value K blocks)
SPECS = {
    # llama (q/k permuted), untied: every supported type somewhere
    "gguf_llama_all": (
        llama_config(hidden_size=256, num_attention_heads=8, num_key_value_heads=4, intermediate_size=512),
        {"model.embed_tokens": T.Q8_0, "lm_head": T.Q6_K,
         "model.layers.0.self_attn.q_proj": T.Q4_0, "model.layers.0.self_attn.k_proj": T.Q4_1,
         "model.layers.0.self_attn.v_proj": T.Q5_0, "model.layers.0.self_attn.o_proj": T.Q5_1,
         "model.layers.0.mlp.gate_proj": T.Q4_K, "model.layers.0.mlp.up_proj": T.Q5_K,
         "model.layers.0.mlp.down_proj": T.Q6_K,
         "model.layers.1.self_attn.q_proj": T.Q3_K, "model.layers.1.self_attn.k_proj": T.Q2_K,
         "model.layers.1.self_attn.v_proj": T.F16, "model.layers.1.self_attn.o_proj": T.BF16,
         "model.layers.1.mlp.gate_proj": T.F32, "model.layers.1.mlp.up_proj": T.Q8_0,
         "model.layers.1.mlp.down_proj": T.Q4_K},
        T.Q4_0),
    # qwen2 (q/k/v bias, not permuted), tied embedding as the logits
    "gguf_qwen2_tied": (
        llama_config(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=128,
                     num_attention_heads=8, num_key_value_heads=4, intermediate_size=512,
                     tie_word_embeddings=True, rope_theta=1000000.0),
        {"model.embed_tokens": T.Q8_0, "model.layers.1.mlp.down_proj": T.Q5_K},
        T.Q4_1),
    # llama3 rope scaling (rope_freqs.weight, as llama.cpp's converter writes it), float32 weights
    # so mlx-lm on the HF checkpoint itself is the oracle; thresholds inside the tiny model's
    # wavelengths (head_dim 16: pairs 1-2 blended, 3-7 scaled)
    "gguf_llama3_rope": (
        llama_config(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
        {}, T.F32),
}


def rope_freqs(cfg: dict) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf llama3 factors, computed in float32 as it does."""
    sc = cfg["rope_scaling"]
    dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    freqs = 1.0 / (np.float32(cfg["rope_theta"]) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
    low_wl = sc["original_max_position_embeddings"] / sc["low_freq_factor"]
    high_wl = sc["original_max_position_embeddings"] / sc["high_freq_factor"]
    out = []
    for f in freqs:
        wl = 2 * np.pi / f
        if wl < high_wl:
            out.append(1.0)
        elif wl > low_wl:
            out.append(sc["factor"])
        else:
            smooth = (sc["original_max_position_embeddings"] / wl - sc["low_freq_factor"]) / \
                (sc["high_freq_factor"] - sc["low_freq_factor"])
            out.append(1 / ((1 - smooth) / sc["factor"] + smooth))
    return np.array(out, dtype=np.float32)


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (per head: (2, hd/2) -> (hd/2, 2))."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _encode(arr: np.ndarray, qtype: T, rng: np.random.Generator) -> tuple[np.ndarray, T | None]:
    from gguf import GGML_QUANT_SIZES, quants

    if qtype == T.F32:
        return arr.astype(np.float32), None
    if qtype == T.F16:
        return arr.astype(np.float16), None
    if qtype in K_SCALE_FIELDS:
        per, block = GGML_QUANT_SIZES[qtype]
        rows, cols = arr.shape
        raw = rng.integers(0, 256, (rows, cols // per, block), dtype=np.uint8)
        offsets, mag = K_SCALE_FIELDS[qtype]
        for at in offsets:
            d = (mag * (0.5 + rng.random((rows, cols // per, 1)))).astype(np.float16)
            raw[..., at:at + 2] = d.view(np.uint8)
        return raw.reshape(rows, -1), qtype
    return quants.quantize(arr.astype(np.float32), qtype), qtype


def write_gguf(path: Path, hf_dir: Path, types: dict, default: T, seed: int = 0) -> Path:
    import gguf
    import mlx.core as mx

    cfg = json.loads((hf_dir / "config.json").read_text())
    arch = cfg["model_type"]
    weights = {k: np.array(v.astype(mx.float32)) for k, v in mx.load(str(hf_dir / "model.safetensors")).items()}
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg["rope_theta"])
    tok = json.loads((hf_dir / "tokenizer.json").read_text())
    vocab = {t: i for t, i in tok["model"]["vocab"].items()}
    for added in tok["added_tokens"]:
        vocab[added["content"]] = added["id"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = {a["content"] for a in tok["added_tokens"] if a["special"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in special else 1 for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    w.add_add_bos_token(False)
    w.add_chat_template(json.loads((hf_dir / "tokenizer_config.json").read_text())["chat_template"])
    for name in sorted(weights):
        arr = weights[name]
        module, leaf = name.rsplit(".", 1)
        if name.startswith("model.layers."):
            i, rest = module.split(".", 3)[2:]
            gname = f"blk.{i}.{GGUF_NAMES[rest]}.{leaf}"
        else:
            gname = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}[module] + f".{leaf}"
        if arch == "llama" and module.endswith(("q_proj", "k_proj")):
            heads = cfg["num_attention_heads"] if module.endswith("q_proj") else cfg["num_key_value_heads"]
            arr = _permute(arr, heads)
        qtype = types.get(module, default) if arr.ndim == 2 else T.F32
        data, raw = _encode(arr, qtype, rng)
        w.add_tensor(gname, data, raw_dtype=raw)
    if (cfg.get("rope_scaling") or {}).get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", rope_freqs(cfg))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def gguf_file(root: Path, name: str) -> Path:
    """The GGUF file `name` (built once per session, beside its source checkpoint)."""
    cfg, types, default = SPECS[name]
    seed = zlib.crc32(name.encode()) % 1000

    def build(tmp: Path) -> None:
        write_checkpoint(tmp / "hf", cfg, seed=seed)
        write_gguf(tmp / "model.gguf", tmp / "hf", types, default, seed)
        (tmp / "config.json").write_text("{}")  # marks the build complete for write_atomically

    return write_atomically(root / name, build) / "model.gguf"
