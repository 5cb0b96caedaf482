"""The serving engine on pipeline stages (`generate --prompts-file --pp 3`, `serve --pp 2`),
real ranks (float32, greedy) against the mlx-lm oracle: concurrent requests of mixed
lengths (one over --prefill-step), a prefix-cache hit, micro-batched decode steps beside
steps that run the stages in turn, and each stage holding only its layers' KV (admission
by the smallest stage's capacity)."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.tokenizer_utils import load as load_tokenizer

from checkpoints import checkpoint
from mlx_kvshard.config import ModelConfig
from mlx_kvshard.models.architectures import load_oracle
from mlx_kvshard.pipeline.stages import StagePlan
from test_engine import PREFILL_STEP, SHARED, prompt, run_engine

# 4 requests of mixed lengths (one spans several --prefill-step chunks), then a prefix hit
MIXED = [(prompt(3), 7), (prompt(12, 2), 5), (prompt(30, 5), 6), (SHARED + " first", 4)]
HIT = (SHARED + " second question", 4)
BURST = [(prompt(2, 3), 12), (prompt(1, 8), 12), (prompt(2, 11), 11)]


class Oracle:
    """mlx-lm's unsharded model, greedy: each prompt's tokens and their log-probabilities."""

    def __init__(self, model_dir):
        self.model = load_oracle(model_dir, mx.float32)
        self.tokenizer = load_tokenizer(model_dir)

    def __call__(self, text: str, n: int) -> tuple[list[int], list[float]]:
        ids = self.tokenizer.encode(text)
        out = list(generate_step(mx.array(ids), self.model, max_tokens=n, sampler=lambda lp: mx.argmax(lp, axis=-1)))
        return [int(t) for t, _ in out], [lp[int(t)].item() for t, lp in out]


@pytest.fixture(scope="module")
def pp7(ckpt_root):
    return checkpoint(ckpt_root, "pp7")  # 7 layers: 3 stages hold 3, 2, 2


def test_prompts_file_on_three_uneven_stages_equals_the_oracle(pp7, tmp_path):
    lines = [json.dumps({"prompt": p, "max_tokens": n}) for p, n in MIXED]
    # later, usually after the fourth's prefill (a hit then; the serve test below makes sure of one)
    lines.append(json.dumps({"prompt": HIT[0], "max_tokens": HIT[1], "arrival_s": 2.5}))
    # with it, a burst of short prompts: prefilled in a step or two, they decode together with
    # nothing else prefilling (micro-batched steps); the rest prefill one by one (stages in turn)
    lines += [json.dumps({"prompt": p, "max_tokens": n, "arrival_s": 2.5}) for p, n in BURST]
    results, report, _ = run_engine(tmp_path, lines, 3, "--pp", "3", "--check-sync", name="pp3", model=pp7)
    oracle = Oracle(pp7)
    assert len(oracle.tokenizer.encode(MIXED[2][0])) > 3 * PREFILL_STEP
    for i, (text, n) in enumerate(MIXED + [HIT] + BURST):
        assert results[i]["tokens"] == oracle(text, n)[0], f"request {i}: {results[i]}"

    # Each stage holds only its layers' KV; the engine admits by the smallest stage's capacity.
    stages = StagePlan.build(ModelConfig.from_file(pp7), 3, compute_dtype="float32")
    ranks = report["info"]["ranks"]
    assert [r["kv_bytes_per_token"] for r in ranks] == [stages.kv_bytes_per_token(s) for s in range(3)]
    assert report["info"]["kv_capacity_tokens"] == min(r["kv_tokens"] for r in ranks)
    assert report["info"]["pp"]["micro_steps"] > 0  # some steps ran the rows as 3 micro-batches in flight
    held = [a["reports"] for a in report["audits"] if any(r["kv_bytes"] for r in a["reports"])]
    assert held  # --check-sync: every rank reported the same rows after each join and removal
    for reports in held:
        per_layer = {r["kv_bytes"] * 1.0 / stages.n_layers(r["rank"]) for r in reports}
        assert len(per_layer) == 1, reports


def test_quantized_kv_on_stages_equals_one_rank(pp7, tmp_path):
    """--kv-bits 8 is not the float32 oracle: the engine on one rank is. Layers follow the
    shares (2, 5). (Replaces the one-prompt case generate --pp 2 --kv-bits 8 once had in
    test_pipeline.py; --pp 3 --kv-bits 4 there still covers one-prompt quantized stages.)"""
    lines = [json.dumps({"prompt": p, "max_tokens": n}) for p, n in MIXED[1:3]]
    kv = ["--kv-bits", "8", "--kv-group-size", "32"]
    staged, report, _ = run_engine(tmp_path, lines, 2, "--pp", "2", "--shares", "1,3", *kv, name="ppkv", model=pp7)
    alone, _, _ = run_engine(tmp_path, lines, 1, *kv, name="kv1", model=pp7)
    assert [staged[i]["tokens"] for i in range(2)] == [alone[i]["tokens"] for i in range(2)]
    from mlx_kvshard.settings import KVSettings

    stages = StagePlan.build(ModelConfig.from_file(pp7), 2, [1, 3], compute_dtype="float32",
                             kv=KVSettings(bits=8, group_size=32))
    assert stages.layers == ((0, 2), (2, 7))
    assert [r["kv_bytes_per_token"] for r in report["info"]["ranks"]] == [stages.kv_bytes_per_token(s) for s in range(2)]


def test_serve_on_two_stages_answers_concurrent_requests_as_the_oracle(pp7, tmp_path):
    import openai

    from liveness_procs import tagged
    from server_procs import Server

    server = Server(tmp_path, ["serve", "--simulate", "2", "--pp", "2", "--model", str(pp7), "--port", "0",
                               "--served-model-name", "m", "--max-context", "256", "--prefill-step", str(PREFILL_STEP),
                               "--peer-timeout", "10",
                               "--check-sync"], f"pp-serve-{os.getpid()}")
    try:
        server.wait_ready()
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=300)
        oracle = Oracle(pp7)

        def ask(case):
            text, n = case
            r = c.completions.create(model="m", prompt=text, max_tokens=n, temperature=0, logprobs=0)
            return r

        # the four at once (they batch and prefill together), then the prefix hit on the fourth's prompt
        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(ask, MIXED))
        got.append(ask(HIT))
        with ThreadPoolExecutor(3) as pool:  # short prompts decoding together: micro-batched steps
            got += list(pool.map(ask, BURST))
        for i, (case, r) in enumerate(zip(MIXED + [HIT] + BURST, got)):
            want, want_lps = oracle(*case)
            lp = r.choices[0].logprobs
            assert lp.tokens == [oracle.tokenizer.decode([t]) for t in want], f"request {i}"
            assert lp.token_logprobs == pytest.approx(want_lps, abs=1e-3), f"request {i}"
        assert got[4].usage.prompt_tokens_details.cached_tokens > 0
        server.stop()
        assert "all 2 rank(s) stopped in order" in server.stderr(), server.stderr()[-3000:]
    finally:
        server.stop()
    assert not tagged(server.tag), "rank processes left behind"
