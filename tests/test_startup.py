"""A rank started from typed settings, without a command line (as the serving engine and
the server start them): world 1, in this process, against the mlx-lm oracle."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step

from checkpoints import checkpoint
from mlx_kvshard.engine.generate import SamplingParams, generate_tokens
from mlx_kvshard.engine.startup import check_context, encode_prompt, start_rank
from mlx_kvshard.errors import UserError
from mlx_kvshard.liveness.client import Liveness
from mlx_kvshard.models.architectures import load_oracle
from mlx_kvshard.settings import LivenessSettings, ModelSettings, RankSettings, parse_shares


def test_start_rank_from_settings_matches_oracle(ckpt_root):
    d = checkpoint(ckpt_root, "llama_g2")
    settings = RankSettings(model=ModelSettings(source=str(d), dtype="float32", max_context=256))
    rank = start_rank(settings, Liveness(0, float("inf")))
    assert rank.comm.world == 1 and rank.max_context == 256 and rank.dtype == mx.float32
    assert rank.dtype_name == "float32" and rank.model_dir == d and rank.load_s >= 0
    ids = encode_prompt(rank.tokenizer, "a b c d e f", chat_template=False)
    check_context(len(ids), rank.max_context)
    got = list(generate_tokens(rank.model, rank.model.make_cache(), ids, SamplingParams(max_tokens=6),
                               rank.max_context, prefill_step=2))
    oracle = load_oracle(d, mx.float32)
    want = [int(t) for t, _ in generate_step(mx.array(ids), oracle, max_tokens=6,
                                             sampler=lambda lp: mx.argmax(lp, axis=-1))]
    assert got == want


def test_settings_say_what_is_wrong():
    with pytest.raises(UserError, match="--prefill-step 0"):
        RankSettings(model=ModelSettings(prefill_step=0)).validate()
    with pytest.raises(UserError, match="--peer-timeout 1"):
        LivenessSettings(peer_timeout=1).validate()
    with pytest.raises(UserError, match="every value must be positive"):
        parse_shares("3,0")
    assert parse_shares("64,24,16") == (64.0, 24.0, 16.0) and parse_shares(None) is None
    with pytest.raises(UserError, match="prompt is 9 tokens, but the max context is 9"):
        check_context(9, 9)
