"""KV sharded by sequence position when ranks outnumber KV heads (--kv-shard sequence): the
sharers of a head each hold every s-th position and merge partial attention by log-sum-exp.
Same logits (1e-4) and greedy tokens as the unsharded mlx-lm model, with a prompt longer
than the prefill chunk; KV per rank = total / N; a resumed run continues exactly."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from checkpoints import checkpoint
from equiv_rank import PROMPT
from ranks import mlx_launch
from test_equivalence import oracle
from test_kv_quantized import STEP as QUANT_STEP, mlx_lm_quantized

N_TOKENS = 8
STEP = 5  # the 12-token prompt is prefilled in chunks of 5, 5, 1 (+ the last token)
assert STEP == QUANT_STEP  # the quantized oracle prefills in the same chunks
# world -> checkpoints run sequence-sharded (8 on 2 and on 4 KV heads; 6 on 4: sharers 2,2,1,1)
WORLDS = {8: ["seq_kv2", "seq_kv4"], 6: ["seq_kv4"]}


@pytest.mark.parametrize("world", sorted(WORLDS))
def test_sequence_sharded_matches_unsharded(world, ckpt_root, tmp_path):
    names = WORLDS[world]
    runs = [{"name": n, "model": str(checkpoint(ckpt_root, n)), "shard": "sequence", "prefill_step": STEP,
             "tokens": N_TOKENS} for n in names]
    if world == 8:  # composes with quantized KV: compared with mlx-lm's own 8-bit cache below
        runs.append({**runs[0], "name": "seq_kv2_q8", "bits": 8, "group_size": 32})
    mlx_launch(world, [__import__("kv_rank").__file__, str(tmp_path), json.dumps(runs)], timeout=1200)
    for r in runs:
        got = np.load(tmp_path / f"{r['name']}.npz")
        facts = [json.loads((tmp_path / f"{r['name']}.rank{k}.json").read_text()) for k in range(world)]
        n_kv = json.loads((checkpoint(ckpt_root, r["model"].split("/")[-1]) / "config.json").read_text())[
            "num_key_value_heads"]
        assert all(f["kv_shard"] == "sequence" for f in facts)
        for f in facts:
            assert f["kv_positions"] == f["plan_kv_positions"], f
            assert f["kv_bytes"] == f["kv_positions_allocated"] * f["plan_kv_bytes_per_position"], f
        # one extra (LSE) all_gather per layer: 3 collectives per layer per decode step
        assert facts[0]["collectives"] % 3 == 0
        held = [f["kv_positions"] for f in facts]
        seen = facts[0]["kv_tokens"]
        if world % n_kv == 0:  # every head shared alike: KV per rank = total / N (to a position)
            assert sum(held) == n_kv * seen and max(held) - min(held) <= 1
        if "bits" in r:
            want_logits, want_tokens = mlx_lm_quantized(r["model"], r["bits"], r["group_size"], 0)
        else:
            want_logits, want_tokens = oracle(checkpoint(ckpt_root, r["name"]))
        err = float(np.max(np.abs(got["logits"] - want_logits)))
        assert err < 1e-4, f"{r['name']} world {world}: max |logit diff| {err}"
        assert got["tokens"].tolist() == want_tokens[:N_TOKENS], f"{r['name']} world {world}: tokens differ"


def generate(*argv) -> dict:
    proc = subprocess.run([sys.executable, "-m", "mlx_kvshard", "generate", "--json", *argv],
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_resumed_sequence_sharded_run_continues_exactly(ckpt_root, tmp_path):
    """generate --kv-shard sequence on 8 ranks (4 KV heads): stop after 6 tokens, resume to 12;
    the tokens are those of one rank, and ranks[].kv_bytes follow the plan."""
    model = str(checkpoint(ckpt_root, "seq_kv4"))
    args = ["--model", model, "--prompt", "The sea is wide and deep", "--prefill-step", "4"]
    want = generate(*args, "--simulate", "1", "--max-tokens", "12")["tokens"]
    ck = tmp_path / "gen.json"
    seq = ["--simulate", "8", "--kv-shard", "sequence", "--check-sync"]
    first = generate(*args, *seq, "--max-tokens", "6", "--checkpoint", str(ck), "--checkpoint-every", "2")
    assert first["tokens"] == want[:6]
    got = generate(*seq, "--resume", str(ck), "--max-tokens", "12")
    assert got["resumed_tokens"] == 6 and got["tokens"] == want
    ranks = got["ranks"]
    assert all(r["kv_shard"] == "sequence" and r["seq_sharers"] == 2 for r in ranks)
    for r in ranks:
        assert r["kv_bytes"] == r["kv_tokens_allocated"] * r["plan_kv_bytes_per_token"]
        assert r["plan_kv_bytes"] == r["kv_positions"] * r["plan_kv_bytes_per_token"]
    held = [r["kv_positions"] for r in ranks]
    assert sum(held) == 4 * ranks[0]["kv_tokens"] and max(held) - min(held) <= 1
