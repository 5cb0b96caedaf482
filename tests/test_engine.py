"""The serving engine with real ranks (float32): staggered requests of different lengths
and sampling at world 1 and 3 equal themselves alone and the mlx-lm oracle; cancel frees
KV on every rank; the prefix cache is exact; admission refuses what can never fit and
queues what fits later; bad requests are refused while the rest run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step

from checkpoints import checkpoint
from liveness_procs import env_for, reap
from mlx_kvshard.models.architectures import load_oracle

REPO = Path(__file__).resolve().parent.parent
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho".split()
SHARED = " ".join(WORDS)  # a long shared prefix (the prefix-cache pair)
PREFILL_STEP = 16


def prompt(n_words: int, start: int = 0) -> str:
    return " ".join(WORDS[(start + i) % len(WORDS)] for i in range(n_words))


# 8 requests: different lengths (one > --prefill-step), max tokens and sampling, staggered
REQUESTS = [
    {"prompt": prompt(3), "max_tokens": 9, "arrival_s": 0.0},
    {"prompt": prompt(12, 2), "max_tokens": 6, "arrival_s": 0.0},  # several prefill chunks
    {"prompt": prompt(7, 5), "max_tokens": 8, "temperature": 0.9, "top_k": 20, "seed": 11, "arrival_s": 0.02},
    {"prompt": prompt(12, 1), "max_tokens": 5, "temperature": 0.7, "top_p": 0.9, "seed": 5, "arrival_s": 0.04},
    {"prompt": prompt(5, 3), "max_tokens": 10, "repetition_penalty": 1.3, "arrival_s": 0.06},
    {"prompt": prompt(9, 4), "max_tokens": 7, "presence_penalty": 0.5, "frequency_penalty": 0.3,
     "temperature": 1.0, "min_p": 0.05, "seed": 2, "arrival_s": 0.08},
    {"prompt": SHARED + " first", "max_tokens": 4, "arrival_s": 0.0},
    {"prompt": SHARED + " second question", "max_tokens": 4, "arrival_s": 2.5},  # after the first's prefill
]
CANCEL = {"prompt": prompt(6, 7), "max_tokens": 40, "cancel_after_tokens": 3, "arrival_s": 0.03}
BAD = [
    "{not json",
    json.dumps({"prompt": "x", "temperature": -1}),
    json.dumps({"prompt": prompt(200), "max_tokens": 4}),  # past --max-context
    json.dumps({"prompt": "x", "colour": "red"}),
]
MAX_CONTEXT = 256


def run_engine(tmp: Path, lines: list[str], world: int, *flags: str, name: str = "run",
               model: Path | None = None) -> tuple[dict, dict, str]:
    """Run `generate --prompts-file` on `model` (default: this module's MODEL) and return
    ({index: result line}, engine report, stderr)."""
    f = tmp / f"{name}.jsonl"
    f.write_text("\n".join(lines) + "\n")
    report = tmp / f"{name}.report.json"
    argv = [sys.executable, "-m", "mlx_kvshard", "generate", "--model", str(model or MODEL), "--prompts-file", str(f),
            "--no-chat-template", "--prefill-step", str(PREFILL_STEP), "--max-context", str(MAX_CONTEXT),
            "--engine-report", str(report), "--peer-timeout", "10", *flags]
    if world > 1:
        argv += ["--simulate", str(world)]
    tag = f"engine-{name}-{world}"
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, env=env_for(tag), cwd=REPO,
                              start_new_session=True)
    finally:
        reap(tag, None)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-4000:]
    results = {}
    for ln in proc.stdout.splitlines():
        obj = json.loads(ln)
        results[obj["index"]] = obj
    return results, json.loads(report.read_text()), proc.stderr


MODEL: Path


@pytest.fixture(scope="module")
def model(ckpt_root):
    global MODEL
    MODEL = checkpoint(ckpt_root, "llama_kv8")  # 8 KV heads: 3 ranks split them 3,3,2
    return MODEL


@pytest.fixture(scope="module")
def alone(model, tmp_path_factory):
    """Each request alone (--max-batch 1) and cold (no prefix cache), world 1."""
    lines = [json.dumps({k: v for k, v in r.items() if k != "arrival_s"}) for r in REQUESTS]
    results, _, _ = run_engine(tmp_path_factory.mktemp("alone"), lines, 1, "--max-batch", "1",
                               "--prefix-cache-bytes", "0", name="alone")
    return results


def oracle_tokens(text: str, n: int) -> list[int]:
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    model = load_oracle(MODEL, mx.float32)
    ids = load_tokenizer(MODEL).encode(text)
    greedy = lambda lp: mx.argmax(lp, axis=-1)
    return [int(t) for t, _ in generate_step(mx.array(ids), model, max_tokens=n, sampler=greedy)]


def staggered_lines() -> list[str]:
    return [json.dumps(r) for r in REQUESTS] + [json.dumps(CANCEL)] + BAD


@pytest.mark.parametrize("world", [1, 3])
def test_staggered_requests_equal_themselves_alone(world, model, alone, tmp_path):
    results, report, stderr = run_engine(tmp_path, staggered_lines(), world, "--check-sync")
    for i, req in enumerate(REQUESTS):
        got = results[i]
        assert "error" not in got, got
        assert got["tokens"] == alone[i]["tokens"], f"request {i} at world {world}: {got} vs alone {alone[i]}"
        assert got["finish_reason"] == "length" and len(got["tokens"]) == req["max_tokens"]
        if "temperature" not in req and "repetition_penalty" not in req:
            assert got["tokens"] == oracle_tokens(req["prompt"], req["max_tokens"]), f"request {i}: oracle"
    # they really ran together: some decode step held several rows, and the long prompt took several chunks
    steps = report["metrics"]["recent_steps"]
    assert max(s["batch"] for s in steps) >= 3
    assert all(s["prefill_tokens"] <= PREFILL_STEP for s in steps)
    # the prefix cache: the second of the shared-prefix pair reused the first's KV and prefilled only the rest
    first, second = results[6]["usage"], results[7]["usage"]
    assert first["prompt_tokens_details"]["cached_tokens"] == 0
    cached = second["prompt_tokens_details"]["cached_tokens"]
    assert cached >= len(SHARED.split()) and cached < second["prompt_tokens"], second
    prompt_total = sum(r["usage"]["prompt_tokens"] for r in results.values() if "usage" in r and r["usage"])
    cached_total = sum(r["usage"]["prompt_tokens_details"]["cached_tokens"] for r in results.values()
                       if "usage" in r and r["usage"])
    assert sum(s["prefill_tokens"] for s in steps) == prompt_total - cached_total
    check_cancel(results, report, alone, world)
    check_bad_lines(results, stderr, first_bad=len(REQUESTS) + 1)
    if world > 1:
        per_step = [s for s in steps if s["batch"] and not s["prefill_tokens"] and not s["audit"]]
        assert per_step
        layers = json.loads((MODEL / "config.json").read_text())["num_hidden_layers"]
        assert all(s["collectives"] == 2 * layers + 1 for s in per_step)  # the whole batch: 2·L all_sums + the message


def check_cancel(results, report, alone, world):
    """The cancelled request stopped early; after its removal no rank holds it, and every
    rank's KV shrank; at the end every rank holds no KV at all."""
    i = len(REQUESTS)
    got = results[i]
    assert got["finish_reason"] == "cancelled" and 3 <= len(got["tokens"]) < CANCEL["max_tokens"], got
    audits = report["audits"]
    assert audits, "--check-sync made no audits"
    for a in audits:
        assert len(a["reports"]) == world
    uid = next(r["request_id"] for r in report["metrics"]["recent_requests"] if r["outcome"] == "cancelled")
    held = [k for k, a in enumerate(audits) if all(uid in r["rows"] for r in a["reports"])]
    assert held, "the cancelled request never joined the batch"
    after = audits[held[-1] + 1]["reports"]  # the audit of its removal step
    assert all(uid not in r["rows"] and str(uid) not in r["pending"] for r in after), after
    # measured on every rank: its batch KV buffer holds exactly the remaining rows (its own heads only)
    per_token = [r["kv_bytes_per_token"] for r in report["info"]["ranks"]]
    for r in after:
        assert r["batch_kv_bytes"] == r["allocated_tokens"] * per_token[r["rank"]], r
    final = audits[-1]["reports"]
    assert all(r["rows"] == [] and r["kv_bytes"] == 0 and r["pending"] == {} for r in final), final
    # rows of different lengths ran in length groups (kv/layout.py); --check-sync compared them on every rank
    assert max(r["groups"] for a in audits for r in a["reports"]) >= 2


def check_bad_lines(results, stderr, first_bad):
    errors = {i: results[i]["error"] for i in range(first_bad, first_bad + len(BAD))}
    assert errors[first_bad].startswith(f"line {first_bad + 1}:")
    assert "temperature -1" in errors[first_bad + 1]
    assert "max context is 256" in errors[first_bad + 2]
    assert "unknown field 'colour'" in errors[first_bad + 3]
    for i, e in errors.items():
        assert f"mlx-kvshard: {e}" in stderr


def test_admission_refuses_never_fitting_and_queues_later_fitting(model, tmp_path):
    lines = [json.dumps({"prompt": prompt(8), "max_tokens": 60}),  # 90+ tokens: never fits in 80
             json.dumps({"prompt": prompt(3), "max_tokens": 30}),  # fits, but not beside the next
             json.dumps({"prompt": prompt(3, 3), "max_tokens": 30, "arrival_s": 0.1})]
    results, report, _ = run_engine(tmp_path, lines, 1, "--max-kv-tokens", "80")
    assert "a rank holds at most 80" in results[0]["error"] and "60 new tokens" in results[0]["error"]
    for i in (1, 2):
        assert results[i]["finish_reason"] == "length" and len(results[i]["tokens"]) == 30
    assert max(s["batch"] for s in report["metrics"]["recent_steps"]) == 1  # the second waited for the first
    ttft = {r["request_id"]: r["ttft_s"] for r in report["metrics"]["recent_requests"]}
    assert len(ttft) == 2


def test_vocab_parallel_every_rank_joins_the_logits_gather(model, alone, tmp_path):
    """With lm_head split by vocabulary rows every rank runs the logits gather of each
    sampling forward (rank 0 still samples alone)."""
    lines = [json.dumps(r) for r in REQUESTS[:4]]
    results, report, _ = run_engine(tmp_path, lines, 2, "--vocab-parallel", "--check-sync", name="vp")
    for i in range(4):
        assert results[i]["tokens"] == alone[i]["tokens"], (i, results[i], alone[i])
    layers = json.loads((MODEL / "config.json").read_text())["num_hidden_layers"]
    decode_only = [s for s in report["metrics"]["recent_steps"] if s["batch"] and not s["prefill_tokens"]
                   and not s["audit"]]
    assert decode_only and all(s["collectives"] == 2 * layers + 2 for s in decode_only)  # + the gather


def test_more_ranks_than_kv_heads(ckpt_root, tmp_path):
    """World 3 on 2 KV heads (--kv-shard replicate, the engine's mode): a KV head's cache is
    replicated on the ranks that share it, each computing its share of the group's query
    heads. Batched and continuous as at any world: greedy requests equal the mlx-lm oracle."""
    model = checkpoint(ckpt_root, "seq_kv2")
    requests = [{"prompt": prompt(n, k), "max_tokens": 12} for n, k in ((3, 0), (12, 2), (5, 3), (9, 4))]
    results, report, _ = run_engine(tmp_path, [json.dumps(r) for r in requests], 3, "--check-sync",
                                    name="kv2", model=model)
    oracle = load_oracle(model, mx.float32)
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    tok = load_tokenizer(model)
    for i, r in enumerate(requests):
        ids = tok.encode(r["prompt"])
        want = [int(t) for t, _ in generate_step(mx.array(ids), oracle, max_tokens=r["max_tokens"],
                                                 sampler=lambda lp: mx.argmax(lp, axis=-1))]
        assert results[i]["tokens"] == want, (i, results[i], want)
    assert report["info"]["world"] == 3
    assert max(s["batch"] for s in report["metrics"]["recent_steps"]) >= 2  # they ran together


def test_link_emulation_is_paid_in_the_engine(model, alone, tmp_path):
    """--link makes the serving engine pay each step's collectives at the link's cost on
    every rank, as one-prompt generate does: a decode step pays at least its 2·L all_sums."""
    from mlx_kvshard.hardware.links import allreduce_seconds
    from mlx_kvshard.hardware.profiles import load_link

    lines = [json.dumps(r) for r in REQUESTS[:2]]
    results, report, _ = run_engine(tmp_path, lines, 2, "--link", "tb4-ring", name="link")
    for i in range(2):
        assert results[i]["tokens"] == alone[i]["tokens"], (i, results[i], alone[i])
    cfg = json.loads((MODEL / "config.json").read_text())
    link = load_link("tb4-ring")
    decode_only = [s for s in report["metrics"]["recent_steps"] if s["batch"] and not s["prefill_tokens"]]
    assert decode_only
    for s in decode_only:
        layers_cost = 2 * cfg["num_hidden_layers"] * allreduce_seconds(link, 2, s["batch"] * cfg["hidden_size"] * 4)
        assert s["link_s"] >= layers_cost, s
    assert report["metrics"]["totals"]["link_s"] >= sum(s["link_s"] for s in decode_only) > 0
