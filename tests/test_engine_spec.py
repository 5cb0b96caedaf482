"""Speculative decoding (prompt lookup) in the serving engine, on real ranks (float32): a
request alone in the batch verifies proposals and gives exactly the plain engine's tokens
(greedy = the mlx-lm oracle; seeded sampling with a repetition penalty; max_tokens and a
stop string inside an accepted run), with fewer decode collectives per generated token;
a batch of several falls back to plain decode and gives the same tokens."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.tokenizer_utils import load as load_tokenizer

import test_engine as engine_runs  # its run_engine: `generate --prompts-file` on real ranks
from checkpoints import checkpoint
from mlx_kvshard.models.architectures import load_oracle

REPO = Path(__file__).resolve().parent.parent
REPEATING = "the cat the cat the cat the cat the cat the cat the cat the cat"  # llama_kv8 repeats it
SPEC = ["--prompt-lookup", "3", "--num-draft", "4"]
REQUESTS = [
    {"prompt": REPEATING, "max_tokens": 28},  # the longest, so it ends the batch run alone
    {"prompt": REPEATING, "max_tokens": 16, "temperature": 0.7, "top_k": 40, "seed": 5, "repetition_penalty": 1.2},
    {"prompt": REPEATING, "max_tokens": 7},  # the last verify step is cut to end at max_tokens
    {"prompt": "alpha beta gamma alpha beta", "max_tokens": 8},  # little to look up
]


def run_engine(tmp: Path, world: int, *flags: str, lines: list[dict] = REQUESTS,
               model: Path | None = None) -> tuple[dict, dict]:
    """test_engine's `generate --prompts-file` on real ranks: ({index: result}, engine report)."""
    name = "-".join(f.lstrip("-") for f in flags) or "plain"
    results, report, _ = engine_runs.run_engine(tmp, [json.dumps(r) for r in lines], world, "--dtype", "float32",
                                                "--prefix-cache-bytes", "0", "--check-sync", *flags,
                                                name=f"spec-{name}", model=model or MODEL)
    return results, report


def per_token(report: dict, key: str | None) -> float:
    """Decode steps (key None) or their collectives per generated token."""
    m = report["metrics"]
    decode = sum(s[key] if key else 1 for s in m["recent_steps"] if s["batch"])
    return decode / m["totals"]["generated_tokens"]


MODEL: Path


@pytest.fixture(scope="module")
def oracle(ckpt_root) -> list[int]:
    global MODEL
    MODEL = checkpoint(ckpt_root, "llama_kv8")
    ids = load_tokenizer(MODEL).encode(REPEATING)
    out = generate_step(mx.array(ids), load_oracle(MODEL, mx.float32), max_tokens=REQUESTS[0]["max_tokens"],
                        sampler=lambda lp: mx.argmax(lp, axis=-1))
    return [int(t) for t, _ in out]


@pytest.mark.parametrize("world", [1, 2])
def test_engine_prompt_lookup_keeps_the_plain_tokens(world, oracle, tmp_path):
    # --max-batch 1: every request runs alone, so every decode step may verify proposals
    plain, plain_report = run_engine(tmp_path, world, "--max-batch", "1")
    spec, spec_report = run_engine(tmp_path, world, "--max-batch", "1", *SPEC)
    assert plain[0]["tokens"] == oracle
    for i in range(len(REQUESTS)):
        assert spec[i]["tokens"] == plain[i]["tokens"], i
        assert spec[i]["text"] == plain[i]["text"] and spec[i]["finish_reason"] == plain[i]["finish_reason"], i
        assert len(spec[i]["tokens"]) <= REQUESTS[i]["max_tokens"]
    t = spec_report["metrics"]["totals"]
    assert t["drafted"] > 0 and t["accepted"] > 0 and t["verify_steps"] > 0
    assert plain_report["metrics"]["totals"]["drafted"] == 0
    assert per_token(spec_report, None) < per_token(plain_report, None)  # fewer forwards
    if world > 1:  # decode collectives per generated token (2·L + 1 per step in plain decode)
        spec_cpt, plain_cpt = (r["metrics"]["collectives_per_generated_token"] for r in (spec_report, plain_report))
        assert spec_cpt < plain_cpt and plain_cpt == pytest.approx(per_token(plain_report, "collectives"))
    speculative = spec_report["metrics"]["speculative"]
    assert speculative["tokens_per_verify_step"] > 1 and 0 < speculative["acceptance_rate"] <= 1

    # a batch of several rows falls back to plain decode (no error), same tokens. Only the
    # repeating prompts: each line is submitted by its own feeder thread, so which request
    # arrives last depends on the machine's load; whichever is alone at the end must find a
    # match to look up. Request 0 has 12+ tokens more than the others, so it is left alone
    # at the end unless it arrives that many steps late.
    lines = REQUESTS[:3]
    batch, batch_report = run_engine(tmp_path, world, "--max-batch", "4", *SPEC, lines=lines)
    for i in range(len(lines)):
        assert batch[i]["tokens"] == plain[i]["tokens"], i
    steps = batch_report["metrics"]["recent_steps"]
    assert any(s["batch"] > 1 for s in steps) and not any(s["drafted"] for s in steps if s["batch"] > 1)
    # the request left alone once the others finish speculates again
    assert any(s["drafted"] for s in steps if s["batch"] == 1)


def test_engine_stop_string_inside_an_accepted_run(oracle, tmp_path):
    """A stop string reached inside a verify step's run ends the request there, as plain."""
    # llama_kv8 continues this prompt with "j\ufffdw", then "Th" (one token) over and over; its 5th "Th"
    # is an accepted draft, before the verify step's last position
    stop = "Th" * 5
    lines = [{"prompt": "one two three one two three one two three", "max_tokens": 20, "stop": stop}]
    plain, _ = run_engine(tmp_path, 1, "--max-batch", "1", lines=lines)
    spec, report = run_engine(tmp_path, 1, "--max-batch", "1", *SPEC, lines=lines)
    assert plain[0]["finish_reason"] == "stop" and stop not in plain[0]["text"]
    assert spec[0]["tokens"] == plain[0]["tokens"] and spec[0]["text"] == plain[0]["text"]
    assert spec[0]["finish_reason"] == "stop" and report["metrics"]["totals"]["accepted"] > 0
    last = [s for s in report["metrics"]["recent_steps"] if s["batch"]][-1]
    assert last["accepted"] == last["drafted"] > 0  # it ended on an accepted draft: the rest was not emitted


def test_engine_refuses_a_draft_model(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "x"}) + "\n")
    proc = subprocess.run([sys.executable, "-m", "mlx_kvshard", "generate", "--model", "tiny", "--prompts-file",
                           str(f), "--draft-model", "tiny"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 2 and "--draft-model" in proc.stderr and "not implemented" in proc.stderr


def test_serve_with_prompt_lookup_equals_generate_and_counts_drafts(oracle, tmp_path_factory):
    """`serve --prompt-lookup` at world 2, through real HTTP: a lone greedy completion is
    one-prompt generate's text, and /metrics counts the drafted and accepted tokens."""
    import test_server as http

    proc = subprocess.run([sys.executable, "-m", "mlx_kvshard", "generate", "--model", str(MODEL), "--prompt",
                           REPEATING, "--max-tokens", str(len(oracle)), "--no-chat-template", "--json"],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = json.loads(proc.stdout.strip().splitlines()[-1])
    assert ref["tokens"] == oracle
    with http.serve(MODEL, tmp_path_factory, "serve-spec", 2, *SPEC) as server:
        r = http.client(server).completions.create(model=http.NAME, prompt=REPEATING, max_tokens=len(oracle), temperature=0)
        assert r.choices[0].text == ref["text"] and r.usage.completion_tokens == len(oracle)
        m = http.metrics(server)
    assert http.one(m, "mlx_kvshard_speculative_accepted_tokens_total") > 0
    assert http.one(m, "mlx_kvshard_speculative_drafted_tokens_total") >= \
        http.one(m, "mlx_kvshard_speculative_accepted_tokens_total")



def test_engine_prompt_lookup_with_quantized_kv(oracle, ckpt_root, tmp_path):
    """--kv-bits 8: the batch cache (BatchQuantizedKVCache) trims like BatchKVCache; same tokens as plain."""
    kv = ["--max-batch", "1", "--kv-bits", "8", "--kv-group-size", "32"]
    kvq = checkpoint(ckpt_root, "kvq")  # head_dim 64
    plain, _ = run_engine(tmp_path, 1, *kv, lines=REQUESTS[:2], model=kvq)
    spec, report = run_engine(tmp_path, 1, *kv, *SPEC, lines=REQUESTS[:2], model=kvq)
    assert [spec[i]["tokens"] for i in range(2)] == [plain[i]["tokens"] for i in range(2)]
    assert report["metrics"]["totals"]["accepted"] > 0
