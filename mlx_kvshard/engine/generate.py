"""Prefill and decode on one rank. Every rank runs this same loop on the same token ids,
so every rank issues the same collectives in the same order; the caller's `agree` makes
the next token rank 0's on every rank (replicated sampling can round differently)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator

import mlx.core as mx
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from ..errors import UserError
from .detokenize import TextDecoder


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 64
    temp: float = 0.0
    top_p: float = 0.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float | None = None
    repetition_context_size: int = 20
    seed: int = 0
    stop: tuple[str, ...] = ()
    presence_penalty: float | None = None  # OpenAI's additive penalties, over the last 20 tokens (mlx-lm's)
    frequency_penalty: float | None = None

    def validate(self) -> None:
        def bad(flag, value, want):
            raise UserError(f"{flag} {value}: must be {want}")

        if self.max_tokens < 1:
            bad("--max-tokens", self.max_tokens, "at least 1")
        if not self.temp >= 0:
            bad("--temp", self.temp, "0 (greedy) or positive")
        if not 0 <= self.top_p <= 1:
            bad("--top-p", self.top_p, "between 0 and 1 (0 disables it)")
        if self.top_k < 0:
            bad("--top-k", self.top_k, "0 (disabled) or a positive count")
        if not 0 <= self.min_p <= 1:
            bad("--min-p", self.min_p, "between 0 and 1 (0 disables it)")
        if self.repetition_penalty is not None and not self.repetition_penalty > 0:
            bad("--repetition-penalty", self.repetition_penalty, "positive (1.0 = none)")
        if self.repetition_context_size < 1:
            bad("--repetition-context-size", self.repetition_context_size, "at least 1")
        if not 0 <= self.seed < 2**63:
            bad("--seed", self.seed, "a non-negative integer below 2**63")
        for flag, value in (("--presence-penalty", self.presence_penalty),
                            ("--frequency-penalty", self.frequency_penalty)):
            if value is not None and not -2 <= value <= 2:
                bad(flag, value, "between -2 and 2")
        if any(not s for s in self.stop):
            raise UserError("--stop: stop strings must not be empty")

    def check_model(self, vocab_size: int) -> None:
        """What only the model bounds, checked before any rank samples: mlx-lm's top-k raises
        unless 0 < top_k < vocabulary (inside a step, that would stop every rank)."""
        if self.top_k >= vocab_size:
            raise UserError(f"--top-k {self.top_k}: must be below the vocabulary size {vocab_size} "
                            f"(0 disables it)")


def step_seed(seed: int, step: int) -> int:
    """Randomness keyed by (seed, step): a run resumed at step k samples what an
    uninterrupted run would, whatever happened before."""
    return (seed * 1_000_003 + step * 7_919 + 1) % (2**63)


@dataclass
class DecodeTimings:
    prompt_tokens: int = 0
    prefill_s: float = 0.0  # prompt in, first token out (TTFT)
    decode_s: float = 0.0
    decode_steps: int = 0  # decode steps dispatched (one may run past an early stop)
    decode_tokens: int = 0  # tokens yielded after the first


PENALTY_CONTEXT = 20  # tokens mlx-lm's presence and frequency penalties read (its default, used here)


def logits_processors(params: SamplingParams) -> tuple[list, int]:
    """mlx-lm's logits processors for `params`, and how many trailing tokens of history they
    read: a sampler keeps only that window instead of growing the history every token."""
    processors = make_logits_processors(
        repetition_penalty=params.repetition_penalty,
        repetition_context_size=params.repetition_context_size,
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
    )
    return processors, max(params.repetition_context_size, PENALTY_CONTEXT)


class TokenSampler:
    """Last-position logits -> the next token id: logits processors over the window of
    history they read, then the sampler seeded by (seed, step). `agree`, when given, makes
    the sampled token rank 0's on every rank (DESIGN invariant 6)."""

    def __init__(self, params: SamplingParams, context: list[int],
                 agree: Callable[[mx.array], mx.array] | None = None):
        self.params = params
        self.sampler = make_sampler(params.temp, params.top_p, params.min_p, top_k=params.top_k)
        self.processors, self.window = logits_processors(params)
        self.history = mx.array(context[-self.window:], dtype=mx.uint32)
        self.agree = agree

    def __call__(self, logits: mx.array, step: int) -> mx.array:
        y = self.sample_row(logits[:, -1, :], step, self.history)
        if self.agree is not None:
            y = self.agree(y)
        if self.processors:  # only they read the history
            self.history = mx.concatenate([self.history, y])[-self.window:]
        return y

    def sample_row(self, logits: mx.array, step: int, history: mx.array) -> mx.array:
        """One position's (B, vocab) logits -> its token, keyed by (seed, step), without agreement."""
        logits = processed(logits, self.processors, history)
        if self.params.temp != 0:  # greedy's argmax does not need the logits normalized
            logits = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return keyed_sample(self.sampler, logits, self.params.seed, step).reshape(-1).astype(mx.uint32)


def processed(logits: mx.array, processors: list, history: mx.array) -> mx.array:
    """The logits after mlx-lm's processors (the penalties), which read the recent history."""
    for proc in processors:
        logits = proc(history, logits)
    return logits


def keyed_sample(sampler, logprobs: mx.array, seed: int, index: int) -> mx.array:
    """A sample keyed by (seed, token index): a token does not depend on a resume or on the
    batch it was sampled in (the key is taken as the op is built)."""
    mx.random.seed(step_seed(seed, index))
    return sampler(logprobs)


def prefill(model, cache: list, prompt: list[int], prefill_step: int,
            after_eval: Callable[[], object] | None = None) -> mx.array:
    """Run all but the last prompt token into the cache in chunks of `prefill_step`, then
    return the last token's logits (lazy)."""
    ids = mx.array(prompt, dtype=mx.uint32)
    for start in range(0, len(prompt) - 1, prefill_step):
        stop = min(start + prefill_step, len(prompt) - 1)
        model(ids[start:stop][None], cache, last_only=True)  # only the cache is evaluated
        mx.eval([c.state for c in cache])
        if after_eval:
            after_eval()
    return model(ids[-1:][None], cache, last_only=True)


def generate_tokens(model, cache: list, prompt: list[int], params: SamplingParams, max_context: int,
                    prefill_step: int = 512, timings: DecodeTimings | None = None,
                    on_prefill_done: Callable[[], None] | None = None,
                    first_step: int = 0, after_eval: Callable[[], object] | None = None,
                    agree: Callable[[mx.array], mx.array] | None = None,
                    decoder: Callable[..., Iterator[int]] | None = None) -> Iterator[int]:
    """Yield new token ids until `params.max_tokens` in all. The caller may stop early (EOS,
    stop string); it must do so identically on every rank, which holds because every rank
    sees the same tokens. A resumed run passes the tokens generated so far at the end of
    `prompt` and their count as `first_step`. `after_eval`, when given, runs after each
    evaluated step and turns off the one-step pipelining (link emulation needs the steps
    serialized, as real collectives would serialize them). `agree`: see TokenSampler.
    `decoder`, when given, replaces the plain decode loop (`_decode`'s signature), e.g. a
    speculative one (engine/speculative.py)."""
    timings = timings or DecodeTimings()
    if first_step >= params.max_tokens:
        return
    sample = TokenSampler(params, prompt, agree)
    budget = min(params.max_tokens - first_step, max_context - len(prompt))
    t0 = time.perf_counter()
    y = sample(prefill(model, cache, prompt, prefill_step, after_eval), first_step)
    mx.eval(y)
    if after_eval:
        after_eval()
    timings.prompt_tokens = len(prompt)
    timings.prefill_s = time.perf_counter() - t0
    if on_prefill_done:
        on_prefill_done()
    yield from (decoder or _decode)(model, cache, y, sample, first_step, budget, timings, after_eval)


def _decode(model, cache: list, y: mx.array, sample: TokenSampler, first_step: int, budget: int,
            timings: DecodeTimings, after_eval: Callable[[], object] | None) -> Iterator[int]:
    """Yield `y`, then each next token, `budget` in all."""
    t1 = time.perf_counter()
    step = 0
    try:
        while True:
            # Dispatch step+1 before reading step's token so the host sync overlaps compute.
            if step + 1 < budget:
                next_y = sample(model(y[None], cache, last_only=True), first_step + step + 1)
                timings.decode_steps += 1
                if after_eval:
                    mx.eval(next_y)
                    after_eval()
                else:
                    mx.async_eval(next_y)
            yield int(y.item())
            step += 1
            if step >= budget:
                break
            y = next_y
    finally:
        timings.decode_s = time.perf_counter() - t1
        timings.decode_tokens = max(0, step - 1)


class StopChecker:
    """EOS and stop strings, evaluated identically on every rank, over the completion's text
    (detokenize.TextDecoder: leading space kept after `context`, the prompt's tokens, unless
    `trim_first_space`, as chat content). Text that could be the start of a stop string is
    held back until the next token says whether it is, so what was shown never has to be
    taken back: the text shown, joined, is exactly `text` (cut before the stop string)."""

    def __init__(self, tokenizer, stop: tuple[str, ...], context: list[int] = (), trim_first_space: bool = False):
        self.eos = set(tokenizer.eos_token_ids or [])
        self.stop = stop
        self.detok = TextDecoder(tokenizer, context, trim_first_space)
        self.text = ""
        self.shown = 0  # characters of `text` returned so far
        self.finish_reason = "length"
        self.cut_at_stop_string = False

    def add(self, token: int) -> tuple[str, bool]:
        """Return (new text to show, finished)."""
        if token in self.eos:
            self.finish_reason = "stop"
            return "", True
        before = len(self.text)
        self.text += self.detok.add(token)
        if self._cut(before):
            self.finish_reason = "stop"
            return self._show(len(self.text)), True
        return self._show(len(self.text) - self._held()), False

    def flush(self) -> str:
        """The rest at the end: held-back text and what the decoder still held."""
        if self.cut_at_stop_string:  # the rest is past the stop string
            return ""
        before = len(self.text)
        self.text += self.detok.flush()
        self._cut(before)
        return self._show(len(self.text))

    def _cut(self, before: int) -> bool:
        for s in self.stop:
            i = self.text.find(s, max(0, before - len(s)))  # only the tail can newly contain one
            if i >= 0:
                self.text = self.text[:i]
                self.cut_at_stop_string = True
                return True
        return False

    def _held(self) -> int:
        """How many trailing characters could begin a stop string."""
        held = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), held, -1):
                if self.text.endswith(s[:k]):
                    held = k
                    break
        return held

    def _show(self, end: int) -> str:
        out = self.text[self.shown:end]
        self.shown = max(self.shown, end)
        return out
