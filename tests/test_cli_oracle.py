"""`generate` through the command line on real ranks equals mlx-lm's unsharded model on
the same weights (float32, greedy): a prompt spanning several prefill chunks, an uneven
--shares split, and the vocab-parallel lm_head."""

from __future__ import annotations

import json

import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.tokenizer_utils import load as load_tokenizer

from checkpoints import checkpoint
from mlx_kvshard.models.architectures import load_oracle
from ranks import mlx_launch

LONG_PROMPT = ("The quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat "
               "and the birds sing songs about the morning sun rising over the quiet hills.")
MAX_TOKENS = 8


def oracle_tokens(model_dir, prompt: str) -> tuple[list[int], list[int]]:
    ids = load_tokenizer(model_dir).encode(prompt)
    model = load_oracle(model_dir, mx.float32)
    out = generate_step(mx.array(ids), model, max_tokens=MAX_TOKENS, sampler=lambda lp: mx.argmax(lp, axis=-1))
    return ids, [int(t) for t, _ in out]


def cli_tokens(world: int, model_dir, prompt: str, *flags: str) -> dict:
    argv = ["-m", "mlx_kvshard", "generate", "--model", str(model_dir), "--prompt", prompt, "--no-chat-template",
            "--max-tokens", str(MAX_TOKENS), "--dtype", "float32", "--json", "--check-sync", *flags]
    return json.loads(mlx_launch(world, argv, timeout=300).stdout.strip().splitlines()[-1])


def same_as_oracle(got: dict, want: list[int]) -> None:
    # the CLI stops at EOS; mlx-lm's generate_step does not
    assert got["tokens"] == want[:len(got["tokens"])] and got["tokens"], (got["tokens"], want)
    assert len(got["tokens"]) == MAX_TOKENS or got["finish_reason"] == "stop"


@pytest.mark.parametrize("world,flags", [
    (2, ["--prefill-step", "7"]),  # several prefill chunks
    (3, ["--shares", "3,1,1", "--prefill-step", "16"]),  # uneven weighted split, chunks too
    (2, ["--weights", "1,3"]),  # the old spelling still works
])
def test_cli_matches_oracle(world, flags, ckpt_root):
    d = checkpoint(ckpt_root, "llama_kv8" if world == 3 else "llama_g2")
    ids, want = oracle_tokens(d, LONG_PROMPT)
    step = int(flags[flags.index("--prefill-step") + 1]) if "--prefill-step" in flags else None
    assert step is None or len(ids) > 3 * step  # the prompt really spans several chunks
    got = cli_tokens(world, d, LONG_PROMPT, *flags)
    assert got["prompt_tokens"] == len(ids)
    same_as_oracle(got, want)
    if "--shares" in flags or "--weights" in flags:  # the split followed the shares
        heads = [r["local_kv_heads"] for r in got["ranks"]]
        assert heads == sorted(heads, reverse=(world == 3)) and len(set(heads)) > 1, heads
