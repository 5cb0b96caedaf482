"""Rank 0's scheduler: what runs each step. Pure Python (no MLX): it sees requests as
token ids and reservations, and writes `wire.Step`s.

Each step: remove finished and cancelled sequences, join the ones whose first token was
sampled last step, decode every running row, then spend the prefill budget
(`prefill_step` prompt tokens) on prompts in arrival order, admitting waiting requests
while the batch and the KV cache have room. A prompt prefilled in several chunks never
freezes the running rows: they decode in every one of those steps.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from ..settings import EngineSettings
from ..kv.index import BlockIndex, Insert
from ..kv.admission import admission_tokens
from .wire import MAX_DROPS, MAX_LOADS, Prefill, Step


@dataclass
class Seq:
    """One admitted-or-waiting request, as the scheduler tracks it."""
    uid: int
    prompt: list[int]
    budget: int  # tokens it may generate (max_tokens, clamped by the context)
    state: Any = None  # the engine's per-request state (sampler, stop checker, handle)
    prefilled: int = 0  # prompt positions in its KV
    cached: int = 0  # of those, reused from the prefix cache
    entry: int = -1  # the last prefix-cache block its hit used (-1: none)
    from_disk: int = 0  # prompt positions of its hit loaded back from the disk tier for it
    generated: list[int] = field(default_factory=list)
    on_ranks: bool = False  # a prefill chunk went out: the ranks hold KV for it
    phase: str = "waiting"  # waiting, prefill, ready (first token sampled), running

    @property
    def reserve(self) -> int:
        return len(self.prompt) + self.budget


class Scheduler:
    def __init__(self, settings: EngineSettings, kv_capacity: int, prefix: BlockIndex | None):
        self.settings = settings
        self.kv_capacity = kv_capacity  # KV tokens every rank can hold (the smallest rank's)
        self.prefix = prefix
        self.waiting: deque[Seq] = deque()
        self.prefilling: list[Seq] = []  # admitted, in arrival order
        self.ready: list[Seq] = []  # prefilled, first token sampled, joining next step
        self.running: list[Seq] = []  # batch rows, in row order (every rank's order)
        self.to_remove: list[Seq] = []
        self.saves: list[tuple[int, ...]] = []  # prefix blocks from finished rows, for the next step
        self.drops: deque[int] = deque()  # evicted prefix blocks not yet sent (at most MAX_DROPS a step)
        self.unlinks: deque[int] = deque()  # disk blocks to delete, not yet sent (at most MAX_DROPS a step)
        self.loading: tuple[Seq, list[int]] | None = None  # the disk load of the step being run, for whom
        self.disk_off = False  # the disk tier failed: tell the ranks in the next step
        self.step_index = 0
        self.decode_s: float | None = None  # measured: a decode-only step's time
        self.prefill_token_s: float | None = None  # measured: one prompt token's share of a step

    # ---- admission --------------------------------------------------------------------

    def admitted(self) -> list[Seq]:
        return self.prefilling + self.ready + self.running

    def kv_needed(self, seqs: list[Seq]) -> int:
        """KV tokens these sequences can come to hold per rank in the running layout
        (kv/layout.py: each row its own tokens in length groups; rows x the longest when
        padded). An upper bound: rows leave as they finish."""
        return admission_tokens(self.settings.kv_layout, [s.reserve for s in seqs])

    def never_fits(self, prompt_tokens: int, budget: int) -> str | None:
        if admission_tokens(self.settings.kv_layout, [prompt_tokens + budget]) > self.kv_capacity:
            return (f"the request needs {prompt_tokens} prompt + {budget} new tokens = {prompt_tokens + budget} KV "
                    f"tokens, but a rank holds at most {self.kv_capacity}; shorten the prompt or lower max_tokens")
        return None

    def _can_admit(self, seq: Seq) -> bool:
        admitted = self.admitted()
        return (len(admitted) < self.settings.max_batch
                and self.kv_needed(admitted + [seq]) <= self.kv_capacity)

    # ---- one step ---------------------------------------------------------------------

    def next_step(self) -> Step:
        step = Step(index=self.step_index)
        self.step_index += 1
        step.save, self.saves = self.saves, []
        for seq in self.to_remove:
            if seq.on_ranks:
                step.remove.append(seq.uid)
            for group in (self.prefilling, self.ready, self.running):
                if seq in group:
                    group.remove(seq)
        self.to_remove = []
        for seq in self.ready:
            seq.phase = "running"
            step.join.append(seq.uid)
            self.running.append(seq)
        self.ready = []
        step.decode = [(s.uid, s.generated[-1]) for s in self.running]
        while self.waiting and self._can_admit(self.waiting[0]):
            seq = self.waiting.popleft()
            seq.phase = "prefill"
            self.prefilling.append(seq)
        self._plan_prefill(step)
        step.drop = self._take_drops()
        if self.prefix is not None:
            self.unlinks.extend(self.prefix.unlinks)
            self.prefix.unlinks.clear()
        step.unlink = [self.unlinks.popleft() for _ in range(min(MAX_DROPS, len(self.unlinks)))]
        step.disk_off, self.disk_off = self.disk_off, False
        # debug: every rank reports its rows and KV after each change (freed on every rank?)
        step.audit = self.settings.check_sync and bool(step.remove or step.join)
        return step

    def _plan_load(self, step: Step, seq: Seq, hit) -> bool:
        parent, ids, freed = self.prefix.plan_load(hit, MAX_LOADS)
        self._evict(freed)
        if not ids:
            return False
        queued = set(ids).intersection(self.drops)
        if queued:  # still in RAM on every rank (their DROP not sent yet): keep them there
            self.drops = deque(i for i in self.drops if i not in queued)
        step.load = (parent, ids)
        self.loading = (seq, ids)
        return True

    def loaded(self, valid: int, ok: bool) -> None:
        """After a LOAD step: every rank read the first `valid` blocks; `ok` is False when a
        rank's disk tier failed (then the tier stops everywhere)."""
        seq, ids = self.loading
        self.loading = None
        seq.from_disk += sum(len(self.prefix.blocks[i].tokens) for i in ids[:valid] if i in self.prefix.blocks)
        self._evict(self.prefix.loaded(ids, valid))
        if not ok:
            self.stop_disk()

    def stop_disk(self) -> None:
        if self.prefix is not None and self.prefix.disk_bytes:
            self.prefix.disk_off()
            self.unlinks.clear()
            self.disk_off = True

    def _take_drops(self) -> list[int]:
        """This step's evictions: after its prefills and PUTs on every rank (a hit taken this
        step has copied its positions first), at most MAX_DROPS; later ones wait a step."""
        return [self.drops.popleft() for _ in range(min(MAX_DROPS, len(self.drops)))]

    def control_step(self, idle: bool = False, stop: bool = False) -> Step:
        step = Step(index=self.step_index, idle=idle, stop=stop)
        self.step_index += 1
        return step

    def prefill_budget(self) -> int:
        """Prompt tokens this step may prefill: all of --prefill-step when nothing decodes, or
        when at least half as many prompts wait to prefill as rows decode (a burst of
        arrivals: getting them going is worth more than those rows' TPOT; 16 requests
        submitted one after the other had the last 7 spread over many steps); else what
        costs about `prefill_decode_ratio` decode forwards (at least a small chunk), which
        keeps a long prompt arriving beside running rows from freezing them."""
        s = self.settings
        if not self.running or not s.prefill_decode_ratio or 2 * len(self.prefilling) >= len(self.running):
            return s.prefill_step
        least = min(s.min_prefill_chunk, s.prefill_step)  # the step message holds prefill_step tokens
        if self.decode_s is None or self.prefill_token_s is None:
            return least
        fit = int(s.prefill_decode_ratio * self.decode_s / self.prefill_token_s)
        return max(least, min(s.prefill_step, fit))

    def measured(self, decode_s: float, prefill_s: float, prefill_tokens: int) -> None:
        """Learn the step costs (moving averages) from a finished step's forwards."""
        ema = lambda old, new: new if old is None else 0.7 * old + 0.3 * new  # noqa: E731
        if decode_s > 0:
            self.decode_s = ema(self.decode_s, decode_s)
        if prefill_tokens:
            self.prefill_token_s = ema(self.prefill_token_s, prefill_s / prefill_tokens)

    def _plan_prefill(self, step: Step) -> None:
        budget = self.prefill_budget()
        done = []
        for seq in self.prefilling:
            if budget <= 0:
                break
            hit = None
            if seq.prefilled == 0 and self.prefix is not None:  # decided as its first chunk goes out
                hit = self.prefix.lookup(seq.prompt, count=False)
                if hit and hit.load:  # disk blocks: every rank reads them back first (a LOAD step), then prefill
                    if step.load is not None or self._plan_load(step, seq, hit):
                        continue  # one load a step; it prefills once its hit is in RAM
                    hit = self.prefix.in_ram(hit)  # RAM has no room for them: recompute past its RAM part
                self.prefix.counted(hit, seq.from_disk)
                if hit:
                    seq.prefilled = seq.cached = hit.tokens
                    seq.entry = hit.block
            n = min(budget, len(seq.prompt) - seq.prefilled)
            last = seq.prefilled + n == len(seq.prompt)
            step.prefill.append(Prefill(seq.uid, seq.prefilled, seq.prompt[seq.prefilled:seq.prefilled + n], last,
                                        hit.block if hit else -1, hit.tokens if hit else 0))
            seq.prefilled += n
            seq.on_ranks = True
            budget -= n
            if last:
                done.append(seq)
        for seq in done if self.prefix is not None else []:  # after the lookups: PUT runs after this step's prefills
            new, evict = self.prefix.insert(seq.prompt)
            self._evict(evict)
            if new is not None:
                step.put.append(_blocks(seq.uid, new))

    # ---- after the step ---------------------------------------------------------------

    def prefilled(self, seq: Seq) -> None:
        """Its first token is sampled: it joins the batch next step (unless it is already done)."""
        self.prefilling.remove(seq)
        seq.phase = "ready"
        self.ready.append(seq)

    def finish(self, seq: Seq, keep: bool = False) -> None:
        """Finished or cancelled: leave at the start of the next step, on every rank. `keep`:
        a batch row that ended normally stays in the prefix cache (prompt and reply: a chat's
        next turn starts with them)."""
        if keep and seq.phase == "running" and self.prefix is not None:
            tokens = seq.prompt + seq.generated[:-1]  # the last token was never fed: no KV for it
            new, evict = self.prefix.insert(tokens)
            self._evict(evict)
            if new is not None:
                self.saves.append(_blocks(seq.uid, new))
        if seq.phase == "waiting":
            self.waiting.remove(seq)
        elif seq not in self.to_remove:
            self.to_remove.append(seq)
        seq.phase = "done"

    def _evict(self, blocks: list[int]) -> None:
        self.drops.extend(blocks)

    def busy(self) -> bool:
        """Work to send: requests, or evictions still held on the ranks (freed before parking)."""
        return bool(self.waiting or self.prefilling or self.ready or self.running or self.to_remove or self.drops
                    or self.unlinks or (self.prefix is not None and self.prefix.unlinks) or self.disk_off)


def _blocks(uid: int, new: Insert) -> tuple[int, int, int, int, int, int]:
    """A PUT or SAVE: uid's positions [start, end) become blocks first, first + 1, ... after parent
    (and go to disk too when `persist`)."""
    return uid, new.start, new.end, new.first, new.parent, int(new.persist)
