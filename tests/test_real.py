"""The `real` tier: SmolLM2-135M-Instruct (Q8_0 embedding, Q4_1 elsewhere) through
`--model FILE.gguf`, against mlx-lm on the same weights (`mlx-kvshard convert`, float32).
What random weights cannot show: the answer is right, the server answers it, prompt lookup
is accepted on real text, 8-bit KV keeps the tokens."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import mlx.core as mx
import pytest

pytestmark = pytest.mark.real

QUESTION = "What is the capital of France?"
N_TOKENS = 12
# An answer that copies from its prompt: prompt lookup's drafts come from the prompt itself.
COPY = ("Repeat this sentence exactly, word for word: The small robot walked slowly across the "
        "old wooden bridge to find the lost red ball.")


def generate(model, world: int, prompt: str, *flags: str, max_tokens: int = N_TOKENS) -> dict:
    proc = subprocess.run([sys.executable, "-m", "mlx_kvshard", "generate", "--simulate", str(world),
                           "--model", str(model), "--prompt", prompt, "--max-tokens", str(max_tokens),
                           "--json", *flags], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


_oracle: dict = {}


def mlx_lm_tokens(converted, prompt: str, n: int = N_TOKENS) -> list[int]:
    """mlx-lm's own greedy tokens on the converted weights (float32), chat template applied."""
    from mlx_lm.generate import generate_step
    from mlx_lm.utils import load

    key = (str(converted), prompt, n)
    if key not in _oracle:
        model, tok = load(str(converted))
        model.set_dtype(mx.float32)
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        out = []
        for t, _ in generate_step(mx.array(ids), model, max_tokens=n, sampler=lambda lp: mx.argmax(lp, axis=-1)):
            out.append(int(t))
            if int(t) in tok.eos_token_ids:
                break
        _oracle[key] = out
    return _oracle[key]


@pytest.fixture(scope="module")
def world1(smollm2):
    return generate(smollm2[0], 1, QUESTION)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_greedy_tokens_equal_mlx_lm_and_the_answer_is_paris(world, smollm2, world1):
    gguf, converted = smollm2
    got = world1 if world == 1 else generate(gguf, world, QUESTION)
    assert got["tokens"] == mlx_lm_tokens(converted, QUESTION), f"world {world}: {got['text']!r}"
    assert "Paris" in got["text"], got["text"]


def test_server_answers_through_the_openai_client(smollm2, tmp_path):
    import openai

    from server_procs import Server

    server = Server(tmp_path, ["serve", "--simulate", "2", "--model", str(smollm2[0]), "--port", "0",
                               "--served-model-name", "smollm2", "--max-context", "512"], f"real-{os.getpid()}")
    try:
        server.wait_ready()
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=600)
        r = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": QUESTION}],
                                           max_tokens=N_TOKENS, temperature=0)
        assert "Paris" in r.choices[0].message.content, r
    finally:
        server.stop()


def test_prompt_lookup_accepted_on_text_that_copies_its_prompt(smollm2):
    gguf = smollm2[0]
    plain = generate(gguf, 2, COPY, max_tokens=24)
    lookup = generate(gguf, 2, COPY, "--prompt-lookup", "3", "--num-draft", "4", max_tokens=24)
    assert lookup["tokens"] == plain["tokens"], (plain["text"], lookup["text"])
    spec = lookup["speculative"]
    assert spec["accepted"] > 0 and spec["acceptance_rate"] > 0.3, spec
    assert lookup["comm"]["collectives_per_generated_token"] < plain["comm"]["collectives_per_generated_token"], \
        (lookup["comm"], plain["comm"])


def test_8bit_kv_keeps_the_first_tokens(smollm2, world1):
    got = generate(smollm2[0], 1, QUESTION, "--kv-bits", "8")
    assert got["tokens"][:8] == world1["tokens"][:8], (got["text"], world1["text"])
