"""Score a token sequence through a model and its KV cache the way generation fills it:
windows of `context` tokens, each prefilled through a fresh cache in chunks of
`chunk` tokens, so every chunk attends over what the cache stored of the earlier ones
(quantized, sequence-sharded, ...). Each position predicts the next token of its window.

With a second, full-precision cache the same forward runs beside it, chunk by chunk, and
the next-token distributions are compared as llama.cpp's perplexity tool does with
--kl-divergence: mean KL(P_fp || P_kv) and how often the two agree on the top token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import mlx.core as mx


@dataclass
class Score:
    """Sums over the scored positions (Python floats: float64 across chunks)."""
    tokens: int = 0
    nll: float = 0.0  # sum of -log p(next token)
    nll_sq: float = 0.0
    windows: int = 0
    fp_nll: float = 0.0  # with the full-precision cache, when compared
    kl: float = 0.0  # sum of KL(P_fp || P_kv)
    kl_max: float = 0.0
    top1_same: int = 0
    compared: bool = False
    kv_bytes: int = 0  # largest cache this rank held (at a window's end)

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.tokens)

    @property
    def perplexity_stderr(self) -> float:
        """Delta-method standard error of the perplexity (as mlx-lm's and llama.cpp's tools)."""
        if self.tokens < 2:
            return 0.0
        mean = self.nll / self.tokens
        var = max(0.0, (self.nll_sq - self.tokens * mean * mean) / (self.tokens - 1))
        return self.perplexity * math.sqrt(var / self.tokens)

    def to_dict(self) -> dict:
        out = {"perplexity": self.perplexity, "perplexity_stderr": self.perplexity_stderr,
               "nll_mean": self.nll / self.tokens, "tokens_scored": self.tokens, "windows": self.windows}
        if self.compared:
            fp = math.exp(self.fp_nll / self.tokens)
            out.update(fp_perplexity=fp, perplexity_change=self.perplexity / fp - 1,
                       kl_divergence_mean=self.kl / self.tokens, kl_divergence_max=self.kl_max,
                       top1_agreement=self.top1_same / self.tokens)
        return out


def windows(n_tokens: int, context: int) -> list[tuple[int, int]]:
    """Non-overlapping [start, stop) windows of `context` tokens; a last shorter one is kept
    when it has a next token to predict."""
    return [(s, min(s + context, n_tokens)) for s in range(0, n_tokens, context) if min(s + context, n_tokens) - s >= 2]


def _logprobs(logits: mx.array) -> mx.array:
    logits = logits[0].astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def _eval_with_caches(values: list, cache: list) -> list:
    # the caches too: the next chunk must not rebuild this one's graph
    mx.eval(values, [c.state for c in cache])
    return [v.item() for v in values]


def score(model: Callable, tokens: list[int], context: int, chunk: int, make_cache: Callable[[], list],
          make_fp_cache: Callable[[], list] | None = None,
          on_chunk: Callable[[int], None] | None = None) -> Score:
    """`model(inputs (1, L), cache) -> logits (1, L, vocab)`; `make_cache()` a fresh cache per
    window. With `make_fp_cache`, the full-precision forward runs first each chunk and is
    evaluated on its own (each forward's collectives complete before the next starts, in the
    same order on every rank)."""
    result = Score(compared=make_fp_cache is not None)
    ids = mx.array(tokens, dtype=mx.uint32)
    for start, stop in windows(len(tokens), context):
        result.windows += 1
        cache = make_cache()
        fp_cache = make_fp_cache() if make_fp_cache else None
        for s in range(start, stop - 1, chunk):
            e = min(s + chunk, stop - 1)
            inputs, targets = ids[s:e][None], ids[s + 1:e + 1]
            if fp_cache is not None:
                lp_fp = _logprobs(model(inputs, fp_cache))
                fp_nll = -mx.take_along_axis(lp_fp, targets[:, None], axis=-1).sum()
                mx.eval(lp_fp, fp_nll, [c.state for c in fp_cache])
            lp = _logprobs(model(inputs, cache))
            nll = -mx.take_along_axis(lp, targets[:, None], axis=-1)[:, 0]
            values = [nll.sum(), (nll * nll).sum()]
            if fp_cache is not None:
                kl = (mx.exp(lp_fp) * (lp_fp - lp)).sum(axis=-1)
                same = (mx.argmax(lp_fp, axis=-1) == mx.argmax(lp, axis=-1)).sum()
                values += [fp_nll, kl.sum(), kl.max(), same]
            got = _eval_with_caches(values, cache)
            result.tokens += e - s
            result.nll += got[0]
            result.nll_sq += got[1]
            if fp_cache is not None:
                result.fp_nll += got[2]
                result.kl += got[3]
                result.kl_max = max(result.kl_max, got[4])
                result.top1_same += int(got[5])
            if on_chunk:
                on_chunk(result.tokens)
        result.kv_bytes = max(result.kv_bytes, sum(c.nbytes for c in cache))
    return result
