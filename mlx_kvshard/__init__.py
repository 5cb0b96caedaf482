"""mlx-kvshard: one Llama-class model, weights and GQA KV cache sharded by head across MLX ranks."""

__version__ = "0.1.0"
