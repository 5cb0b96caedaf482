"""`mlx-kvshard convert FILE.gguf OUT_DIR`: write a GGUF file's weights as an mlx-lm checkpoint
(quantized tensors as MLX affine group 32, exactly where the GGML format allows), so mlx-lm
and mlx-kvshard can be compared on identical weights."""

from __future__ import annotations

import argparse
import sys


def register(sub) -> None:
    p = sub.add_parser("convert", help="write a GGUF file as an mlx-lm checkpoint", description=__doc__)
    p.add_argument("gguf", metavar="FILE.gguf", help="llama-family GGUF file (llama, mistral, qwen2, qwen3)")
    p.add_argument("out", metavar="OUT_DIR", help="new directory for config.json, safetensors and tokenizer")
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16",
                   help="float tensors, scales and biases (default float16; float32 keeps every GGUF value "
                        "exactly: K-quant scales d*sc need more than float16's 11 bits)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from ..models.gguf.convert import convert

    convert(args.gguf, args.out, args.dtype, progress=lambda line: print(line, file=sys.stderr))
    return 0
