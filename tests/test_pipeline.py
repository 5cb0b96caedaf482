"""`generate --pp S` on real ranks (ring on 127.0.0.1) equals mlx-lm's unsharded model
(float32, greedy): layers split into S contiguous stages, one activation sent per stage
boundary, the last stage's token broadcast to every rank. Each stage holds only its
layers' weights and KV."""

from __future__ import annotations

import json

import pytest

from checkpoints import checkpoint
from mlx_kvshard.config import ModelConfig
from mlx_kvshard.errors import UserError
from mlx_kvshard.pipeline.stages import StagePlan, check_world
from test_cli_oracle import LONG_PROMPT, cli_tokens, oracle_tokens, same_as_oracle


def check_stages(got: dict, model_dir, pp: int, shares=None) -> None:
    """Every stage holds only its layers: weights and KV as the stage plan says, and the
    KV per rank is its layers' share of the whole model's."""
    cfg = ModelConfig.from_file(model_dir)
    stages = StagePlan.build(cfg, pp, shares, compute_dtype="float32")
    assert got["pp"] == pp and len(got["ranks"]) == pp
    assert [tuple(r["layers"]) for r in got["ranks"]] == list(stages.layers)
    tokens = got["ranks"][0]["kv_tokens"]
    whole = sum(r["plan_kv_bytes"] for r in got["ranks"])
    for r in got["ranks"]:
        a, b = r["layers"]
        assert r["weight_bytes"] == r["plan_weight_bytes"], r
        assert r["kv_tokens"] == tokens
        assert r["plan_kv_bytes"] * cfg.num_hidden_layers == whole * (b - a), r
    assert [r["sends"] > 0 for r in got["ranks"]] == [True] * (pp - 1) + [False]  # the last stage sends nothing on
    assert got["comm"]["collectives_per_token"] == 1  # the token broadcast; no all_sum inside a stage


@pytest.mark.parametrize("name,pp,flags", [
    ("llama_g2", 2, ["--prefill-step", "7"]),  # several prefill chunks through the stages
    ("pp7", 3, []),  # 7 layers on 3 stages: 3, 2, 2
    ("pp_q4", 4, ["--shares", "1,1,1,2"]),  # 4-bit, tied embeddings (the last stage holds the embedding too)
    ("q_mixed", 2, []),  # per-module quantization: stage 1's layer 0 is the checkpoint's layer 1
    ("pp7", 3, ["--kv-bits", "4", "--kv-group-size", "32"]),  # 4-bit KV, Hadamard-rotated by default
])
def test_pipeline_matches_oracle(name, pp, flags, ckpt_root):
    d = checkpoint(ckpt_root, name)
    got = cli_tokens(pp, d, LONG_PROMPT, "--pp", str(pp), *flags)
    ids, want = oracle_tokens(d, LONG_PROMPT)
    if "--kv-bits" in flags:  # quantized KV is not the float32 oracle: the same run on one rank is
        kv = flags[flags.index("--kv-bits"):flags.index("--kv-bits") + 4]
        alone = cli_tokens(1, d, LONG_PROMPT, *kv)
        assert got["tokens"] == alone["tokens"], (got["tokens"], alone["tokens"])
        assert all(r["kv_bits"] == int(kv[1]) for r in got["ranks"])
    else:
        same_as_oracle(got, want)
    shares = [float(x) for x in flags[flags.index("--shares") + 1].split(",")] if "--shares" in flags else None
    check_stages(got, d, pp, shares)
    if name == "pp7" and pp == 3:
        assert [tuple(r["layers"]) for r in got["ranks"]] == [(0, 3), (3, 5), (5, 7)]


def test_stage_plan_follows_shares_and_refuses_what_cannot_run(ckpt_root):
    cfg = ModelConfig.from_file(checkpoint(ckpt_root, "pp7"))
    assert StagePlan.build(cfg, 3).layers == ((0, 3), (3, 5), (5, 7))
    assert StagePlan.build(cfg, 2, [64, 16]).layers == ((0, 6), (6, 7))
    with pytest.raises(UserError, match="the model has 7 layers"):
        StagePlan.build(cfg, 8)
    with pytest.raises(UserError, match="got 2 shares for 3 pipeline stages"):
        StagePlan.build(cfg, 3, [1, 2])
    with pytest.raises(UserError, match=r"--pp 2 on a world of 4: .*Group split not supported"):
        check_world(2, 4)


def test_a_lost_middle_stage_is_named_and_every_rank_exits(ckpt_root, tmp_path):
    """SIGKILL stage 1 of 3 mid-generation: the launcher names rank 1, exits 75, and no
    rank survives (the stages around it were blocked in a send or a recv)."""
    import os
    import re
    import signal
    import sys
    import time

    if not sys.platform.startswith("linux"):
        pytest.skip("finds rank processes in /proc")
    from liveness_procs import alive, checkpoint_tokens, rank_pids, reap, start, wait_for
    from mlx_kvshard.liveness.client import EXIT_PEER_LOST

    tag = f"pp-lost-{os.getpid()}"
    ck, err = tmp_path / "gen.json", tmp_path / "stderr"
    argv = ["-m", "mlx_kvshard", "generate", "--model", str(checkpoint(ckpt_root, "pp7")), "--pp", "3",
            "--simulate", "3", "--max-tokens", "400", "--checkpoint-every", "4", "--checkpoint", str(ck),
            "--peer-timeout", "5", "--no-chat-template", "--prompt", "hello"]
    proc = start(argv, tag, tmp_path / "stdout", err)
    try:
        pids = rank_pids(tag, 3)
        wait_for(lambda: checkpoint_tokens(ck) >= 8, proc, 300, "a checkpoint of 8 tokens")
        os.kill(pids[1], signal.SIGKILL)
        rc = proc.wait(timeout=90)
        time.sleep(0.5)
        stderr = err.read_text(errors="replace")
        assert re.search(r"mlx-kvshard: rank 1 \(host 127\.0\.0\.1\) died at token \d+", stderr), stderr[-3000:]
        assert rc == EXIT_PEER_LOST, stderr[-3000:]
        assert not [p for p in pids.values() if alive(p)]
    finally:
        reap(tag, proc)


@pytest.mark.parametrize("args,message", [
    (["generate", "--pp", "2", "--simulate", "3"], "--pp 2 on a world of 3: every rank is one stage"),
    (["generate", "--pp", "2", "--simulate", "2", "--vocab-parallel"], "the last pipeline stage holds the whole"),
    (["generate", "--pp", "2", "--simulate", "2", "--prompt-lookup", "2"],
     "not implemented: speculative decoding with --pp 2"),
    (["serve", "--pp", "2", "--simulate", "2", "--prompt-lookup", "2"],
     "not implemented: speculative decoding (--prompt-lookup) with --pp 2"),
])
def test_what_pipeline_stages_do_not_run_is_refused_in_one_line(args, message):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "mlx_kvshard", *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
