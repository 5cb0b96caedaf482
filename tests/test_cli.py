"""The CLI end to end, with real simulated ranks started by `generate --simulate N`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from checkpoints import checkpoint


def generate(*argv, timeout=300) -> dict:
    proc = subprocess.run([sys.executable, "-m", "mlx_kvshard", "generate", "--json", *argv],
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_tiny_two_ranks_json():
    out = generate("--model", "tiny", "--simulate", "2", "--max-tokens", "12", "--stats", "--check-sync")
    assert len(out["tokens"]) == 12 and out["finish_reason"] == "length"
    assert out["world"] == 2 and out["sync_checked"]
    assert [r["local_kv_heads"] for r in out["ranks"]] == [2, 2]
    assert [r["local_q_heads"] for r in out["ranks"]] == [4, 4]
    for r in out["ranks"]:
        assert r["weight_bytes"] == r["plan_weight_bytes"]
        assert r["kv_bytes"] == r["kv_tokens_allocated"] * r["plan_kv_bytes_per_token"]
    t = out["timings"]
    assert t["ttft_s"] > 0 and t["decode_tok_s"] > 0 and t["prefill_tok_s"] > 0


@pytest.mark.parametrize("model,world", [("llama_kv8", 3), ("tiny", 8)])
def test_greedy_tokens_match_one_rank(model, world, ckpt_root):
    """Done criteria: 8 KV heads on 3 ranks, 4 KV heads on 8 ranks, same tokens as 1 rank."""
    path = "tiny" if model == "tiny" else str(checkpoint(ckpt_root, model))
    args = ["--model", path, "--prompt", "The sea is wide", "--max-tokens", "12"]
    one = generate(*args, "--simulate", "1")
    many = generate(*args, "--simulate", str(world), "--check-sync")
    assert many["tokens"] == one["tokens"] and len(one["tokens"]) == 12
    assert many["world"] == world


def test_seeded_sampling_is_the_same_on_every_rank_and_world():
    args = ["--model", "tiny", "--max-tokens", "16", "--temp", "0.9", "--top-p", "0.95", "--top-k", "50",
            "--min-p", "0.01", "--repetition-penalty", "1.1", "--seed", "7"]
    one = generate(*args, "--simulate", "1")
    two = generate(*args, "--simulate", "2", "--check-sync")
    assert two["tokens"] == one["tokens"]
    other_seed = generate(*args[:-1], "8", "--simulate", "1")
    assert other_seed["tokens"] != one["tokens"]


def test_stop_string_ends_generation():
    base = generate("--model", "tiny", "--max-tokens", "24", "--simulate", "1")
    text = base["text"]
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert stop and stop in text
    cut = generate("--model", "tiny", "--max-tokens", "24", "--simulate", "1", "--stop", stop)
    assert cut["finish_reason"] == "stop"
    assert cut["text"] == text[: text.index(stop)]


def test_streams_text_without_json():
    proc = subprocess.run([sys.executable, "-m", "mlx_kvshard", "generate", "--model", "tiny", "--simulate", "2",
                           "--max-tokens", "8"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ref = generate("--model", "tiny", "--max-tokens", "8", "--simulate", "1")
    assert proc.stdout.rstrip("\n") == ref["text"]


def test_plan_tiny_table():
    proc = subprocess.run([sys.executable, "-m", "mlx_kvshard", "plan", "--model", "tiny", "--world", "3"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "KV heads" in proc.stdout and "uneven split [2, 1, 1]" in proc.stdout


def test_generation_config_eos_ids_end_generation(tmp_path):
    """Instruct models end turns with ids listed in generation_config.json (Llama 3's
    <|eot_id|>), not only the tokenizer's eos_token."""
    import shutil

    from mlx_kvshard.models.tiny import tiny_model_dir

    base = generate("--model", "tiny", "--max-tokens", "12", "--simulate", "1")["tokens"]
    model = tmp_path / "tiny-eot"
    shutil.copytree(tiny_model_dir(), model)
    k = base.index(base[6])
    (model / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, base[6]]}))
    out = generate("--model", str(model), "--max-tokens", "12", "--simulate", "1")
    assert out["finish_reason"] == "stop"
    assert out["tokens"] == base[: k + 1]
