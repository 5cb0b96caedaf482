"""Speculative decoding keeps the target's tokens exactly, on real ranks (float32):
--prompt-lookup and --draft-model, greedy (= the mlx-lm oracle) and seeded sampling
(= the same run without speculation), at world 1, 2 and 3; fewer collectives per generated
token than plain decode's 2·L on a prompt the model repeats; a draft with another
tokenizer is refused; a run killed mid-generation resumes exactly."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.tokenizer_utils import load as load_tokenizer

from checkpoints import checkpoint
from mlx_kvshard.cli import main
from mlx_kvshard.engine.speculative import lookup
from mlx_kvshard.models.architectures import load_oracle
from ranks import mlx_launch

REPEATING = "the cat the cat the cat the cat the cat the cat the cat the cat"
MAX_TOKENS = 24
SAMPLED = ["--temp", "0.7", "--top-k", "40", "--seed", "5", "--repetition-penalty", "1.2"]
TARGET, DRAFT = "llama_kv8", "llama_g2"  # 8 KV heads (3 ranks: 3,3,2); a smaller model, same tokenizer
LAYERS = 2


def test_lookup_proposes_the_continuation_of_the_longest_match():
    assert lookup([1, 2, 3, 9, 2, 3, 7, 1, 2, 3], 3, 2) == [9, 2]  # "1 2 3" beats the later "2 3"
    assert lookup([5, 6, 7, 5, 6], 2, 4) == [7, 5, 6]  # the continuation runs to the end
    assert lookup([4, 4, 4, 4, 4], 2, 2) == [4, 4]  # a run: a match followed by all m tokens
    assert lookup([1, 2, 3, 4], 3, 3) == []  # no earlier occurrence: nothing proposed


def oracle(model_dir, prompt: str) -> list[int]:
    ids = load_tokenizer(model_dir).encode(prompt)
    out = generate_step(mx.array(ids), load_oracle(model_dir, mx.float32), max_tokens=MAX_TOKENS,
                        sampler=lambda lp: mx.argmax(lp, axis=-1))
    return [int(t) for t, _ in out]


def run(world: int, model_dir, *flags: str, prompt: str = REPEATING) -> dict:
    argv = ["-m", "mlx_kvshard", "generate", "--model", str(model_dir), "--prompt", prompt, "--no-chat-template",
            "--max-tokens", str(MAX_TOKENS), "--dtype", "float32", "--json", "--check-sync", *flags]
    return json.loads(mlx_launch(world, argv, timeout=600).stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def models(ckpt_root):
    target, draft = checkpoint(ckpt_root, TARGET), checkpoint(ckpt_root, DRAFT)
    return {"target": target, "draft": draft, "oracle": oracle(target, REPEATING)}


@pytest.mark.parametrize("world", [1, 3])  # 3: uneven heads (3,3,2); world 2 added nothing but ~35 s
def test_speculative_tokens_are_the_plain_tokens(world, models):
    target = models["target"]
    plain_sampled = run(world, target, *SAMPLED)
    cases = {
        "lookup greedy": (["--prompt-lookup", "3", "--num-draft", "4"], models["oracle"]),
        "lookup sampled": (["--prompt-lookup", "2", *SAMPLED], plain_sampled["tokens"]),
        "draft greedy": (["--draft-model", str(models["draft"])], models["oracle"]),
        "draft=target sampled": (["--draft-model", str(target), "--num-draft", "4", *SAMPLED],
                                 plain_sampled["tokens"]),
    }
    for name, (flags, want) in cases.items():
        got = run(world, target, *flags)
        # greedy: mlx-lm's generate_step runs past EOS, the CLI stops there
        assert got["tokens"] == want[:len(got["tokens"])], (name, world, got["tokens"], want)
        assert len(got["tokens"]) == len(want) or got["finish_reason"] == "stop"
        spec = got["speculative"]
        assert spec["drafted"] > 0 and spec["accepted"] <= spec["drafted"], (name, spec)
        per_token = got["comm"]["collectives_per_generated_token"]
        print(f"\n[spec] world {world} {name}: {spec}, {per_token:.2f} collectives per generated token")
        if name in ("lookup greedy", "draft=target sampled"):  # proposals the target does make
            assert spec["accepted"] > 0 and spec["tokens_per_step"] > 1.5, (name, spec)
            if world > 1:  # plain decode: 2·L all_sums + 1 token agreement per token
                assert per_token < 2 * LAYERS, (name, per_token)
        if name == "draft=target sampled":  # same model, same keys: every proposal is the target's token
            assert spec["acceptance_rate"] == 1.0
    if world > 1:
        assert plain_sampled["comm"]["collectives_per_generated_token"] == 2 * LAYERS + 1


def other_tokenizer_model(root: Path, draft: Path) -> Path:
    from mlx_kvshard.models.synth import write_tokenizer

    other = root / "draft-other-tokenizer"
    if not other.exists():
        shutil.copytree(draft, other)
        write_tokenizer(other, vocab_size=400)  # another BPE vocabulary, same weights
    return other


@pytest.mark.parametrize("simulate", [["--simulate", "2"], []])  # checked up front, and on the rank itself
def test_draft_with_another_tokenizer_is_refused(simulate, models, tmp_path_factory, capsys):
    other = other_tokenizer_model(tmp_path_factory.mktemp("tok"), models["draft"])
    code = main(["generate", *simulate, "--model", str(models["target"]), "--prompt", "hi", "--max-tokens", "2",
                 "--draft-model", str(other)])
    err = capsys.readouterr().err
    assert code == 2 and "--draft-model" in err and "tokenizer differs from the target model's" in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize("flags, message", [
    (["--num-draft", "0", "--prompt-lookup", "2"], "--num-draft 0: must be at least 1"),
    (["--prompt-lookup", "2", "--draft-model", "tiny"], "choose one proposer"),
])
def test_bad_speculative_flags(flags, message, capsys):
    code = main(["generate", "--simulate", "2", *flags])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err


def test_killed_speculative_run_resumes_exactly(tmp_path):
    """Kill a rank of a 2-rank --prompt-lookup sampled run once a checkpoint holds tokens;
    resume it (speculating again): the tokens equal an uninterrupted plain run's."""
    from liveness_procs import checkpoint_tokens, env_for, rank_pids, reap, start, wait_for

    tag, ck = f"spec-{os.getpid()}", tmp_path / "gen.json"
    common = ["--peer-timeout", "5", "--prompt", REPEATING, "--no-chat-template", *SAMPLED]
    proc = start(["-m", "mlx_kvshard", "generate", "--simulate", "2", "--max-tokens", "3000", "--checkpoint-every",
                  "4", "--checkpoint", str(ck), "--prompt-lookup", "2", "--link", "10gbe", *common],
                 tag, tmp_path / "out", tmp_path / "err")
    try:
        pids = rank_pids(tag, 2)
        wait_for(lambda: checkpoint_tokens(ck) >= 8, proc, 300, "a checkpoint of 8 tokens")
        os.kill(pids[1], signal.SIGKILL)
        assert proc.wait(timeout=120) != 0
    finally:
        reap(tag, proc)
    saved = checkpoint_tokens(ck)
    total = saved + 10

    def generate(*args: str) -> dict:
        out = subprocess.run([sys.executable, "-m", "mlx_kvshard", "generate", "--simulate", "2", "--json", *args],
                             capture_output=True, text=True, timeout=600, env=env_for(tag),
                             cwd=Path(__file__).resolve().parent.parent)
        reap(tag, None)
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    resumed = generate("--resume", str(ck), "--max-tokens", str(total), "--prompt-lookup", "2")
    plain = generate("--max-tokens", str(total), "--checkpoint-every", "0", *common)
    assert resumed["resumed_tokens"] == saved and resumed["tokens"] == plain["tokens"]
    print(f"\n[spec resume] killed after {saved} saved tokens; {total} tokens identical")


@pytest.mark.parametrize("flags", [
    ("--kv-bits", "8", "--kv-group-size", "32"),  # quantized KV: trimmed through mlx-lm's QuantizedKVCache
    ("--kv-shard", "sequence"),  # world 3 on 2 KV heads: each sharer trims the rejected positions it holds
], ids=["kv8", "kv-sequence"])
def test_speculative_trims_every_kv_layout(flags, ckpt_root):
    """Rejected drafts leave every rank's KV shard, whatever its layout: the same tokens as
    the plain run with the same KV flags (greedy, and seeded sampling)."""
    model = checkpoint(ckpt_root, "seq_kv2")
    for extra in ((), SAMPLED):
        plain = run(3, model, *flags, *extra)
        spec = run(3, model, *flags, *extra, "--prompt-lookup", "3", "--num-draft", "4")
        assert spec["tokens"] == plain["tokens"], (flags, extra)
        assert spec["speculative"]["drafted"] > 0
