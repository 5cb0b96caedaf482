"""Speculative decoding on head-sharded ranks: propose a few tokens cheaply, verify them in
one sharded forward (2·L all_sums for up to k+1 tokens instead of per token), and keep
exactly what the target model would have produced.

Proposers:
- PromptLookup: the continuation of the longest recent n-gram match in prompt + generated
  tokens. Integer work on the agreed token history, so every rank proposes the same
  tokens with no collective; when nothing matches, the step is a plain decode step.
- DraftProposer: a small unsharded model that rank 0 alone runs (engine/draft.py). Its
  proposals reach the other ranks through broadcast_from_rank0, inside the verify step's
  lazy graph: one k-int all_sum per step. A draft replicated on every rank would be
  replicated float work, which may round a near-tie differently on another chip (DESIGN
  invariant 6); the verify input must be one token source.

Exactness: position i of a verify step is sampled from the target's logits with the key
(seed, token index) and the logits processors' history extended by the drafts before it,
as plain decode samples that token; drafts are accepted while they equal those samples,
and the first sample that differs is kept in place of its draft. Rank 0's samples are the
agreed ones (TokenSampler.agree), so the accepted count is computed from the same integers
on every rank, and each rank trims the rejected positions from its own KV shard.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache

from ..errors import UserError
from .generate import DecodeTimings, TokenSampler


@dataclass
class SpecStats:
    drafted: int = 0  # proposed tokens that were verified
    accepted: int = 0  # of those, equal to the target's token
    steps: int = 0  # verify (or plain, when nothing was proposed) forwards
    tokens: int = 0  # tokens those steps produced

    def to_dict(self) -> dict:
        return {"drafted": self.drafted, "accepted": self.accepted,
                "acceptance_rate": self.accepted / self.drafted if self.drafted else None,
                "tokens_per_step": self.tokens / self.steps if self.steps else None}


class PromptLookup:
    """Prompt-lookup decoding: find the latest earlier occurrence of the history's last n
    tokens (n = N down to 1) and propose what followed it."""

    def __init__(self, max_ngram: int):
        self.max_ngram = max_ngram

    def start(self, context: list[int], sample: TokenSampler) -> None:
        pass

    def propose(self, history: list[int], m: int, step: int) -> tuple[list[int], mx.array] | None:
        drafts = lookup(history, self.max_ngram, m)
        return (drafts, mx.array(drafts, dtype=mx.uint32)) if drafts else None

    def accepted(self, history_before: list[int], m: int, n_accepted: int) -> None:
        pass


def lookup(history: list[int], max_ngram: int, m: int) -> list[int]:
    """Up to `m` tokens that followed an earlier match of the longest suffix n-gram: the
    latest match followed by all `m` (in a run like `x x x x` the latest match is followed
    by one token only), else the one followed by the most."""
    seq = np.asarray(history, dtype=np.int64)
    for n in range(min(max_ngram, len(seq) - 1), 0, -1):
        windows = np.lib.stride_tricks.sliding_window_view(seq[:-1], n)  # starts 0..len-1-n: a token follows each
        hits = np.flatnonzero((windows == seq[-n:]).all(axis=1))
        if hits.size:
            full = hits[hits + n + m <= len(seq)]
            start = int(full[-1] if full.size else hits[0]) + n
            return seq[start:start + m].tolist()
    return []


class DraftProposer:
    """A small model on rank 0 (None elsewhere) proposes `m` tokens, sampled with the target's
    sampler, logits processors and key (seed, token index), so a draft equal to the target
    is always accepted.
    The other ranks receive them in the verify graph (one int all_sum)."""

    def __init__(self, draft_model, comm, vocab_size: int, prefill_step: int):
        self.model, self.comm, self.sample = draft_model, comm, None
        self.vocab_size = vocab_size  # the target's: a draft's padded logits beyond it are no token
        self.prefill_step = prefill_step
        self.cache = make_prompt_cache(draft_model) if draft_model is not None else []
        self.fed = 0  # history tokens the draft cache holds

    def start(self, context: list[int], sample: TokenSampler) -> None:
        self.sample = sample
        if self.model is None:
            return
        ids = mx.array(context, dtype=mx.uint32)
        for start in range(0, len(context) - 1, self.prefill_step):
            self.model(ids[start:min(start + self.prefill_step, len(context) - 1)][None], cache=self.cache)
            mx.eval([c.state for c in self.cache])
        self.fed = len(context) - 1

    def propose(self, history: list[int], m: int, step: int) -> tuple[None, mx.array]:
        if self.model is None:  # not rank 0: rank 0's proposals arrive through the broadcast
            return None, self.comm.broadcast_from_rank0(mx.zeros((m,), dtype=mx.uint32))
        sample, x, out = self.sample, mx.array(history[self.fed:], dtype=mx.uint32), []
        for j in range(m):
            logits = self._target_width(self.model(x[None], cache=self.cache)[:, -1, :])
            seen = mx.concatenate([sample.history, *out])[-sample.window:] if sample.processors else None
            x = sample.sample_row(logits, step + j, seen)  # as the target samples that token
            out.append(x)
        return None, self.comm.broadcast_from_rank0(mx.concatenate(out))

    def _target_width(self, logits: mx.array) -> mx.array:
        """The draft's logits over the target's vocabulary rows (padded vocabularies differ):
        the sampler then draws the same noise as the target's for the same key."""
        width = logits.shape[-1]
        if width >= self.vocab_size:
            return logits[:, :self.vocab_size]
        return mx.pad(logits, [(0, 0), (0, self.vocab_size - width)], constant_values=-float("inf"))

    def accepted(self, history_before: list[int], m: int, n_accepted: int) -> None:
        """The draft cache holds the history and d_1..d_{m-1}: keep the accepted ones."""
        if self.model is None:
            return
        keep = min(n_accepted, m - 1)
        trim_prompt_cache(self.cache, m - 1 - keep)
        self.fed = len(history_before) + keep


def check_trimmable(cache: list) -> None:
    if not can_trim_prompt_cache(cache):
        kinds = sorted({type(c).__name__ for c in cache if not c.is_trimmable()})
        hint = (" (4-bit KV keeps a full-precision window by default: --kv-fp-window 0 turns it off)"
                if "WindowQuantizedKVCache" in kinds else "")
        raise UserError(f"speculative decoding trims rejected tokens from the KV cache, and this cache "
                        f"({', '.join(kinds)}) cannot be trimmed; run without --draft-model/--prompt-lookup{hint}")


def speculative_decoder(proposer, num_draft: int, context: list[int], stats: SpecStats) -> Callable[..., Iterator[int]]:
    """A decode loop for generate_tokens(decoder=...): `context` is prompt + tokens resumed."""

    def decode(model, cache: list, y: mx.array, sample: TokenSampler, first_step: int, budget: int,
               timings: DecodeTimings, after_eval) -> Iterator[int]:
        t_draft = time.perf_counter()
        proposer.start(context, sample)  # the draft's prefill is part of the time to the first token
        timings.prefill_s += time.perf_counter() - t_draft
        history = list(context) + [int(y.item())]
        t1, produced = time.perf_counter(), 1
        try:
            yield history[-1]
            while produced < budget:
                new = _round(model, cache, proposer, sample, history, first_step + produced,
                             min(num_draft, budget - produced - 1), stats, after_eval)
                timings.decode_steps += 1
                for tok in new:
                    history.append(tok)
                    produced += 1
                    yield tok
        finally:
            timings.decode_s = time.perf_counter() - t1
            timings.decode_tokens = max(0, produced - 1)

    return decode


def _round(model, cache, proposer, sample: TokenSampler, history: list[int], step: int, m: int,
           stats: SpecStats, after_eval) -> list[int]:
    """One verify step at token index `step`: the tokens it produces (1 to m+1)."""
    proposal = proposer.propose(history, m, step) if m > 0 else None
    if proposal is None:  # nothing proposed: a plain decode step
        t = sample(model(mx.array(history[-1:], dtype=mx.uint32)[None], cache, last_only=True), step)
        mx.eval(t)
        if after_eval:
            after_eval()
        stats.steps += 1
        stats.tokens += 1
        return [int(t.item())]
    known, drafts = proposal
    m = drafts.shape[0]
    logits = model(mx.concatenate([mx.array(history[-1:], dtype=mx.uint32), drafts])[None], cache)
    # Position i's repetition history holds the drafts before it: they count only if accepted.
    histories = [mx.concatenate([sample.history, drafts[:i]])[-sample.window:] if sample.processors else None
                 for i in range(m + 1)]
    samples = mx.concatenate([sample.sample_row(logits[:, i, :], step + i, histories[i]) for i in range(m + 1)])
    if sample.agree is not None:
        samples = sample.agree(samples)
    mx.eval(samples, drafts)
    if after_eval:
        after_eval()
    t, d = samples.tolist(), (known if known is not None else drafts.tolist())
    n = 0
    while n < m and t[n] == d[n]:
        n += 1
    trim_prompt_cache(cache, m - n)  # the rejected drafts' positions, on this rank's KV shard
    proposer.accepted(history, m, n)
    new = t[:n + 1]
    if sample.processors:
        sample.history = mx.concatenate([sample.history, mx.array(new, dtype=mx.uint32)])[-sample.window:]
    stats.steps += 1
    stats.drafted += m
    stats.accepted += n
    stats.tokens += n + 1
    return new


def speculative_for_rank(rank, settings, context: list[int], cache: list, draft):
    """(stats, decoder) for generate_tokens on this rank, from --draft-model or --prompt-lookup."""
    from .dist import agree as agree_verdicts

    spec = settings.speculative
    error = None
    try:
        check_trimmable(cache)
    except UserError as e:
        error = str(e)
    agree_verdicts(rank.comm, error)  # a cache kind could differ by rank (sequence-sharded heads)
    if spec.draft_model:
        proposer = DraftProposer(draft, rank.comm, rank.cfg.vocab_size, settings.model.prefill_step)
    else:
        proposer = PromptLookup(spec.prompt_lookup)
    stats = SpecStats()
    return stats, speculative_decoder(proposer, spec.num_draft, context, stats)
