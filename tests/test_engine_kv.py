"""Quantized KV in the serving engine (real ranks, float32): with --kv-bits 8, every greedy
request of a staggered batch (rows joining a running batch, a prompt longer than
--prefill-step, a prefix-cache hit) gets the tokens one-prompt `generate --kv-bits 8` gives
it alone at the same world; every rank's batch KV is the plan's quantized bytes per
position. Late quantization (--kv-quant-start) likewise at world 2, rows crossing the start
at different steps; with sequence-sharded KV it is refused on every rank at start."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from checkpoints import checkpoint
from liveness_procs import env_for, reap
from mlx_kvshard.config import ModelConfig
from mlx_kvshard.plan import ShardPlan

REPO = Path(__file__).resolve().parent.parent
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho".split()
SHARED = " ".join(WORDS)  # long enough for the prefix cache (>= 16 tokens)
KV = ["--kv-bits", "8", "--kv-group-size", "32"]  # kvq: head_dim 64
COMMON = ["--no-chat-template", "--prefill-step", "16", "--max-context", "256", "--peer-timeout", "10"]

REQUESTS = [
    {"prompt": "alpha beta gamma", "max_tokens": 16, "arrival_s": 0.0},
    {"prompt": " ".join(WORDS[3:] + WORDS[:5]), "max_tokens": 12, "arrival_s": 0.0},  # several prefill chunks
    {"prompt": SHARED + " first", "max_tokens": 5, "arrival_s": 0.0},
    {"prompt": "kappa lambda mu nu", "max_tokens": 7, "arrival_s": 0.3},  # joins the running batch
    {"prompt": SHARED + " second question", "max_tokens": 5, "arrival_s": 2.5},  # a prefix-cache hit
]


def run(tag: str, argv: list[str], world: int) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "mlx_kvshard", "generate", *argv] + (["--simulate", str(world)] if world > 1 else [])
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=600, env=env_for(tag), cwd=REPO,
                              start_new_session=True)
    finally:
        reap(tag, None)


@pytest.fixture(scope="module")
def model(ckpt_root):
    return checkpoint(ckpt_root, "kvq")  # 4 KV heads: world 3 splits them 2,1,1


def one_prompt(model: Path, req: dict, world: int, kv: list[str] = KV) -> list[int]:
    proc = run(f"ekv-one-{world}", ["--model", str(model), "--prompt", req["prompt"], "--max-tokens",
                                    str(req["max_tokens"]), "--json", *COMMON, *kv], world)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)["tokens"]


@pytest.mark.parametrize("world", [1, 3])
def test_quantized_kv_batch_equals_one_prompt_generate(world, model, tmp_path):
    f, report = tmp_path / "requests.jsonl", tmp_path / "report.json"
    f.write_text("".join(json.dumps(r) + "\n" for r in REQUESTS))
    proc = run(f"ekv-batch-{world}", ["--model", str(model), "--prompts-file", str(f), "--check-sync",
                                      "--engine-report", str(report), *COMMON, *KV], world)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-4000:]
    results = {r["index"]: r for r in map(json.loads, proc.stdout.splitlines())}
    for i, req in enumerate(REQUESTS):
        assert "error" not in results[i], results[i]
        assert results[i]["tokens"] == one_prompt(model, req, world), f"request {i} at world {world}"
    # the hit reused the first's quantized KV, prefilled only the rest, and still equals the cold run
    cached = results[4]["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert len(SHARED.split()) <= cached < results[4]["usage"]["prompt_tokens"], results[4]
    rep = json.loads(report.read_text())
    steps = rep["metrics"]["recent_steps"]
    assert max(s["batch"] for s in steps) >= 2  # rows really decoded together
    assert any(s["batch"] and s["prefill_tokens"] for s in steps)  # prompts prefilled beside a running batch
    check_kv_bytes(rep, model, world)


LATE = ["--kv-bits", "4", "--kv-group-size", "32", "--kv-quant-start", "20"]  # 4-bit: a row in the wrong form shows


def test_late_quantization_batch_equals_one_prompt_generate(model, tmp_path):
    """--kv-quant-start 20 at world 2: the rows cross 20 tokens at different steps (two long
    prompts in prefill, two short ones while decoding beside quantized rows, one of them after
    joining late), the prefix hit starts from blocks of a quantized row; each row gets the
    tokens one-prompt `generate` with the same setting gives it (wherever the engine's chunks
    fall: see kvlate.generate_quantizes_at)."""
    f = tmp_path / "requests.jsonl"
    requests = [REQUESTS[0], *REQUESTS[2:]]  # prompts of 13, 74, 16 (joins late) and 77 (the hit) tokens
    f.write_text("".join(json.dumps(r) + "\n" for r in requests))
    proc = run("ekv-late", ["--model", str(model), "--prompts-file", str(f), "--check-sync", *COMMON, *LATE], 2)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-4000:]
    results = {r["index"]: r for r in map(json.loads, proc.stdout.splitlines())}
    assert results[3]["usage"]["prompt_tokens_details"]["cached_tokens"] >= len(SHARED.split())
    for i, req in enumerate(requests):
        assert "error" not in results[i], results[i]
        assert results[i]["tokens"] == one_prompt(model, req, 2, LATE), f"request {i}"


def check_kv_bytes(rep: dict, model: Path, world: int) -> None:
    """Measured on every rank: the batch KV buffer is rows x allocated positions x the plan's
    bytes per position, which at 8 bits is per layer and local KV head 2 x (head_dim packed
    bytes + a float32 scale and bias per group of 32); all of it freed at the end."""
    cfg = ModelConfig.from_file(model)
    plan = ShardPlan.build(cfg, world, compute_dtype="float32")
    per_token = [r["kv_bytes_per_token"] for r in rep["info"]["ranks"]]
    per_vector = cfg.head_dim + 2 * (cfg.head_dim // 32) * 4
    assert per_token == [cfg.num_hidden_layers * s.local_kv_heads * 2 * per_vector for s in plan.shards]
    audits = rep["audits"]
    assert audits and all(len(a["reports"]) == world for a in audits)
    held = [r for a in audits for r in a["reports"] if r["rows"]]
    assert held
    for r in held:
        assert r["batch_kv_bytes"] == r["allocated_tokens"] * per_token[r["rank"]], r
    assert all(r["rows"] == [] and r["kv_bytes"] == 0 for r in audits[-1]["reports"])


@pytest.mark.parametrize("flags, world, message", [
    ([*KV, "--kv-quant-start", "4", "--kv-shard", "sequence"], 3,
     "--kv-quant-start 4 with sequence-sharded KV (--kv-shard sequence) is not implemented in the serving engine"),
])
def test_engine_refuses_late_quantization_of_sequence_kv(flags, world, message, ckpt_root, tmp_path):
    """seq_kv2 at world 3: more ranks than its 2 KV heads, so sequence mode really splits one.
    Every rank refuses at start with the same line; exit 2, nothing runs."""
    f = tmp_path / "requests.jsonl"
    f.write_text(json.dumps({"prompt": "alpha beta", "max_tokens": 2}) + "\n")
    model = checkpoint(ckpt_root, "seq_kv2")
    proc = run("ekv-refuse", ["--model", str(model), "--prompts-file", str(f), *COMMON, *flags], world)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert message in proc.stderr and "use one-prompt generate" in proc.stderr, proc.stderr[-3000:]
    assert proc.stdout == ""


@pytest.mark.parametrize("command", [["serve"], ["generate", "--prompts-file"]])
def test_kv_group_size_checked_against_head_dim_before_ranks_start(command, ckpt_root, tmp_path):
    """serve and --prompts-file take the --kv-* flags; a group size that does not divide
    head_dim (32 here) fails before any rank starts."""
    model = checkpoint(ckpt_root, "seq_kv2")
    if command[-1] == "--prompts-file":
        (tmp_path / "r.jsonl").write_text(json.dumps({"prompt": "alpha"}) + "\n")
        command = [*command, str(tmp_path / "r.jsonl")]
    proc = subprocess.run([sys.executable, "-m", "mlx_kvshard", *command, "--model", str(model), "--kv-bits", "8",
                           "--kv-group-size", "64", "--simulate", "2"], capture_output=True, text=True, timeout=120,
                          env=env_for("ekv-usage"), cwd=REPO)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "head_dim 32 is not a multiple of --kv-group-size 64" in proc.stderr and "[rank" not in proc.stderr
