"""The Engine API (rank 0): submit, stream, cancel; and the loop that runs the steps.

Threading: `Engine.run()` owns rank 0's main thread (the model, the collectives, the
sampler all run there). Everything else is thread-safe and returns at once: `submit`
tokenizes and validates in the caller's thread and refuses a bad request there, before
any rank sees it; events come back through a per-request queue (`RequestHandle`, a
blocking iterator), a callback (`on_event`, called on the engine thread: keep it quick),
or an asyncio queue (`submit_async`, for an HTTP server running its own event loop).
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
import traceback
from dataclasses import dataclass

import mlx.core as mx

from ..engine.generate import StopChecker
from ..engine.speculative import lookup
from ..errors import UserError
from ..settings import EngineSettings
from . import wire
from .batch import BatchState, StepOutput
from .handles import AsyncRequestHandle, EventCallback, RequestHandle
from .metrics import Metrics, RequestRecord, StepRecord
from ..kv.index import BlockIndex
from .requests import Completion, EngineStopped, Event, QueueFull, Request, RequestError, Usage
from .sampling import RowSampler, injected_fault, sample_rows
from .scheduler import Scheduler, Seq

MANIFEST_S = 30.0  # while busy, rank 0 rewrites the disk tier's manifest at most this often


@dataclass
class _Live:
    """Rank 0's per-request state beside the scheduler's `Seq`."""
    request: Request
    handle: RequestHandle
    sampler: RowSampler | None  # built on the engine thread (MLX arrays stay on one thread)
    stopper: StopChecker
    t_submit: float
    resumed: int = 0  # tokens generated before a migration (Request.resume): the token index starts there
    t_first: float | None = None
    t_last: float | None = None


class Engine:
    def __init__(self, loaded, live, settings: EngineSettings, kv_capacity: int, state: BatchState,
                 rank_capacity: list[dict]):
        self.loaded = loaded
        self.comm = loaded.comm
        self.tokenizer = loaded.tokenizer
        self.max_context = loaded.max_context
        self.settings = settings
        self.live = live
        self.state = state
        self.kv_capacity = kv_capacity
        self.rank_capacity = rank_capacity
        self.kv_bytes_per_token = [loaded.kv_bytes_per_token(r) for r in range(self.comm.world)]  # per position held
        self._sequence_plan = loaded.stages is None and loaded.plan.sequence_sharded
        prefix = None
        self._saved = 0  # the prefix index's disk-tier version in the last manifest written
        self._saved_at = time.monotonic()
        if settings.prefix_cache_bytes > 0:
            disk = state.disk
            per_token = max(self.kv_bytes_per_token)
            if self._sequence_plan:  # per token of a block: a sequence-sharded rank holds its share of them
                per_token = max(-(-b * len(s.seq_slots) // len(s.seq_cycle))
                                for b, s in zip(self.kv_bytes_per_token, loaded.plan.shards))
            prefix = BlockIndex(settings.prefix_cache_bytes, per_token, settings.prefix_block_tokens,
                                settings.min_prefix_tokens, settings.prefix_cache_disk_bytes if disk else 0)
            if disk is not None:  # the disk tier as the last run left it (kv/disk.py checked it is this layout's)
                prefix.restore(disk.restored, disk.next_id)
                disk.restored = []
                self._saved = prefix.changed
        self.scheduler = Scheduler(settings, kv_capacity, prefix)
        self.metrics = Metrics()
        self.size = wire.engine_capacity(settings)
        self._cond = threading.Condition()
        self._tokenizer_lock = threading.Lock()
        self._inbox: list[Seq] = []
        self._cancels: set[int] = set()
        self._open: dict[int, Seq] = {}  # every request not yet done, by id
        self._next_id = 1
        self._stopping = False
        self._stopped = False
        self._trim: tuple[int, int] | None = None  # (uid, rejected drafts) for the next step's TRIM
        self.error: str | None = None
        self.audits: list[dict] = []  # with check_sync: every rank's rows and KV after each join and removal
        # A front that moves the open requests to the next group (mlx_kvshard/front) takes a
        # loss itself: callable(message) instead of an error event to every open request.
        self.on_lost = None
        live.before_exit = self._lost
        if loaded.stages is not None:  # --pp: a micro-batched step samples inside the step (pipeline/batch.py)
            state.on_logits = self._sample_group
        self._warm_up()

    def _warm_up(self) -> None:
        """The tokenizer's first call imports and compiles (seconds, holding the GIL): pay it
        now, not while the first requests' steps run."""
        self.tokenizer.encode("warm up")
        if self.tokenizer.chat_template:
            self.tokenizer.apply_chat_template([{"role": "user", "content": "warm up"}], add_generation_prompt=True)
        self.tokenizer.detokenizer.add_token(0)
        # mlx-lm's samplers are mx.compile'd: on MLX's CPU backend the first call builds a kernel (seconds)
        from ..engine.generate import SamplingParams

        logits = mx.zeros((1, self.loaded.cfg.vocab_size))
        sample_rows(logits, [RowSampler(SamplingParams(temp=0.7, top_p=0.9, top_k=5, min_p=0.05), [0])], [0], [0])

    # ---- the API (any thread) ------------------------------------------------------------

    def submit(self, request: Request, on_event: EventCallback | None = None) -> RequestHandle:
        """Validate, tokenize and queue `request`; raise RequestError (bad request, can never
        fit), QueueFull or EngineStopped without any rank seeing it."""
        try:
            prompt, budget = self._prepare(request)
        except RequestError:
            self.metrics.refused()
            raise
        with self._cond:
            if self._stopping or self._stopped:
                raise EngineStopped(self.error or "the engine is shutting down")
            room = self.settings.max_waiting + self.settings.max_batch - len(self._open)
            if room <= 0:
                self.metrics.refused()
                raise QueueFull(f"{len(self._open)} requests are running or waiting "
                                f"(--max-batch {self.settings.max_batch} + --max-waiting "
                                f"{self.settings.max_waiting}); retry later")
            uid = self._next_id
            self._next_id = self._next_id % (2**31 - 1) + 1
            handle = RequestHandle(self, uid, on_event)
            # chat content has its first space trimmed (as before); a completion's text keeps it
            chat = request.messages is not None or (request.chat_template and bool(self.tokenizer.chat_template))
            asked = prompt[:len(prompt) - len(request.resume)]  # a resumed request's prompt ends with its tokens
            stopper = StopChecker(self.tokenizer, request.params.stop, asked, chat)
            ended = False
            for token in request.resume:  # the text and stop-string state the client already has
                ended = stopper.add(token)[1]
                if ended:
                    break
            if not ended:
                state = _Live(request, handle, None, stopper, time.perf_counter(), len(request.resume))
                seq = Seq(uid, prompt, budget, state)
                self._open[uid] = seq
                self._inbox.append(seq)
                self._cond.notify()
        if ended:  # it had stopped (EOS, a stop string): only its "done" was lost with the group
            handle._emit(Event(uid, "done", text=stopper.flush(), finish_reason=stopper.finish_reason,
                               usage=Usage(len(asked), len(request.resume)), tag=request.tag))
        return handle

    def submit_async(self, request: Request) -> AsyncRequestHandle:
        """From a coroutine: the events arrive on the running event loop."""
        return AsyncRequestHandle(self, request, asyncio.get_running_loop())

    def generate(self, request: Request) -> Completion:
        """Submit and wait: the whole completion (from any thread but the engine's)."""
        return self.submit(request).result()

    def cancel(self, request_id: int) -> None:
        """Stop a request: it ends with finish_reason "cancelled" and its KV is freed on every rank."""
        with self._cond:
            if request_id in self._open:
                self._cancels.add(request_id)
                self._cond.notify()

    def shutdown(self, cancel: bool = False) -> None:
        """Refuse new requests; stop the ranks once the open ones finish (or at once, cancelling them)."""
        with self._cond:
            self._stopping = True
            if cancel:
                self._cancels.update(self._open)
            self._cond.notify()

    def prompt_ids(self, request_id: int) -> list[int] | None:
        """The prompt's token ids of an open request (what a front needs to move it to
        another group), or None once it has ended."""
        with self._cond:
            seq = self._open.get(request_id)
            return None if seq is None else seq.prompt[:len(seq.prompt) - seq.state.resumed]

    def decode(self, ids: list[int]) -> str:
        """Token ids as text, from any thread (the tokenizer is shared with the engine thread)."""
        with self._tokenizer_lock:
            return self.tokenizer.decode(ids)

    def info(self) -> dict:
        return {"model": str(self.loaded.model_dir), "world": self.comm.world, "max_context": self.max_context,
                "dtype": self.loaded.dtype_name, "max_batch": self.settings.max_batch,
                "kv_capacity_tokens": self.kv_capacity, "ranks": self.rank_capacity,
                **({"pp": {"stages": self.loaded.stages.stages, "micro_steps": self.state.micro_steps}}
                   if self.loaded.stages is not None else {})}

    # ---- request preparation (caller's thread) -------------------------------------------

    def _prepare(self, request: Request) -> tuple[list[int], int]:
        try:
            request.params.validate()
            request.params.check_model(self.loaded.cfg.vocab_size)
        except UserError as e:
            raise RequestError(*_openai_names(str(e))) from None
        if not 0 <= request.top_logprobs <= 20:
            raise RequestError(f"top_logprobs {request.top_logprobs}: must be between 0 and 20", "top_logprobs")
        with self._tokenizer_lock:  # a Hugging Face fast tokenizer must not run on two threads at once
            ids = self._tokenize(request)
        if not ids:
            raise RequestError("the prompt is empty after tokenization", "prompt")
        if request.resume:
            if request.prompt_ids is None:
                raise RequestError("resume continues a request given by prompt_ids", "prompt")
            if len(request.resume) >= request.params.max_tokens:
                raise RequestError(f"resume holds {len(request.resume)} tokens, max_tokens is "
                                   f"{request.params.max_tokens}: nothing left to generate", "max_tokens")
            ids = ids + list(request.resume)  # prefilled like the prompt; the sampler's history holds them
        if len(ids) >= self.max_context:
            raise RequestError(f"the prompt is {len(ids)} tokens, but the max context is {self.max_context}; "
                               f"shorten the prompt", "prompt", "context_length_exceeded")
        budget = min(request.params.max_tokens - len(request.resume), self.max_context - len(ids))
        why = self.scheduler.never_fits(len(ids), budget)
        if why:
            raise RequestError(why, "prompt", "context_length_exceeded")
        return ids, budget

    def _tokenize(self, request: Request) -> list[int]:
        given = [x is not None for x in (request.prompt, request.messages, request.prompt_ids)]
        if sum(given) != 1:
            raise RequestError("give exactly one of prompt, messages or prompt_ids", "prompt")
        tok = self.tokenizer
        try:
            if request.prompt_ids is not None:
                ids = [int(t) for t in request.prompt_ids]
                vocab = self.loaded.cfg.vocab_size
                bad = [t for t in ids if not 0 <= t < vocab]
                if bad:
                    raise RequestError(f"prompt token id {bad[0]} is outside the vocabulary (0..{vocab - 1})",
                                       "prompt")
                return ids
            if request.messages is not None:
                if not tok.chat_template:
                    raise RequestError("this model's tokenizer has no chat template; send a text prompt", "prompt")
                return list(tok.apply_chat_template(request.messages, add_generation_prompt=True))
            if request.chat_template and tok.chat_template:
                return list(tok.apply_chat_template([{"role": "user", "content": request.prompt}],
                                                    add_generation_prompt=True))
            return list(tok.encode(request.prompt))
        except RequestError:
            raise
        except Exception as e:  # a template or tokenizer that rejects this input
            raise RequestError(f"could not tokenize the prompt ({type(e).__name__}: {e})", "prompt") from None

    # ---- the loop (rank 0's main thread) ------------------------------------------------

    def run(self) -> None:
        """Run steps until `shutdown()`; park every rank while there is nothing to do."""
        sched = self.scheduler
        try:
            while True:
                with self._cond:
                    self._take_inbox()
                    if not sched.busy():
                        if self._stopping:
                            self._broadcast(sched.control_step(stop=True))
                            self._close_disk()
                            return
                        self._idle()
                        continue
                    step = sched.next_step()
                    self._speculate(step)
                    self._micro_batch(step)
                    self._disk_ids(step)
                self._run_step(step)
        except BaseException as e:
            self._lost(f"the engine stopped: {type(e).__name__}: {e}")
            raise
        finally:
            with self._cond:
                self._stopped = True

    def _disk_ids(self, step: wire.Step) -> None:
        """Before a step's new block ids reach any disk: reserve them in rank 0's layout file
        (ids are never reused within an epoch); a failed disk stops the tier on every rank."""
        disk, prefix = self.state.disk, self.scheduler.prefix
        if disk is None or prefix is None or not prefix.disk_bytes:
            return
        if prefix.next_id >= disk.reserved:
            disk.reserve(prefix.next_id)
        if disk.broken and not step.disk_off:
            self.scheduler.stop_disk()  # our own disk failed: DISKOFF in this very step
            step.disk_off, self.scheduler.disk_off = True, False
            step.unlink = []
            step.put = [(*p[:5], 0) for p in step.put]
            step.save = [(*p[:5], 0) for p in step.save]

    def _save_manifest(self, every_s: float = 0.0) -> None:
        """Rank 0's manifest of the disk tier, when it changed (and, with `every_s`, at most
        that often): at idle, at shutdown, and every MANIFEST_S while busy, so a crash loses
        at most that much of the index."""
        disk, prefix = self.state.disk, self.scheduler.prefix
        if disk is None or prefix is None or not prefix.disk_bytes or prefix.changed == self._saved:
            return
        if every_s and time.monotonic() - self._saved_at < every_s:
            return
        disk.save_manifest(prefix.manifest(), prefix.next_id)
        self._saved, self._saved_at = prefix.changed, time.monotonic()

    def _close_disk(self) -> None:
        if self.state.disk is not None:
            self._save_manifest()
            self.state.disk.close()

    def _idle(self) -> None:
        """Park: the other ranks leave the ring (which spins) for a socket wait; rank 0
        sleeps on its condition until there is work, then wakes them through the coordinator.
        The disk tier's manifest is written now (off the step path, by its writer thread)."""
        self._save_manifest()
        self._gauges()
        if self.comm.world > 1:
            self._broadcast(self.scheduler.control_step(idle=True))
        self.live.phase("idle")
        while not (self._inbox or self._cancels or self._stopping):
            self._cond.wait()
        if self.comm.world > 1:
            self.live.wake_all()

    def _broadcast(self, step: wire.Step) -> None:
        if self.comm.world > 1:
            mx.eval(self.comm.all_sum(mx.array(wire.encode(step, self.size))))

    def _take_inbox(self) -> None:
        for seq in self._inbox:
            self.scheduler.waiting.append(seq)
            try:
                seq.state.sampler = RowSampler(seq.state.request.params, seq.prompt)
            except Exception as e:
                self._fail(seq, "building its sampler", e)
        self._inbox = []
        for uid in self._cancels:
            seq = self._open.get(uid)
            if seq is not None:
                self._finish(seq, "cancelled")
        self._cancels = set()

    def _run_step(self, step: wire.Step) -> None:
        t0 = time.perf_counter()
        c0, b0, l0 = self.comm.stats.collectives, self.comm.stats.bytes, self.comm.stats.link_s
        self._broadcast(step)
        out = self.state.apply(step)
        drafted = accepted = 0
        if step.drafts:
            drafted, accepted = self._sample_verify(step, out)
        else:
            self._sample(step, out)
        if out.audit is not None:
            self._check_audit(out.audit)
        if out.loaded is not None:
            with self._cond:
                self.scheduler.loaded(*out.loaded)
        self._save_manifest(every_s=MANIFEST_S)
        self.live.progress(step.index + 1)
        wall = time.perf_counter() - t0
        with self._cond:
            self.scheduler.measured(out.decode_s if step.decode else 0.0, out.prefill_s,
                                    sum(len(p.tokens) for p in step.prefill))
        self.metrics.step(StepRecord(step.index, len(step.decode), sum(len(p.tokens) for p in step.prefill),
                                     wall, self.comm.stats.collectives - c0,
                                     self.comm.stats.bytes - b0, step.audit, drafted, accepted,
                                     self.comm.stats.link_s - l0))
        self._gauges()

    def _sample(self, step: wire.Step, out: StepOutput) -> None:
        rows, logits = [], []
        if out.decode_logits is not None:
            rows = [self._open[uid] for uid, _ in step.decode]
            logits.append(out.decode_logits)
        for uid, lg in out.first_logits.items():
            rows.append(self._open[uid])
            logits.append(lg[None])
        if not rows:
            return
        results = self._sample_contained(logits[0] if len(logits) == 1 else mx.concatenate(logits, axis=0), rows)
        now = time.perf_counter()
        with self._cond, self._tokenizer_lock:  # detokenizing may call the tokenizer submit() uses
            for seq, got in zip(rows, results):
                if isinstance(got, Exception):
                    self._fail(seq, "sampling", got)
                    continue
                try:
                    if seq.phase == "prefill":
                        self.scheduler.prefilled(seq)
                    self._accept(seq, *got, now)
                except Exception as e:
                    self._fail(seq, "processing its token", e)

    def _sample_contained(self, logits: mx.array, rows: list[Seq]) -> list:
        """Each row's (token, logprob, alternatives), or the exception its own sampling raised.
        Rows are sampled together; when that raises (one row's parameters or processors),
        again one by one, so only the row at fault fails and its batch-mates get the very
        tokens they would have (each keyed by its own seed and index). Rank 0 alone samples:
        nothing here is a collective, and the verdict reaches the others as the next step's
        `remove`."""
        samplers = [s.state.sampler for s in rows]
        indices = [s.state.resumed + len(s.generated) for s in rows]  # the token's index in its request
        wants = [s.state.request.reported_logprobs for s in rows]
        try:
            return list(zip(*sample_rows(logits, samplers, indices, wants)))
        except Exception:
            pass
        out = []
        for i in range(len(rows)):
            try:
                out.append(next(zip(*sample_rows(logits[i:i + 1], [samplers[i]], [indices[i]], [wants[i]]))))
            except Exception as e:
                out.append(e)
        return out

    def _micro_batch(self, step: wire.Step) -> None:
        """--pp: let a decode-only step run several tokens per row, the rows micro-batched
        over the stages (pipeline/batch.py decides when)."""
        if self.loaded.stages is not None:
            from ..pipeline.batch import micro_rounds

            step.micro = micro_rounds(step, self.scheduler, self.state, bool(self._inbox or self._cancels))

    def _sample_group(self, uids: list, logits: mx.array) -> list[int]:
        """Inside a micro-batched step: sample a group's rows (None: a hole) as `_sample`
        does; the tokens to feed next (0 for a hole or a row that has ended)."""
        live = [i for i, u in enumerate(uids) if u in self._open and self._open[u].phase == "running"]
        tokens = [0] * len(uids)
        if not live:
            return tokens
        rows = [self._open[uids[i]] for i in live]
        results = self._sample_contained(logits[mx.array(live)] if len(live) < len(uids) else logits, rows)
        now = time.perf_counter()
        with self._cond, self._tokenizer_lock:
            for i, seq, got in zip(live, rows, results):
                if isinstance(got, Exception):
                    self._fail(seq, "sampling", got)
                    continue
                try:
                    self._accept(seq, *got, now)
                    tokens[i] = got[0]
                except Exception as e:
                    self._fail(seq, "processing its token", e)
        return tokens

    def _speculate(self, step: wire.Step) -> None:
        """Rank 0: send the last verify step's trim, and make this step a verify step when
        its batch is one row with no prefill beside it (a larger batch decodes plainly):
        prompt lookup over the request's prompt + generated tokens proposes up to
        num_draft tokens (none: a plain decode step)."""
        if self._trim is not None:
            step.trim.append(self._trim)
            self._trim = None
        s = self.settings
        if not s.prompt_lookup or len(step.decode) != 1 or step.prefill or step.join or not self.state.can_trim():
            return  # (a row joining this step speculates from the next one: its cache is merged first)
        seq = self._open[step.decode[0][0]]
        m = min(s.num_draft, seq.budget - len(seq.generated) - 1)  # the KV stays within its reservation
        if m > 0:
            step.drafts = lookup(seq.prompt + seq.generated, s.prompt_lookup, m)

    def _sample_verify(self, step: wire.Step, out: StepOutput) -> tuple[int, int]:
        """Sample each verified position as the plain path samples that token (its key (seed,
        token index), its processors' history holding the tokens before it), accepting drafts
        while they equal the samples: the first sample that differs replaces its draft. A stop,
        EOS or max_tokens inside the run ends the request there. Returns (drafted, accepted)."""
        seq = self._open[step.decode[0][0]]
        st, drafts, n, emitted = seq.state, step.drafts, 0, 0
        for i in range(len(drafts) + 1):
            with self._cond, self._tokenizer_lock:
                try:
                    tokens, lps, alts = sample_rows(out.decode_logits[i:i + 1], [st.sampler],
                                                    [st.resumed + len(seq.generated)], [st.request.reported_logprobs])
                    self._accept(seq, tokens[0], lps[0], alts[0], time.perf_counter())
                except Exception as e:  # it leaves every rank next step: no trim needed for it
                    self._fail(seq, "sampling or processing its token", e)
                    return len(drafts), n
            emitted += 1
            match = i < len(drafts) and tokens[0] == drafts[i]
            n += match
            if seq.phase == "done" or not match:
                break
        if n < len(drafts):
            self._trim = (seq.uid, len(drafts) - n)  # every rank drops the rejected positions next step
        self.metrics.speculated(len(drafts), n, emitted)
        return len(drafts), n

    def _accept(self, seq: Seq, token: int, logprob: float, alts, now: float) -> None:
        """One sampled token into its request: history, text, stop, event. Raises for this
        row alone (the caller fails it); a token outside the vocabulary never reaches a step
        message."""
        st = seq.state
        if not 0 <= token < self.loaded.cfg.vocab_size:
            raise ValueError(f"sampled token {token} is outside the vocabulary (0..{self.loaded.cfg.vocab_size - 1})")
        injected_fault(st.request.params, len(seq.generated), "text")
        st.sampler.accept(token)
        seq.generated.append(token)
        st.t_first = st.t_first or now
        st.t_last = now
        text, done = st.stopper.add(token)
        req = st.request
        st.handle._emit(Event(seq.uid, "token", token, text, logprob if req.logprobs else None,
                              alts if req.top_logprobs else None, tag=req.tag))
        if done:
            self._finish(seq, st.stopper.finish_reason)
        elif len(seq.generated) >= seq.budget:
            self._finish(seq, "length")

    def _finish(self, seq: Seq, reason: str) -> None:
        st = seq.state
        self.scheduler.finish(seq, keep=reason != "cancelled")
        del self._open[seq.uid]
        tail = st.stopper.flush() if reason != "cancelled" else ""
        # a resumed request's prompt here holds its earlier tokens: count them as generated
        usage = Usage(len(seq.prompt) - st.resumed, st.resumed + len(seq.generated),
                      min(seq.cached, len(seq.prompt) - st.resumed))
        n = len(seq.generated)
        ttft = st.t_first - st.t_submit if st.t_first else None
        tpot = (st.t_last - st.t_first) / (n - 1) if n > 1 else None
        self.metrics.request(RequestRecord(seq.uid, reason, len(seq.prompt), seq.cached, n, ttft, tpot))
        st.handle._emit(Event(seq.uid, "done", text=tail, finish_reason=reason, usage=usage, tag=st.request.tag))

    def _fail(self, seq: Seq, what: str, e: Exception) -> None:
        """This request's own work raised (its sampler, processors, stop strings, text, event):
        end it alone with the reason; its row leaves every rank with the next step's `remove`,
        as a cancelled row does. Nothing it ran was a collective, so the ranks stay in step."""
        if seq.phase == "done":
            return
        message = f"the request failed while {what}: {type(e).__name__}: {e}"
        print(f"mlx-kvshard: request {seq.uid}: {message}", file=sys.stderr)
        traceback.print_exception(e, file=sys.stderr)
        self.scheduler.finish(seq)
        self._open.pop(seq.uid, None)
        self.metrics.request(RequestRecord(seq.uid, "error", len(seq.prompt), seq.cached, len(seq.generated),
                                           None, None))
        try:
            seq.state.handle._emit(Event(seq.uid, "error", error=message, code="request_failed",
                                         tag=seq.state.request.tag))
        except Exception:  # a consumer that cannot take events (its loop closed) has nobody to tell
            pass

    def _check_audit(self, reports: list[dict]) -> None:
        # each rank's own facts (sequence-sharded KV: allocated positions differ by rank too)
        own = ("rank", "kv_bytes", "entry_bytes", "batch_kv_bytes", "allocated_tokens")
        first = {k: v for k, v in reports[0].items() if k not in own}
        for r in reports[1:]:
            mine = {k: v for k, v in r.items() if k not in own}
            if mine != first:
                raise AssertionError(f"rank {r['rank']} holds {mine}, rank 0 holds {first}: ranks out of sync")
        self.audits.append({"step": self.scheduler.step_index - 1, "reports": reports})

    def _gauges(self) -> None:
        sched = self.scheduler
        lens = [s.prefilled + len(s.generated) for s in sched.admitted()]
        used = sum(lens)
        plan = self.loaded.plan  # positions each rank holds of them (sequence-sharded: its share)
        held = [sum(plan.kv_positions(r, n) for n in lens) for r in range(plan.world)] if self._sequence_plan \
            else [used] * self.comm.world
        self.metrics.set(queue_depth=len(sched.waiting) + len(self._inbox), running=len(sched.running),
                         prefilling=len(sched.prefilling), kv_tokens_used=used,
                         kv_tokens_reserved=sched.kv_needed(sched.admitted()), kv_tokens_capacity=self.kv_capacity,
                         kv_positions_used_per_rank=held,
                         kv_bytes_used_per_rank=[h * b for h, b in zip(held, self.kv_bytes_per_token)],
                         prefix_cache=self._prefix_gauges() if sched.prefix else None)

    def _prefix_gauges(self) -> dict:
        p, disk = self.scheduler.prefix, self.state.disk
        return {"entries": len(p), "bytes": p.bytes, "hits": p.hits, "misses": p.misses, "evictions": p.evictions,
                "tiers": {"blocks": p.tier_blocks(), "bytes": {"ram": p.bytes, "disk": p.disk_used},
                          "hits": dict(p.tier_hits), "hit_tokens": dict(p.tier_hit_tokens),
                          "hit_bytes": {k: v * p.bytes_per_token for k, v in p.tier_hit_tokens.items()},
                          "evictions": {"ram": p.evictions, "disk": p.disk_evictions}},
                "disk_on": bool(p.disk_bytes), "load_failures": p.load_failures,
                "disk_io": dict(disk.stats) if disk is not None else None}

    def _lost(self, message: str) -> None:
        """The liveness client is ending the process (a rank was lost): tell every open request."""
        self.error = message
        if self.on_lost is not None:
            self.on_lost(message)
            return
        for seq in list(self._open.values()):
            seq.state.handle._emit(Event(seq.uid, "error", error=message, tag=seq.state.request.tag))


_FLAG_NAMES = {"--max-tokens": "max_tokens", "--temp": "temperature", "--top-p": "top_p", "--top-k": "top_k",
               "--min-p": "min_p", "--repetition-penalty": "repetition_penalty", "--seed": "seed",
               "--presence-penalty": "presence_penalty", "--frequency-penalty": "frequency_penalty",
               "--repetition-context-size": "repetition_context_size", "--stop": "stop"}


def _openai_names(message: str) -> tuple[str, str | None]:
    """SamplingParams.validate speaks in command-line flags; requests use OpenAI's field
    names: (the message in those, the field)."""
    flag = message.split(" ", 1)[0].rstrip(":")
    if flag not in _FLAG_NAMES:
        return message, None
    return _FLAG_NAMES[flag] + message[len(flag):], _FLAG_NAMES[flag]
