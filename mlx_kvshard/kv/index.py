"""Rank 0's index of the prefix cache: a tree of token blocks (a radix tree whose edges
are fixed-size blocks of `block_tokens` tokens). The KV stays on every rank, each its own
heads' slice of each block, by block id (store.py).

A block's KV at position i depends only on tokens 0..i (causal attention), so a block is
keyed by its tokens under its parent: a prefix shared by many prompts is one chain of
blocks, stored once. A prompt's hit is the longest chain of whole blocks it starts with,
plus the longest common prefix with one child of the chain's last block (any first
positions of a block are exact too: that is the partial block). The tail of an inserted
sequence that does not fill a block is kept as a short leaf block; an insertion that
covers it later replaces it.

Lookups walk one dict per block of the prompt (hashing its tokens) and, for the partial
block, look only at the children of the last matched block that start with the same
token: never every block. Eviction is LRU over leaf blocks (a heap keyed by last use;
an inner block becomes a leaf when its last child goes), within `max_bytes` counted at
the largest rank's KV bytes per token. Pure Python.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field


@dataclass
class Hit:
    block: int  # the last block used: the hit is the first `tokens` positions of its chain
    tokens: int  # prompt positions reused


@dataclass
class Insert:
    """New blocks for positions [start, end) of a sequence: ids first, first + 1, ... (each
    `block_tokens` long, the last one possibly shorter), chained from `parent` (-1: root)."""
    start: int
    end: int
    first: int
    parent: int


@dataclass(eq=False)
class Block:
    id: int
    parent: Block | None
    tokens: tuple[int, ...]
    used: int = 0  # clock of the last hit or insertion through it (a parent's >= its children's)
    children: dict = field(default_factory=dict)  # tokens -> Block
    by_first: dict = field(default_factory=dict)  # first token -> {Block}: the partial-hit candidates


def common_prefix(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class BlockIndex:
    def __init__(self, max_bytes: int, bytes_per_token: int, block_tokens: int = 64, min_tokens: int = 16):
        self.max_bytes = max_bytes
        self.bytes_per_token = bytes_per_token
        self.block_tokens = block_tokens
        self.min_tokens = min_tokens
        self.root = Block(-1, None, ())
        self.blocks: dict[int, Block] = {}
        self._leaves: list[tuple[int, int]] = []  # heap of (used, id); stale entries skipped
        self._clock = 0
        self._next_id = 0
        self.tokens = 0  # positions held, all blocks together
        self.hits = self.misses = self.evictions = 0

    def __len__(self) -> int:
        return len(self.blocks)

    @property
    def bytes(self) -> int:
        return self.tokens * self.bytes_per_token

    # ---- lookups ----------------------------------------------------------------------

    def _chain(self, tokens: list[int]) -> list[Block]:
        """The whole blocks `tokens` starts with, from the root."""
        node, chain, b = self.root, [], self.block_tokens
        for i in range(0, len(tokens) - b + 1, b):
            node = node.children.get(tuple(tokens[i:i + b]))
            if node is None:
                break
            chain.append(node)
        return chain

    def _partial(self, node: Block, rest: tuple[int, ...]) -> tuple[Block | None, int]:
        """The child of `node` sharing the most first tokens with `rest`."""
        best, most = None, 0
        for child in node.by_first.get(rest[0], ()) if rest else ():
            n = common_prefix(child.tokens, rest)
            if n > most:
                best, most = child, n
        return best, most

    def lookup(self, prompt: list[int]) -> Hit | None:
        """The longest reusable prefix (always leaving one prompt token to compute, for its logits)."""
        limit = len(prompt) - 1
        chain = self._chain(prompt[:limit])
        n = len(chain) * self.block_tokens
        child, more = self._partial(chain[-1] if chain else self.root, tuple(prompt[n:limit]))
        if child is not None:
            chain.append(child)
            n += more
        if n < self.min_tokens:
            self.misses += 1
            return None
        self.hits += 1
        self._touch(chain)
        return Hit(chain[-1].id, n)

    # ---- insertion and eviction -------------------------------------------------------

    def insert(self, tokens: list[int]) -> tuple[Insert | None, list[int]]:
        """Keep `tokens`' KV: the blocks not cached yet (None: all are, or too short or too
        large to keep), and the blocks to evict for them."""
        if len(tokens) < self.min_tokens:
            return None, []
        chain = self._chain(tokens)
        start = len(chain) * self.block_tokens
        node = chain[-1] if chain else self.root
        rest = tuple(tokens[start:])
        covering, n = self._partial(node, rest)
        if not rest or (covering is not None and n == len(rest)):  # already cached (the tail inside a block)
            self._touch(chain + ([covering] if covering else []))
            return None, []
        need = len(rest)
        if need * self.bytes_per_token > self.max_bytes:
            return None, []
        self._touch(chain)
        evict = [c.id for c in node.by_first.get(rest[0], ()) if len(c.tokens) < len(rest) and not c.children
                 and c.tokens == rest[:len(c.tokens)]]  # short leaves the new blocks cover
        for i in evict:
            self._remove(self.blocks[i])
        keep = {id(b) for b in chain}
        evict += self._make_room(need, keep)
        self.evictions += len(evict)
        if (self.tokens + need) * self.bytes_per_token > self.max_bytes:  # the chain it extends fills the cache
            return None, evict
        self._clock += 1
        first, parent = self._next_id, node
        for s in range(0, len(rest), self.block_tokens):
            block = Block(self._next_id, parent, rest[s:s + self.block_tokens], self._clock)
            self._next_id += 1
            parent.children[block.tokens] = block
            parent.by_first.setdefault(block.tokens[0], set()).add(block)
            self.blocks[block.id] = block
            self.tokens += len(block.tokens)
            parent = block
        self._push(parent)
        return Insert(start, len(tokens), first, node.id), evict

    def _make_room(self, need: int, keep: set) -> list[int]:
        """Evict least recently used leaves (none in `keep`) until `need` more tokens fit."""
        out, skipped = [], []
        while (self.tokens + need) * self.bytes_per_token > self.max_bytes and self._leaves:
            used, i = heapq.heappop(self._leaves)
            block = self.blocks.get(i)
            if block is None or block.used != used or block.children:
                continue  # stale: evicted, touched since (a newer entry exists), or no longer a leaf
            if id(block) in keep:
                skipped.append((used, i))
                continue
            out.append(i)
            self._remove(block)
        for entry in skipped:
            heapq.heappush(self._leaves, entry)
        return out

    def _push(self, block: Block) -> None:
        """`block` is a leaf, last used now: its (newest) heap entry."""
        heapq.heappush(self._leaves, (block.used, block.id))
        if len(self._leaves) > 4 * len(self.blocks) + 64:  # every hit pushes one: drop the stale entries
            self._leaves = [(b.used, b.id) for b in self.blocks.values() if not b.children]
            heapq.heapify(self._leaves)

    def _remove(self, block: Block) -> None:
        parent = block.parent
        del parent.children[block.tokens]
        siblings = parent.by_first[block.tokens[0]]
        siblings.discard(block)
        if not siblings:
            del parent.by_first[block.tokens[0]]
        del self.blocks[block.id]
        self.tokens -= len(block.tokens)
        if parent is not self.root and not parent.children:
            self._push(parent)

    def _touch(self, chain: list[Block]) -> None:
        self._clock += 1
        for block in chain:
            block.used = self._clock
        if chain and not chain[-1].children:
            self._push(chain[-1])
