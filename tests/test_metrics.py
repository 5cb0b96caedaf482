"""`generate --json` metrics on real rank processes: the collectives and bytes counted
where they are issued equal 2·L all_sums of B·hidden·4 bytes per decode token (float32)
plus one 4-byte all_sum that hands every rank rank 0's token, at an even and an uneven
head split; with --vocab-parallel, 2·L all_sums plus the logits all_gather (no token
all_sum: the gathered logits are the same on every rank). KV cache and weight bytes
agree with the plan."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from ranks import mlx_launch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import benchlib  # noqa: E402  (the benchmarks' synthetic checkpoints: no early EOS)

MAX_TOKENS = 6


@pytest.fixture(scope="module")
def model_dir() -> Path:
    # hidden 256, 4 layers, 8 query / 4 KV heads, vocab 4096; greedy never emits EOS
    return benchlib.bench_model_dir("tiny")


def run_generate(world: int, model_dir: Path, *flags: str) -> tuple[dict, str]:
    argv = ["-m", "mlx_kvshard", "generate", "--model", str(model_dir), "--prompt", "Hello world, once upon a time",
            "--max-tokens", str(MAX_TOKENS), "--no-chat-template", "--dtype", "float32", "--json", "--stats", *flags]
    proc = mlx_launch(world, argv, timeout=120)
    return benchlib.last_json(proc.stdout), proc.stderr


@pytest.mark.parametrize("world,vocab_parallel", [(2, False), (3, False), (2, True)])
def test_counters_equal_formula(world, vocab_parallel, model_dir):
    cfg = json.loads((model_dir / "config.json").read_text())
    L, hidden = cfg["num_hidden_layers"], cfg["hidden_size"]
    head_dim = hidden // cfg["num_attention_heads"]
    r, stderr = run_generate(world, model_dir, *(["--vocab-parallel"] if vocab_parallel else []))

    assert r["world"] == world
    assert len(r["tokens"]) == MAX_TOKENS and r["finish_reason"] == "length"
    # per decode token: 2 all_sums per layer (after o_proj, after down_proj) of B·hidden·4 bytes,
    # then either rank 0's token (one int32) or this rank's padded vocab rows of the logits
    extra = -(-cfg["vocab_size"] // world) * 4 if vocab_parallel else 4
    assert r["comm"]["collectives_per_token"] == 2 * L + 1
    assert r["comm"]["bytes_per_token"] == 2 * L * 1 * hidden * 4 + extra
    assert f"per decode token: {2 * L + 1} collectives" in stderr

    ranks = r["ranks"]
    assert [k["rank"] for k in ranks] == list(range(world))
    assert sum(k["local_kv_heads"] for k in ranks) == cfg["num_key_value_heads"]  # 4 on 3 ranks: 2,1,1
    for k in ranks:
        assert k["plan_kv_bytes_per_token"] == 2 * L * k["local_kv_heads"] * head_dim * 4
        assert k["kv_bytes"] == k["kv_tokens_allocated"] * k["plan_kv_bytes_per_token"]
        # the prompt and every generated token but the last went through the cache
        assert k["kv_tokens"] == r["prompt_tokens"] + MAX_TOKENS - 1 <= k["kv_tokens_allocated"]
        assert k["weight_bytes"] == k["plan_weight_bytes"]
        assert k["peak_memory_bytes"] >= k["weight_bytes"] + k["kv_bytes"]
    t = r["timings"]
    for key in ("ttft_s", "prefill_tok_s", "decode_tok_s", "time_per_output_token_s"):
        assert t[key] is not None and t[key] > 0, (key, t)
