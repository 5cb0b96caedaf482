"""Rank 0's sampler: one row of logits per sequence, each with its own parameters.

Randomness is keyed by (request seed, token index), never by the step or the batch,
so a request's tokens do not depend on which requests shared its batch (and equal a
one-prompt `generate` with the same seed). mlx-lm's samplers and logits processors do
the work, one row at a time; greedy rows take one argmax together.

Log-probabilities leave here finite: a value below LOGPROB_FLOOR, -inf or NaN (an extreme
repetition_penalty can make them) is reported as LOGPROB_FLOOR, vLLM's -9999.0, so no
non-finite number reaches a client's JSON.
"""

from __future__ import annotations

import math
import os

import mlx.core as mx
from mlx_lm.sample_utils import make_sampler

from ..engine.generate import SamplingParams, keyed_sample, logits_processors, processed


LOGPROB_FLOOR = -9999.0
TEST_FAIL_ROW = "MLX_KVSHARD_TEST_FAIL_ROW"  # test hook: "SEED:INDEX:STAGE[,...]", see injected_fault


def reportable(logprob: float) -> float:
    """A log-probability as a client may see it: finite, at least LOGPROB_FLOOR."""
    return max(logprob, LOGPROB_FLOOR) if math.isfinite(logprob) else LOGPROB_FLOOR


def injected_fault(params: SamplingParams, index: int, stage: str) -> None:
    """Test-only: raise in one request's row work (the request with this seed, at this token
    index, in stage "sample" or "text"), as a bug in its sampler or detokenizer would."""
    spec = os.environ.get(TEST_FAIL_ROW)
    if spec and f"{params.seed}:{index}:{stage}" in spec.split(","):
        raise RuntimeError(f"test hook {TEST_FAIL_ROW}: seed {params.seed} fails at token {index} ({stage})")


class RowSampler:
    """One sequence's sampling state: its parameters and the history its processors read."""

    def __init__(self, params: SamplingParams, prompt: list[int]):
        self.params = params
        self.greedy = params.temp == 0
        self.sampler = None if self.greedy else make_sampler(params.temp, params.top_p, params.min_p,
                                                              top_k=params.top_k)
        self.processors, self.window = logits_processors(params)
        self.history = mx.array(prompt[-self.window:], dtype=mx.uint32) if self.processors else None

    def logprobs(self, logits: mx.array) -> mx.array:
        """[vocab] logits -> [1, vocab] log-probabilities after this sequence's processors."""
        logits = processed(logits[None], self.processors, self.history)
        return logits - mx.logsumexp(logits, axis=-1, keepdims=True)

    def sample(self, logprobs: mx.array, index: int) -> mx.array:
        injected_fault(self.params, index, "sample")
        if self.greedy:
            return mx.argmax(logprobs, axis=-1)
        return keyed_sample(self.sampler, logprobs, self.params.seed, index)

    def accept(self, token: int) -> None:
        if self.processors:
            # only the window the processors read: no concatenate that grows every token
            self.history = mx.concatenate([self.history, mx.array([token], dtype=mx.uint32)])[-self.window:]


def sample_rows(logits: mx.array, samplers: list[RowSampler], indices: list[int],
                logprobs: list[int | None]) -> tuple[list[int], list[float | None], list[list[tuple[int, float]]]]:
    """Sample one token per row of `logits` [rows, vocab]; `indices[i]` is row i's token
    index within its request; `logprobs[i]` is None when row i reports no log-probabilities,
    else how many top alternatives it wants beside its token's (0 = none). Returns the
    tokens, their log-probabilities (None where not asked; finite) and the alternatives.
    The caller hands each row's token to its sampler's `accept` (one row at a time, so a
    row that fails there fails alone). Rows
    without logits processors are normalized together and greedy rows take one argmax
    together (the common case: a few ops per step, not per row). A step of greedy rows
    that report no log-probabilities skips the normalization: on MLX's CPU build the
    logsumexp over [16, vocab] costs more than the argmax (0.8 vs 0.1 ms at vocab 4096)."""
    wanted = [i for i, k in enumerate(logprobs) if k is not None]
    if not wanted and all(s.greedy and not s.processors for s in samplers):
        tokens = mx.argmax(logits, axis=-1)
        toks = tokens.tolist()
        return toks, [None] * len(toks), [[] for _ in samplers]
    if any(s.processors for s in samplers):
        lp = mx.concatenate([s.logprobs(logits[i]) for i, s in enumerate(samplers)], axis=0)
    else:
        lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    tokens = mx.argmax(lp, axis=-1)
    sampled = [i for i, s in enumerate(samplers) if not s.greedy]
    if sampled:
        picks = mx.concatenate([samplers[i].sample(lp[i:i + 1], indices[i]).reshape(1) for i in sampled])
        tokens[mx.array(sampled)] = picks.astype(tokens.dtype)
    chosen = mx.take_along_axis(lp, tokens[:, None], axis=-1)[:, 0]
    k = max((n for n in logprobs if n), default=0)
    top = mx.argsort(-lp, axis=-1)[:, :k] if k else None
    top_lp = mx.take_along_axis(lp, top, axis=-1) if k else None
    mx.eval(tokens, chosen, [top, top_lp] if k else [])  # one evaluation for all of them
    toks, probs = tokens.tolist(), chosen.tolist()
    probs = [reportable(p) if n is not None else None for p, n in zip(probs, logprobs)]
    alts: list[list[tuple[int, float]]] = [[] for _ in samplers]
    if top is not None:
        top_ids, top_lp = top.tolist(), top_lp.tolist()
        alts = [[(t, reportable(v)) for t, v in zip(top_ids[i][:n or 0], top_lp[i][:n or 0])]
                for i, n in enumerate(logprobs)]
    return toks, probs, alts
