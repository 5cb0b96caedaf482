"""The step message: what every rank executes this step, as int32 words.

Rank 0 writes it into a fixed-size buffer and the ranks `all_sum` it (the others
contribute zeros): one small collective per step, no pickle, no JSON. Layout:

    [n_words, step, op, args..., op, args..., ...]

Each op is its code followed by a fixed or counted list of int32 arguments:

    IDLE                                  park: wait for rank 0's wake-up off the ring
    STOP                                  the engine shuts down
    SAVE    uid, start, end, first, parent, persist
                                          keep positions [start, end) of batch row uid's KV as new
                                          prefix blocks first, first+1, ... chained from block
                                          parent (a finished chat turn), before it leaves; persist:
                                          write them to the disk tier too
    REMOVE  uid                           drop a sequence (finished or cancelled), free its KV
    DROP    n, block*n                    evict prefix-cache blocks (at most MAX_DROPS a message:
                                          the scheduler spreads more over the following steps)
    UNLINK  n, block*n                    delete disk-tier blocks (at most MAX_DROPS a message)
    DISKOFF                               the disk tier stops on every rank (a rank's disk failed)
    LOAD    parent, n, block*n            read disk blocks (a chain from block parent) back into
                                          RAM; every rank checks its slices, one all_gather agrees
                                          how many leading ones every rank read (at most MAX_LOADS)
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
    PUT     uid, start, end, first, parent, persist
                                          as SAVE, from uid's prefill cache
    AUDIT                                 every rank reports its rows and KV (a gather)
    MICRO   k                             with DECODE, --pp only: k tokens per row, the rows in S
                                          micro-batches in flight (pipeline/batch.py)

Every list is bounded by construction, so `capacity` words always suffice: SAVE, REMOVE,
JOIN, PUT and the PREFILL headers are at most one per admitted sequence (max_batch), the
PREFILL tokens of a step at most prefill_step, DRAFT at most max_drafts, TRIM one, and the
evictions and disk deletions at most MAX_DROPS each and disk loads MAX_LOADS (lists with no
natural bound: one long insertion can evict thousands of short entries; the rest wait in
the scheduler for the next messages).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

IDLE, STOP, REMOVE, DROP, JOIN, DECODE, PREFILL, PUT, AUDIT, SAVE, TRIM, DRAFT, LOAD, UNLINK, DISKOFF = range(1, 16)
MICRO = 64  # apart from the numbered ops above, so one added beside it cannot take its code
HEADER = 2
MAX_DROPS = 256  # evictions (and disk deletions) one step message carries
MAX_LOADS = 64  # disk blocks one step loads back


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
    """One step's decision, in execution order: trims, saved rows, removals, disk deletions,
    the disk tier's stop, a disk load, joins, the decode (a verify when it carries drafts),
    prefill chunks, new prefix entries, evictions, then an audit."""
    index: int = 0
    trim: list[tuple[int, int]] = field(default_factory=list)  # (uid, positions to drop)
    idle: bool = False
    stop: bool = False
    save: list[tuple[int, ...]] = field(default_factory=list)  # (uid, start, end, first, parent, persist)
    remove: list[int] = field(default_factory=list)
    drop: list[int] = field(default_factory=list)
    unlink: list[int] = field(default_factory=list)  # disk blocks to delete
    disk_off: bool = False
    load: tuple[int, list[int]] | None = None  # (parent, disk blocks to read back), before the decode
    join: list[int] = field(default_factory=list)
    decode: list[tuple[int, int]] = field(default_factory=list)  # (uid, input token) per batch row
    drafts: list[int] = field(default_factory=list)  # proposals after the one decode row's token
    prefill: list[Prefill] = field(default_factory=list)
    put: list[tuple[int, ...]] = field(default_factory=list)  # (uid, start, end, first, parent, persist)
    audit: bool = False
    micro: int = 0  # --pp: the decode runs this many tokens per row, micro-batched over the stages



def engine_capacity(settings) -> int:
    """The step message size for an engine's settings: rank 0 and every other rank must agree."""
    return capacity(settings.max_batch, settings.prefill_step, max_drafts=settings.max_drafts,
                    disk=settings.prefix_cache_dir is not None)


def capacity(max_batch: int, prefill_step: int, max_drops: int = MAX_DROPS, max_drafts: int = 0,
             disk: bool = False) -> int:
    """Words a step can need: every op at its most (the scheduler stays within it)."""
    per_seq = 7 + 2 + 2 + 2 + 7 + 7  # SAVE, REMOVE, JOIN, DECODE row, PREFILL header, PUT
    spec = 3 + 2 + max_drafts if max_drafts else 0  # TRIM, DRAFT
    tier = 2 + max_drops + 1 + 3 + MAX_LOADS if disk else 0  # UNLINK, DISKOFF, LOAD
    return HEADER + 4 + 2 * max_batch * per_seq + prefill_step + 2 + max_drops + spec + tier + 2  # + MICRO


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
    if step.unlink:
        if len(step.unlink) > MAX_DROPS:
            raise AssertionError(f"{len(step.unlink)} disk deletions in one step message (at most {MAX_DROPS})")
        words += [UNLINK, len(step.unlink), *step.unlink]
    if step.disk_off:
        words.append(DISKOFF)
    if step.load is not None:
        parent, ids = step.load
        if not 0 < len(ids) <= MAX_LOADS:
            raise AssertionError(f"{len(ids)} disk loads in one step message (1 to {MAX_LOADS})")
        words += [LOAD, parent, len(ids), *ids]
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
    if step.micro:
        words += [MICRO, step.micro]
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
        elif op == UNLINK:
            n = w[i]
            step.unlink = w[i + 1:i + 1 + n]
            i += 1 + n
        elif op == DISKOFF:
            step.disk_off = True
        elif op == LOAD:
            parent, n = w[i:i + 2]
            step.load = (parent, w[i + 2:i + 2 + n])
            i += 2 + n
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
            step.put.append(tuple(w[i:i + 6])); i += 6
        elif op == SAVE:
            step.save.append(tuple(w[i:i + 6])); i += 6
        elif op == AUDIT:
            step.audit = True
        elif op == MICRO:
            step.micro = w[i]; i += 1
        else:
            raise AssertionError(f"unknown op {op} at word {i - 1} of step {step.index}: ranks out of sync")
    return step
