"""The step message: what every rank executes this step, as int32 words.

Rank 0 writes it into a fixed-size buffer and the ranks `all_sum` it (the others
contribute zeros): one small collective per step, no pickle, no JSON. Layout:

    [n_words, step, op, args..., op, args..., ...]

Each op is its code followed by a fixed or counted list of int32 arguments:

    IDLE                                  park: wait for rank 0's wake-up off the ring
    STOP                                  the engine shuts down
    SAVE    uid, start, end, first, parent
                                          keep positions [start, end) of batch row uid's KV as new
                                          prefix blocks first, first+1, ... chained from block
                                          parent (a finished chat turn), before it leaves
    REMOVE  uid                           drop a sequence (finished or cancelled), free its KV
    DROP    n, block*n                    evict prefix-cache blocks (at most MAX_DROPS a message:
                                          the scheduler spreads more over the following steps)
    JOIN    uid                           a prefilled sequence becomes the last batch row
    TRIM    uid, n                        drop the last n positions of row uid's KV (a verify
                                          step's rejected drafts; executed first)
    DECODE  n, uid*n, token*n             one decode step for the batch rows (in row order)
    DRAFT   m, token*m                    with a one-row DECODE: a verify step, the row's input
                                          token then these m proposals in one forward
    PREFILL uid, start, entry, hit, last, n, token*n
                                          a prompt chunk at position `start`; the first chunk
                                          (start == hit) starts from the first `hit` positions
                                          of the prefix block chain ending at block `entry`
                                          (-1, 0: none)
    PUT     uid, start, end, first, parent
                                          as SAVE, from uid's prefill cache
    AUDIT                                 every rank reports its rows and KV (a gather)

Every list is bounded by construction, so `capacity` words always suffice: SAVE, REMOVE,
JOIN, PUT and the PREFILL headers are at most one per admitted sequence (max_batch), the
PREFILL tokens of a step at most prefill_step, DRAFT at most max_drafts, TRIM one, and the
evictions at most MAX_DROPS (the only list with no natural bound: one long insertion can
evict thousands of short entries; the rest wait in the scheduler for the next messages).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

IDLE, STOP, REMOVE, DROP, JOIN, DECODE, PREFILL, PUT, AUDIT, SAVE, TRIM, DRAFT = range(1, 13)
HEADER = 2
MAX_DROPS = 256  # evictions one step message carries


@dataclass
class Prefill:
    uid: int
    start: int
    tokens: list[int]
    last: bool
    entry: int = -1
    hit: int = 0


@dataclass
class Step:
    """One step's decision, in execution order: trims, saved rows, removals, joins, the
    decode (a verify when it carries drafts), prefill chunks, new prefix entries, evictions,
    then an audit."""
    index: int = 0
    trim: list[tuple[int, int]] = field(default_factory=list)  # (uid, positions to drop)
    idle: bool = False
    stop: bool = False
    save: list[tuple[int, int, int, int, int]] = field(default_factory=list)  # (uid, start, end, first, parent)
    remove: list[int] = field(default_factory=list)
    drop: list[int] = field(default_factory=list)
    join: list[int] = field(default_factory=list)
    decode: list[tuple[int, int]] = field(default_factory=list)  # (uid, input token) per batch row
    drafts: list[int] = field(default_factory=list)  # proposals after the one decode row's token
    prefill: list[Prefill] = field(default_factory=list)
    put: list[tuple[int, int, int, int, int]] = field(default_factory=list)  # (uid, start, end, first, parent)
    audit: bool = False



def engine_capacity(settings) -> int:
    """The step message size for an engine's settings: rank 0 and every other rank must agree."""
    return capacity(settings.max_batch, settings.prefill_step, max_drafts=settings.max_drafts)


def capacity(max_batch: int, prefill_step: int, max_drops: int = MAX_DROPS, max_drafts: int = 0) -> int:
    """Words a step can need: every op at its most (the scheduler stays within it)."""
    per_seq = 6 + 2 + 2 + 2 + 7 + 6  # SAVE, REMOVE, JOIN, DECODE row, PREFILL header, PUT
    spec = 3 + 2 + max_drafts if max_drafts else 0  # TRIM, DRAFT
    return HEADER + 4 + 2 * max_batch * per_seq + prefill_step + 2 + max_drops + spec


def encode(step: Step, size: int) -> np.ndarray:
    words = [0, step.index]
    if step.idle:
        words.append(IDLE)
    if step.stop:
        words.append(STOP)
    for uid, n in step.trim:
        words += [TRIM, uid, n]
    for save in step.save:
        words += [SAVE, *save]
    for uid in step.remove:
        words += [REMOVE, uid]
    if step.drop:
        if len(step.drop) > MAX_DROPS:
            raise AssertionError(f"{len(step.drop)} evictions in one step message (at most {MAX_DROPS})")
        words += [DROP, len(step.drop), *step.drop]
    for uid in step.join:
        words += [JOIN, uid]
    if step.decode:
        uids, tokens = zip(*step.decode)
        words += [DECODE, len(uids), *uids, *tokens]
    if step.drafts:
        words += [DRAFT, len(step.drafts), *step.drafts]
    for p in step.prefill:
        words += [PREFILL, p.uid, p.start, p.entry, p.hit, int(p.last), len(p.tokens), *p.tokens]
    for put in step.put:
        words += [PUT, *put]
    if step.audit:
        words.append(AUDIT)
    if len(words) > size:
        raise AssertionError(f"step message of {len(words)} words exceeds its buffer of {size}: a list the "
                             f"scheduler should have bounded (see the module docstring)")
    words[0] = len(words)
    buf = np.zeros(size, dtype=np.int32)
    buf[:len(words)] = words
    return buf


def decode(buf: np.ndarray) -> Step:
    w = buf[:int(buf[0])].tolist()
    step = Step(index=w[1])
    i = HEADER
    while i < len(w):
        op = w[i]
        i += 1
        if op == IDLE:
            step.idle = True
        elif op == STOP:
            step.stop = True
        elif op == REMOVE:
            step.remove.append(w[i]); i += 1
        elif op == DROP:
            n = w[i]
            step.drop = w[i + 1:i + 1 + n]
            i += 1 + n
        elif op == JOIN:
            step.join.append(w[i]); i += 1
        elif op == DECODE:
            n = w[i]
            step.decode = list(zip(w[i + 1:i + 1 + n], w[i + 1 + n:i + 1 + 2 * n]))
            i += 1 + 2 * n
        elif op == DRAFT:
            n = w[i]
            step.drafts = w[i + 1:i + 1 + n]
            i += 1 + n
        elif op == TRIM:
            step.trim.append(tuple(w[i:i + 2])); i += 2
        elif op == PREFILL:
            uid, start, entry, hit, last, n = w[i:i + 6]
            step.prefill.append(Prefill(uid, start, w[i + 6:i + 6 + n], bool(last), entry, hit))
            i += 6 + n
        elif op == PUT:
            step.put.append(tuple(w[i:i + 5])); i += 5
        elif op == SAVE:
            step.save.append(tuple(w[i:i + 5])); i += 5
        elif op == AUDIT:
            step.audit = True
        else:
            raise AssertionError(f"unknown op {op} at word {i - 1} of step {step.index}: ranks out of sync")
    return step
