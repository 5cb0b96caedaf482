"""The same token on every rank, structurally (DESIGN invariant 6), and one rank failing
alone: real rank processes (ring on 127.0.0.1), float32."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from checkpoints import checkpoint
from mlx_kvshard.engine.startup import TEST_FAIL_LOAD_RANK, TEST_PERTURB_LM_HEAD
from ranks import mlx_launch, rank_env

PROMPT = "Once upon a time there was a little model"


def generate(world: int, model_dir, *flags: str) -> dict:
    argv = ["-m", "mlx_kvshard", "generate", "--model", str(model_dir), "--prompt", PROMPT, "--no-chat-template",
            "--max-tokens", "12", "--dtype", "float32", "--json", "--check-sync", *flags]
    proc = mlx_launch(world, argv, timeout=300)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_rank_with_other_logits_still_continues_with_rank0s_tokens(ckpt_root, monkeypatch):
    """Rank 1's final norm is perturbed (as another chip's rounding would): its own argmax
    differs, yet every rank continues with rank 0's tokens, which are the unperturbed run's."""
    d = checkpoint(ckpt_root, "llama_g2")
    plain = generate(2, d)
    monkeypatch.setenv(TEST_PERTURB_LM_HEAD, "1")
    perturbed = generate(2, d)  # --check-sync: every rank holds the same token sequence
    assert perturbed["sync_checked"] and perturbed["tokens"] == plain["tokens"]
    by_rank = {r["rank"]: r for r in perturbed["ranks"]}
    assert by_rank[1]["local_token_disagreements"] > 0  # the hook does make rank 1 sample other tokens
    assert by_rank[0]["local_token_disagreements"] == 0


def test_one_rank_failing_its_load_stops_every_rank_with_its_message(ckpt_root):
    d = checkpoint(ckpt_root, "llama_g2")
    env = {**rank_env(2), TEST_FAIL_LOAD_RANK: "1"}
    proc = subprocess.run([sys.executable, "-m", "mlx_kvshard", "generate", "--model", str(d), "--simulate", "2",
                           "--max-tokens", "4", "--dtype", "float32"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode != 0
    # rank 0 (which loaded fine) reports rank 1's failure: it did not hang in a collective
    assert f"rank 1: test hook {TEST_FAIL_LOAD_RANK}: rank 1 fails its load" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and os.environ.get(TEST_FAIL_LOAD_RANK) is None
