"""`mlx-kvshard perplexity`: a text scored through the sharded model and its KV cache as
generation fills it. The same value at world 1 and world 3 (1e-4 relative, float32), and
the value mlx-lm's own unsharded model gives through its own caches in the same chunks
(for Hadamard-rotated KV: through a cache that stores rotated K/V quantized and returns them
rotated back, which is what rotating q, k, v and the output computes)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from mlx_lm.models.cache import KVCache, QuantizedKVCache
from mlx_lm.tokenizer_utils import load as load_tokenizer

from checkpoints import checkpoint
from mlx_kvshard.models.architectures import load_oracle

PROSE = Path(__file__).parent / "data" / "prose.txt"
CONTEXT, STEP = 40, 8  # windows of 40 tokens, each prefilled in chunks of 8


def perplexity(*argv) -> dict:
    proc = subprocess.run([sys.executable, "-m", "mlx_kvshard", "perplexity", "--json", *argv],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def oracle(model_dir: Path, text: Path, make_cache, step: int = STEP) -> tuple[float, int]:
    """Perplexity from mlx-lm's model and caches: windows of CONTEXT, chunks of `step`."""
    model = load_oracle(model_dir, mx.float32)
    ids = load_tokenizer(model_dir).encode(text.read_text())
    nll, n = 0.0, 0
    for w in range(0, len(ids), CONTEXT):
        window = ids[w:w + CONTEXT]
        cache = [make_cache() for _ in model.layers]
        for s in range(0, len(window) - 1, step):
            x = mx.array(window[s:s + step + 1])
            logits = model(x[None, :-1], cache=cache)[0].astype(mx.float32)
            lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            nll -= mx.take_along_axis(lp, x[1:, None], axis=-1).sum().item()
            n += x.shape[0] - 1
    return math.exp(nll / n), n


class RotatedQuantizedCache:
    """mlx-lm's QuantizedKVCache of Hadamard-rotated K and V, returned dequantized and rotated
    back (full precision to mlx-lm's attention)."""

    def __init__(self, group_size: int, bits: int):
        self.inner = QuantizedKVCache(group_size=group_size, bits=bits)

    @property
    def offset(self):
        return self.inner.offset

    def make_mask(self, *args, **kwargs):
        return self.inner.make_mask(*args, **kwargs)

    def update_and_fetch(self, keys, values):
        rot = lambda x: mx.hadamard_transform(x, scale=x.shape[-1] ** -0.5)  # noqa: E731
        q = self.inner
        k, v = q.update_and_fetch(rot(keys), rot(values))
        return tuple(rot(mx.dequantize(*t, group_size=q.group_size, bits=q.bits)) for t in (k, v))


class RotatedWindowCache(RotatedQuantizedCache):
    """For one token at a time: the last `window` positions in full precision, older ones
    through the rotated quantized store (each position quantized once, as stored)."""

    def __init__(self, group_size: int, bits: int, window: int):
        super().__init__(group_size, bits)
        self.window, self.keys, self.values = window, None, None

    def update_and_fetch(self, keys, values):
        qk, qv = super().update_and_fetch(keys, values)  # every position, through the quantized store
        cat = lambda a, b: b if a is None else mx.concatenate([a, b], axis=2)  # noqa: E731
        self.keys, self.values = cat(self.keys, keys), cat(self.values, values)
        old = max(0, self.keys.shape[2] - self.window)
        return (mx.concatenate([qk[..., :old, :], self.keys[..., old:, :]], axis=2),
                mx.concatenate([qv[..., :old, :], self.values[..., old:, :]], axis=2))


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "prose.txt"
    path.write_text(PROSE.read_text()[:500])  # a few windows on the byte-level test tokenizer
    return path


def test_world3_equals_world1_and_mlx_lm(ckpt_root, text):
    """Rotated 4-bit KV; its full-precision comparison runs the same rotated model, which must
    give mlx-lm's unrotated full-precision perplexity (the rotation is exact)."""
    model = checkpoint(ckpt_root, "kvq")  # 4 KV heads: world 3 holds 2, 1, 1
    args = ["--model", str(model), "--file", str(text), "--context", str(CONTEXT), "--prefill-step", str(STEP),
            "--kv-bits", "4", "--kv-group-size", "32", "--kv-rotate", "on", "--kv-fp-window", "0", "--compare-fp"]
    one, three = perplexity(*args, "--simulate", "1"), perplexity(*args, "--simulate", "3")
    assert one["tokens_scored"] == three["tokens_scored"] > 2 * CONTEXT and one["windows"] >= 3
    for key in ("perplexity", "fp_perplexity", "kl_divergence_mean"):
        assert math.isclose(three[key], one[key], rel_tol=1e-4), (key, one[key], three[key])
    assert one["kl_divergence_mean"] > 0 and one["perplexity"] != one["fp_perplexity"]  # 4-bit KV is not free
    assert one["kv"]["rotated"] and three["kv"]["rotated"]
    want, n = oracle(model, text, lambda: RotatedQuantizedCache(group_size=32, bits=4))
    assert n == one["tokens_scored"]
    assert math.isclose(one["perplexity"], want, rel_tol=1e-4), (one["perplexity"], want)
    want_fp, _ = oracle(model, text, KVCache)
    assert math.isclose(one["fp_perplexity"], want_fp, rel_tol=1e-4), (one["fp_perplexity"], want_fp)
    # KV per rank follows the heads it holds
    assert [r["kv_bytes"] for r in three["ranks"]] == [2 * three["ranks"][1]["kv_bytes"]] + [three["ranks"][1]["kv_bytes"]] * 2


def test_fp_window_equals_mlx_lm_one_token_at_a_time(ckpt_root, text, tmp_path):
    """--kv-fp-window 24 (rotated 4-bit, windows of 40) = mlx-lm's model fed one token at a time
    through a cache returning the last 24 positions in full precision and older ones quantized:
    our chunks of 8 give the same value (every query sees its own window). World 3 = world 1
    with a window: tests/test_kv_rotate.py (the serving engine against one-prompt generate)."""
    model = checkpoint(ckpt_root, "kvq")
    text = tmp_path / "short.txt"
    text.write_text(PROSE.read_text()[:200])  # five windows: the oracle goes one token at a time
    args = ["--model", str(model), "--file", str(text), "--context", str(CONTEXT), "--prefill-step", str(STEP),
            "--kv-bits", "4", "--kv-group-size", "32", "--kv-rotate", "on", "--kv-fp-window", "24"]
    one = perplexity(*args, "--simulate", "1")
    assert one["kv"]["fp_window"] == 24
    want, n = oracle(model, text, lambda: RotatedWindowCache(32, 4, 24), step=1)
    assert n == one["tokens_scored"]
    assert math.isclose(one["perplexity"], want, rel_tol=1e-4), (one["perplexity"], want)
    plain, _ = oracle(model, text, lambda: RotatedQuantizedCache(group_size=32, bits=4))
    assert abs(want / plain - 1) > 1e-3  # the window changes the value: the check above can tell (1.4e-3)


def test_sequence_sharded_kv_equals_mlx_lm(ckpt_root, text):
    """World 3 on 2 KV heads, one of them split by sequence position, rotated 4-bit: the LSE
    merge over rotated, quantized shares gives the oracle's perplexity."""
    model = checkpoint(ckpt_root, "seq_kv2")
    got = perplexity("--model", str(model), "--file", str(text), "--context", str(CONTEXT), "--prefill-step",
                     str(STEP), "--kv-bits", "4", "--kv-group-size", "32", "--kv-shard", "sequence",
                     "--kv-rotate", "on", "--simulate", "3")
    assert got["kv"]["shard"] == "sequence" and got["kv"]["rotated"]
    want, _ = oracle(model, text, lambda: RotatedQuantizedCache(group_size=32, bits=4))
    assert math.isclose(got["perplexity"], want, rel_tol=1e-4), (got["perplexity"], want)


def test_bad_input_is_one_line(tmp_path):
    for argv, needle in ((["--file", str(tmp_path / "missing.txt")], "no such file"),
                         (["--file", str(PROSE), "--context", "1"], "at least 2 tokens")):
        proc = subprocess.run([sys.executable, "-m", "mlx_kvshard", "perplexity", "--simulate", "1", *argv],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and needle in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, \
            proc.stderr
