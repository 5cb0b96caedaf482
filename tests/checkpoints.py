"""The small synthetic checkpoints the tests run on (random weights, real local tokenizer)."""

from __future__ import annotations

import zlib
from pathlib import Path

from mlx_kvshard.models.synth import llama_config, write_atomically, write_checkpoint

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 256}

# name -> (config, quantize, number of safetensors files)
SPECS = {
    # GQA ratio 2, untied lm_head, weights split over two files with an index
    "llama_g2": (llama_config(hidden_size=64, num_attention_heads=8, num_key_value_heads=4,
                              intermediate_size=160), None, 2),
    # GQA ratio 4, tied embeddings, llama3 rope_scaling
    "llama_g4_tied_rope": (llama_config(hidden_size=128, num_attention_heads=16, num_key_value_heads=4,
                                        intermediate_size=192, tie_word_embeddings=True,
                                        rope_scaling=LLAMA3_ROPE, rope_theta=500000.0), None, 1),
    # 8 KV heads, so 3 ranks split them 3,3,2
    "llama_kv8": (llama_config(hidden_size=128, num_attention_heads=16, num_key_value_heads=8,
                               intermediate_size=256), None, 1),
    "qwen2_bias": (llama_config(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=64,
                                num_attention_heads=8, num_key_value_heads=4, intermediate_size=128,
                                tie_word_embeddings=True, rope_theta=1000000.0), None, 1),
    "qwen3_qknorm": (llama_config(model_type="qwen3", architectures=["Qwen3ForCausalLM"], hidden_size=64,
                                  num_attention_heads=8, num_key_value_heads=4, head_dim=16,
                                  intermediate_size=128, tie_word_embeddings=True,
                                  rope_theta=1000000.0), None, 1),
    "mistral": (llama_config(model_type="mistral", architectures=["MistralForCausalLM"], hidden_size=64,
                             num_attention_heads=8, num_key_value_heads=2, head_dim=16,
                             intermediate_size=128), None, 1),
    "bf16": (llama_config(hidden_size=64, num_attention_heads=8, num_key_value_heads=4,
                          intermediate_size=128, torch_dtype="bfloat16"), None, 1),
    # MLX 4-bit, group 32 (head_dim 32 keeps o_proj splits on group boundaries)
    "q4": (llama_config(hidden_size=128, num_attention_heads=4, num_key_value_heads=4,
                        intermediate_size=256), (4, 32), 1),
    # 4-bit with tied embeddings: the logits use the quantized embedding's rows
    "q4_tied": (llama_config(hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                             intermediate_size=256, tie_word_embeddings=True), (4, 32), 1),
    # MLX 8-bit, group 64 (head_dim 64), GQA ratio 2
    "q8": (llama_config(hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
                        intermediate_size=256), (8, 64), 1),
    # KV tests: head_dim 64 (quantized KV groups of 32/64), 4 KV heads for world 3 (2,1,1)
    "kvq": (llama_config(hidden_size=128, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                         intermediate_size=256), None, 1),
    # sequence-sharded KV at world 6 and 8: tiny, 2 layers, 2 or 4 KV heads, head_dim 32
    "seq_kv2": (llama_config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                             intermediate_size=128), None, 1),
    "seq_kv4": (llama_config(hidden_size=64, num_attention_heads=8, num_key_value_heads=4, head_dim=32,
                             intermediate_size=128), None, 1),
    # mixed precision as mlx_lm.convert --quant-predicate writes it: 4-bit group 32 by default,
    # per-module entries in config.json (8-bit embedding used as the tied lm_head, 5/6/8-bit
    # row-parallel layers, a module left unquantized); 4 KV heads split 2,1,1 at world 3
    "q_mixed": (llama_config(hidden_size=128, num_attention_heads=4, num_key_value_heads=4,
                             intermediate_size=256, tie_word_embeddings=True), (4, 32), 1),
    # MLX's microscaling mode (no biases, 8-bit scales)
    "mxfp4": (llama_config(hidden_size=128, num_attention_heads=4, num_key_value_heads=4,
                           intermediate_size=256), (4, 32), 1),
    # pipeline stages: 7 layers (3 stages split 3,2,2), and a 4-bit one with 5 layers for 4 stages
    "pp7": (llama_config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                         intermediate_size=128,
                         num_hidden_layers=7), None, 2),
    "pp_q4": (llama_config(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, intermediate_size=256,
                           num_hidden_layers=5, tie_word_embeddings=True), (4, 32), 1),
}

MIXED = {
    "model.embed_tokens": {"group_size": 32, "bits": 8},
    "model.layers.0.mlp.down_proj": {"group_size": 64, "bits": 8},
    "model.layers.1.mlp.down_proj": {"group_size": 32, "bits": 6},
    "model.layers.1.self_attn.o_proj": {"group_size": 32, "bits": 5},
    "model.layers.1.self_attn.q_proj": False,
}


def mixed_predicate(path, module):
    return MIXED.get(path, True)


# name -> extra write_checkpoint arguments (mlx-lm's quantize_model with a predicate or a mode)
QUANT_EXTRA = {"q_mixed": {"quant_predicate": mixed_predicate}, "mxfp4": {"quant_mode": "mxfp4"}}


def checkpoint(root: Path, name: str) -> Path:
    cfg, quant, shards = SPECS[name]
    return write_atomically(root / name, lambda tmp: write_checkpoint(tmp, cfg, seed=zlib.crc32(name.encode()) % 1000,
                                                                      quantize=quant, shards=shards,
                                                                      **QUANT_EXTRA.get(name, {})))
