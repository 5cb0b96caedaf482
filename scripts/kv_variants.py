"""Explore 4- and 8-bit KV schemes on real text, in one process (world 1): the model and the
full-precision reference are computed once, then every variant is scored through the same
windows and prefill chunks as `mlx-kvshard perplexity` (quality/score.py's conventions).

Each variant's cache stores K and V in full precision and returns them fake-quantized
(quantize then dequantize, mx.quantize's affine groups), which gives the same attention
inputs as storing them quantized; so schemes can be compared before one is built. Shipped
schemes are then measured with the real command (docs/kv-quality.md).

usage: python scripts/kv_variants.py MODEL TEXT [--prefill-step 16] [--variants NAME ...]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import mlx.core as mx
from mlx_lm.models.cache import KVCache

from mlx_kvshard.config import ModelConfig
from mlx_kvshard.engine.dist import init_comm
from mlx_kvshard.engine.loader import load_rank_model
from mlx_kvshard.engine.startup import load_tokenizer
from mlx_kvshard.plan import ShardPlan
from mlx_kvshard.quality.rank import read_tokens
from mlx_kvshard.quality.score import _logprobs


def fake_quant(x: mx.array, bits: int, group: int) -> mx.array:
    return mx.dequantize(*mx.quantize(x, group_size=group, bits=bits), group_size=group, bits=bits).astype(x.dtype)


def rotate(x: mx.array, signs: mx.array | None = None, inverse: bool = False) -> mx.array:
    """Orthonormal Hadamard along head_dim (its own inverse); with `signs`, randomized as QuaRot's:
    H diag(signs), inverse diag(signs) H."""
    if signs is not None and not inverse:
        x = x * signs
    x = mx.hadamard_transform(x, scale=1 / math.sqrt(x.shape[-1]))
    return x * signs if signs is not None and inverse else x


class Variant:
    """bits/group per token along head_dim; `rot` Hadamard; `sinks` first and `window` last
    positions in full precision; `k_channel`: keys quantized per channel over blocks of
    `group` positions (KIVI), complete blocks only (the rest stays full precision)."""

    def __init__(self, name, bits=None, group=64, rot=False, sinks=0, window=0, k_channel=False, k_bits=None,
                 sign_seed=None):
        self.name, self.bits, self.group, self.rot = name, bits, group, rot
        self.sign_seed = sign_seed
        self.sinks, self.window, self.k_channel, self.k_bits = sinks, window, k_channel, k_bits or bits

    def apply(self, x: mx.array, keys: bool) -> mx.array:
        if self.bits is None:
            return x
        n = x.shape[2]
        lo, hi = min(self.sinks, n), max(min(self.sinks, n), n - self.window)
        signs = None
        if self.sign_seed is not None:
            signs = mx.where(mx.random.uniform(shape=(x.shape[-1],), key=mx.random.key(self.sign_seed)) < 0.5, -1.0, 1.0)
        if self.rot:
            x = rotate(x, signs)
        bits = self.k_bits if keys else self.bits
        if keys and self.k_channel:
            hi = lo + (hi - lo) // self.group * self.group
            if hi > lo:
                B, H, _, D = x.shape
                mid = x[:, :, lo:hi].reshape(B, H, -1, self.group, D).swapaxes(-1, -2)
                mid = fake_quant(mid, bits, self.group).swapaxes(-1, -2).reshape(B, H, hi - lo, D)
                x = mx.concatenate([x[:, :, :lo], mid, x[:, :, hi:]], axis=2)
        elif hi > lo:
            x = mx.concatenate([x[:, :, :lo], fake_quant(x[:, :, lo:hi], bits, self.group), x[:, :, hi:]], axis=2)
        return rotate(x, signs, inverse=True) if self.rot else x

    def bits_per_element(self, n: int, scale_bits: int = 16) -> float:
        """Average stored bits per K/V element at n positions (scales and biases in fp16)."""
        if self.bits is None:
            return 16.0
        fp = min(n, self.sinks + self.window)
        q = n - fp
        per_k = self.k_bits + 2 * scale_bits / self.group
        per_v = self.bits + 2 * scale_bits / self.group
        if self.k_channel:
            fp_k = fp + min(q, self.group - 1)  # the incomplete block stays full precision (at most)
            k = (fp_k * 16 + (n - fp_k) * per_k) / n
        else:
            k = (fp * 16 + q * per_k) / n
        return (k + (fp * 16 + q * per_v) / n) / 2


class FakeQuantCache(KVCache):
    def __init__(self, variant: Variant):
        super().__init__()
        self.variant = variant

    def update_and_fetch(self, keys, values):
        k, v = super().update_and_fetch(keys, values)
        return self.variant.apply(k, True), self.variant.apply(v, False)


VARIANTS = [
    Variant("8-bit g64", 8, 64), Variant("8-bit g32", 8, 32), Variant("8-bit g64 rot", 8, 64, rot=True),
    Variant("4-bit g64", 4, 64), Variant("4-bit g32", 4, 32),
    Variant("4-bit g64 rot", 4, 64, rot=True), Variant("4-bit g32 rot", 4, 32, rot=True),
    Variant("4-bit g64 sinks4", 4, 64, sinks=4), Variant("4-bit g64 sinks4 win16", 4, 64, sinks=4, window=16),
    Variant("4-bit g64 win32", 4, 64, window=32),
    Variant("4-bit g64 rot sinks4", 4, 64, rot=True, sinks=4),
    Variant("4-bit g64 rot sinks4 win16", 4, 64, rot=True, sinks=4, window=16),
    Variant("4-bit g32 rot sinks4", 4, 32, rot=True, sinks=4),
    Variant("4-bit g64 kchan", 4, 64, k_channel=True), Variant("4-bit g32 kchan", 4, 32, k_channel=True),
    Variant("4-bit g64 kchan sinks4", 4, 64, k_channel=True, sinks=4),
    Variant("4-bit g64 rot kchan", 4, 64, rot=True, k_channel=True),
    Variant("4-bit g64 rrot0", 4, 64, rot=True, sign_seed=0), Variant("4-bit g64 rrot1", 4, 64, rot=True, sign_seed=1),
    Variant("4-bit g64 rot win32", 4, 64, rot=True, window=32),
    Variant("4-bit g64 rot sinks4 win32", 4, 64, rot=True, sinks=4, window=32),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("text")
    ap.add_argument("--prefill-step", type=int, default=16)
    ap.add_argument("--variants", nargs="*")
    ap.add_argument("--out")
    args = ap.parse_args()
    comm = init_comm("any")
    d = Path(args.model)
    cfg = ModelConfig.from_file(d)
    model = load_rank_model(d, ShardPlan.build(cfg, 1, compute_dtype="float32"), comm, mx.float32)
    tokens = read_tokens(args.text, load_tokenizer(d, cfg))
    ids, step = mx.array(tokens, dtype=mx.uint32), args.prefill_step
    chunks = [(s, min(s + step, len(tokens) - 1)) for s in range(0, len(tokens) - 1, step)]

    def run(make):
        cache = [make() for _ in model.layers]
        for s, e in chunks:
            lp = _logprobs(model(ids[s:e][None], cache))
            mx.eval(lp, [c.state for c in cache])
            yield s, e, lp

    fp = [lp for _, _, lp in run(KVCache)]
    fp_nll = sum(-mx.take_along_axis(lp, ids[s + 1:e + 1, None], axis=-1).sum().item()
                 for (s, e), lp in zip(chunks, fp))
    n = len(tokens) - 1
    rows = [{"variant": "fp", "perplexity": math.exp(fp_nll / n), "change": 0.0, "kl": 0.0, "top1": 1.0,
             "bits_per_element": 16.0}]
    print(json.dumps(rows[0]), flush=True)
    for v in VARIANTS:
        if args.variants and v.name not in args.variants:
            continue
        t0 = time.perf_counter()
        nll = kl = same = 0.0
        for (s, e, lp), lp_fp in zip(run(lambda: FakeQuantCache(v)), fp):
            nll -= mx.take_along_axis(lp, ids[s + 1:e + 1, None], axis=-1).sum().item()
            kl += (mx.exp(lp_fp) * (lp_fp - lp)).sum().item()
            same += (mx.argmax(lp, -1) == mx.argmax(lp_fp, -1)).sum().item()
        row = {"variant": v.name, "perplexity": math.exp(nll / n), "change": math.exp((nll - fp_nll) / n) - 1,
               "kl": kl / n, "top1": same / n, "bits_per_element": v.bits_per_element(len(tokens)),
               "bits_per_element_4k": v.bits_per_element(4096), "s": time.perf_counter() - t0}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"model": str(d), "text": args.text, "tokens": len(tokens),
                                              "prefill_step": step, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
