"""Rank 0's index of the prefix cache. The KV itself stays on every rank (each its own
heads' slice, by entry id, see batch.py); rank 0 alone decides hits, insertions and
evictions and sends them in the step message, so every rank agrees on what is cached.

An entry is a prompt's token ids. A new prompt sharing its first k tokens reuses those k
positions (causal attention: position i's KV depends only on tokens 0..i). LRU, bounded
by bytes counted at the largest rank's KV bytes per token. Pure Python.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass
class Hit:
    entry: int
    tokens: int  # prompt positions reused


def common_prefix(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    """Length of the common prefix: a binary search over slice comparisons, which run in C
    (a loop in Python over every token of every entry cost ~2% of a served step)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n - 1  # a[:lo] == b[:lo]; a[:hi + 1] != b[:hi + 1]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class PrefixIndex:
    def __init__(self, max_bytes: int, bytes_per_token: int, min_tokens: int = 16):
        self.max_bytes = max_bytes
        self.bytes_per_token = bytes_per_token
        self.min_tokens = min_tokens
        self._entries: OrderedDict[int, tuple[int, ...]] = OrderedDict()  # oldest first
        self._next_id = 0
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, prompt: list[int]) -> Hit | None:
        """The longest reusable prefix (always leaving one prompt token to compute, for its logits)."""
        best, prompt = None, tuple(prompt)
        for entry, tokens in self._entries.items():
            n = min(common_prefix(tokens, prompt), len(prompt) - 1)
            if n >= self.min_tokens and (best is None or n > best.tokens):
                best = Hit(entry, n)
        if best is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(best.entry)
        return best

    def insert(self, prompt: list[int]) -> tuple[int | None, list[int]]:
        """Decide whether to keep `prompt`'s KV: (new entry id or None, entries to evict).
        An entry the new prompt extends is dropped (the new one covers it)."""
        need, prompt = len(prompt) * self.bytes_per_token, tuple(prompt)
        if len(prompt) < self.min_tokens or need > self.max_bytes:
            return None, []
        evict = []
        for entry, tokens in self._entries.items():
            if common_prefix(tokens, prompt) == len(tokens):
                if len(tokens) == len(prompt):
                    self._entries.move_to_end(entry)
                    return None, []  # already cached
                evict.append(entry)
        used = self.bytes - sum(len(self._entries[e]) for e in evict) * self.bytes_per_token
        for entry, tokens in self._entries.items():  # then the least recently used
            if used + need <= self.max_bytes:
                break
            if entry not in evict:
                evict.append(entry)
                used -= len(tokens) * self.bytes_per_token
        for entry in evict:
            self.bytes -= len(self._entries.pop(entry)) * self.bytes_per_token
        entry, self._next_id = self._next_id, self._next_id + 1
        self._entries[entry] = tuple(prompt)
        self.bytes += need
        return entry, evict
