"""What the engine counts, for `/metrics` and `--stats`: per request, per step, and now.
Rank 0 only; written by the engine thread, read from any thread through `snapshot()`."""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import asdict, dataclass


@dataclass
class RequestRecord:
    request_id: int
    outcome: str  # stop, length, cancelled, error
    prompt_tokens: int
    cached_tokens: int
    generated_tokens: int
    ttft_s: float | None
    tpot_s: float | None  # mean time per output token after the first


@dataclass
class StepRecord:
    index: int
    batch: int  # rows decoded
    prefill_tokens: int
    wall_s: float
    collectives: int
    bytes: int  # collective payload per rank
    audit: bool = False  # a --check-sync audit (one gather) ran in it
    drafted: int = 0  # a speculative verify step: proposals verified
    accepted: int = 0  # of those, equal to the target's token
    link_s: float = 0.0  # emulated link time this rank paid in the step (--link)


class Metrics:
    def __init__(self, keep: int = 4096):
        self._lock = threading.Lock()
        self.requests: deque[RequestRecord] = deque(maxlen=keep)
        self.steps: deque[StepRecord] = deque(maxlen=keep)
        self.totals = {"requests": 0, "prompt_tokens": 0, "cached_tokens": 0, "generated_tokens": 0,
                       "steps": 0, "decode_steps": 0, "collectives": 0, "bytes": 0, "refused": 0,
                       "decode_collectives": 0, "verify_steps": 0, "verify_tokens": 0, "drafted": 0, "accepted": 0,
                       "link_s": 0.0}
        self.outcomes: dict[str, int] = {}
        self.gauges: dict = {}  # queue depth, running, KV used/capacity, ...: the latest values

    def request(self, r: RequestRecord) -> None:
        with self._lock:
            self.requests.append(r)
            self.outcomes[r.outcome] = self.outcomes.get(r.outcome, 0) + 1
            t = self.totals
            t["requests"] += 1
            t["prompt_tokens"] += r.prompt_tokens
            t["cached_tokens"] += r.cached_tokens
            t["generated_tokens"] += r.generated_tokens

    def speculated(self, drafted: int, accepted: int, tokens: int) -> None:
        with self._lock:
            t = self.totals
            t["verify_steps"] += 1
            t["verify_tokens"] += tokens
            t["drafted"] += drafted
            t["accepted"] += accepted

    def refused(self) -> None:
        with self._lock:
            self.totals["refused"] += 1

    def step(self, s: StepRecord) -> None:
        with self._lock:
            self.steps.append(s)
            t = self.totals
            t["steps"] += 1
            t["decode_steps"] += s.batch > 0
            t["collectives"] += s.collectives
            t["decode_collectives"] += s.collectives if s.batch else 0
            t["bytes"] += s.bytes
            t["link_s"] += s.link_s

    def set(self, **gauges) -> None:
        with self._lock:
            self.gauges.update(gauges)

    def snapshot(self, recent: int = 0) -> dict:
        """Totals, outcomes and gauges; with `recent`, the last requests and steps too."""
        with self._lock:
            t = self.totals
            out = {"totals": dict(t), "outcomes": dict(self.outcomes), **self.gauges,
                   # decode collectives per generated token: the figure that compares plain and speculative runs
                   "collectives_per_generated_token": t["decode_collectives"] / t["generated_tokens"]
                   if t["generated_tokens"] else None,
                   "speculative": {"drafted": t["drafted"], "accepted": t["accepted"],
                                   "acceptance_rate": t["accepted"] / t["drafted"] if t["drafted"] else None,
                                   "tokens_per_verify_step": t["verify_tokens"] / t["verify_steps"]
                                   if t["verify_steps"] else None}}
            if recent:
                out["recent_requests"] = [asdict(r) for r in list(self.requests)[-recent:]]
                out["recent_steps"] = [asdict(s) for s in list(self.steps)[-recent:]]
            return out
