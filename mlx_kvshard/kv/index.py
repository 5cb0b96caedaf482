"""Rank 0's index of the prefix cache: a tree of token blocks (a radix tree whose edges
are fixed-size blocks of `block_tokens` tokens). The KV stays on every rank, each its own
heads' slice of each block, by block id (store.py; on disk, disk.py).

A block's KV at position i depends only on tokens 0..i (causal attention), so a block is
keyed by its tokens under its parent: a prefix shared by many prompts is one chain of
blocks, stored once. A prompt's hit is the longest chain of whole blocks it starts with,
plus the longest common prefix with one child of the chain's last block (any first
positions of a block are exact too: that is the partial block). The tail of an inserted
sequence that does not fill a block is kept as a short leaf block; an insertion that
covers it later replaces it.

Lookups walk one dict per block of the prompt (hashing its tokens) and, for the partial
block, look only at the children of the last matched block that start with the same
token: never every block. Pure Python.

Two tiers (the disk one with --prefix-cache-dir). A block is in RAM, on disk, or both. A
new block is written through to disk when its parent is on disk and the disk budget holds
it, so both sets stay closed under parents: a chain is RAM blocks, then disk-only blocks.
Eviction is LRU per tier over that tier's leaves (a heap keyed by last use; a block
becomes a leaf when its last child in the tier goes), within `max_bytes` (RAM) and
`disk_bytes`, counted at the largest rank's KV bytes per token. A block evicted from RAM
that is on disk stays in the tree as a disk block; a hit on disk blocks loads them back
into RAM first (`plan_load`, then `loaded` with what every rank could read).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field


@dataclass
class Hit:
    block: int  # the last block used: the hit is the first `tokens` positions of its chain
    tokens: int  # prompt positions reused
    load: list[int] = field(default_factory=list)  # disk-only blocks of the chain, in order: loaded first


@dataclass
class Insert:
    """New blocks for positions [start, end) of a sequence: ids first, first + 1, ... (each
    `block_tokens` long, the last one possibly shorter), chained from `parent` (-1: root);
    `persist`: the ranks write them to disk too."""
    start: int
    end: int
    first: int
    parent: int
    persist: bool = False


@dataclass(eq=False)
class Block:
    id: int
    parent: Block | None
    tokens: tuple[int, ...]
    used: int = 0  # clock of the last hit or insertion through it (a parent's >= its children's)
    children: dict = field(default_factory=dict)  # tokens -> Block
    by_first: dict = field(default_factory=dict)  # first token -> {Block}: the partial-hit candidates
    ram: bool = True
    disk: bool = False
    ram_kids: int = 0  # children in RAM (a RAM leaf has none)
    disk_kids: int = 0  # children on disk


def common_prefix(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class BlockIndex:
    def __init__(self, max_bytes: int, bytes_per_token: int, block_tokens: int = 64, min_tokens: int = 16,
                 disk_bytes: int = 0):
        self.max_bytes = max_bytes
        self.disk_bytes = disk_bytes  # 0: no disk tier
        self.bytes_per_token = bytes_per_token
        self.block_tokens = block_tokens
        self.min_tokens = min_tokens
        self.root = Block(-1, None, ())
        self.blocks: dict[int, Block] = {}
        self._leaves: list[tuple[int, int]] = []  # RAM leaves: heap of (used, id); stale entries skipped
        self._disk_leaves: list[tuple[int, int]] = []
        self._clock = 0
        self._next_id = 0
        self.tokens = 0  # positions held in RAM, all blocks together
        self.disk_tokens = 0  # positions on disk
        self._count = {"ram": 0, "disk": 0}  # blocks per tier
        self.hits = self.misses = self.evictions = 0  # evictions: from RAM
        self.disk_evictions = 0
        self.tier_hits = {"ram": 0, "disk": 0}  # hits by the farthest tier they used
        self.tier_hit_tokens = {"ram": 0, "disk": 0}  # positions reused, by the tier that held them
        self.load_failures = 0  # blocks some rank could not read back (recomputed)
        self.unlinks: list[int] = []  # disk blocks to delete on every rank (the scheduler sends them)
        self.changed = 0  # bumped by every disk-tier change (rank 0 saves its manifest when it moved)
        self._dropped: list[int] = []  # RAM copies freed by the current call

    def __len__(self) -> int:
        return len(self.blocks)

    @property
    def bytes(self) -> int:
        return self.tokens * self.bytes_per_token

    @property
    def next_id(self) -> int:
        """The id the next new block gets (ids only grow)."""
        return self._next_id

    @property
    def disk_used(self) -> int:
        return self.disk_tokens * self.bytes_per_token

    def tier_blocks(self) -> dict[str, int]:
        return dict(self._count)

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

    def lookup(self, prompt: list[int], count: bool = True) -> Hit | None:
        """The longest reusable prefix (always leaving one prompt token to compute, for its
        logits). `count`: a final decision (counted, and its chain touched); the scheduler
        looks without counting while a hit waits for its disk blocks."""
        limit = len(prompt) - 1
        chain = self._chain(prompt[:limit])
        n = len(chain) * self.block_tokens
        child, more = self._partial(chain[-1] if chain else self.root, tuple(prompt[n:limit]))
        if child is not None:
            chain.append(child)
            n += more
        if n < self.min_tokens:
            if count:
                self.misses += 1
            return None
        if count:
            self.hits += 1
            self._touch(chain)
        return Hit(chain[-1].id, n, [b.id for b in chain if not b.ram])

    def in_ram(self, hit: Hit) -> Hit | None:
        """The part of `hit` already in RAM (None when shorter than min_tokens)."""
        if not hit.load:
            return hit
        first = self.blocks[hit.load[0]]
        if first.parent is self.root:
            return None
        ram = sum(len(b.tokens) for b in self._path(first.parent))
        return Hit(first.parent.id, ram) if ram >= self.min_tokens else None

    def counted(self, hit: Hit | None, from_disk: int = 0) -> None:
        """A hit (or miss) the scheduler used: counters, and its chain touched. `from_disk`:
        of its positions, those loaded back from disk for it."""
        if hit is None:
            self.misses += 1
            return
        self.hits += 1
        disk = min(from_disk, hit.tokens)
        self.tier_hits["disk" if disk else "ram"] += 1
        self.tier_hit_tokens["disk"] += disk
        self.tier_hit_tokens["ram"] += hit.tokens - disk
        self._touch(self._path(self.blocks[hit.block]))

    def _path(self, block: Block) -> list[Block]:
        out = []
        while block is not self.root:
            out.append(block)
            block = block.parent
        out.reverse()
        return out

    # ---- insertion and eviction -------------------------------------------------------

    def insert(self, tokens: list[int]) -> tuple[Insert | None, list[int]]:
        """Keep `tokens`' KV: the blocks not cached yet (None: all are, or too short or too
        large to keep), and the blocks whose RAM copies to free for them."""
        self._dropped = []
        if len(tokens) < self.min_tokens:
            return None, []
        chain = self._chain(tokens)
        for i, b in enumerate(chain):  # new blocks hang under RAM blocks: the sequence's own KV replaces disk ones
            if not b.ram:
                self._remove_subtree(b)
                chain = chain[:i]
                break
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
        for c in [c for c in node.by_first.get(rest[0], ()) if len(c.tokens) < len(rest) and not c.children
                  and c.tokens == rest[:len(c.tokens)]]:  # short leaves the new blocks cover
            self.evictions += 1
            self._remove_subtree(c)
        keep = {id(b) for b in chain}
        self._make_room(need, keep)
        evict, self._dropped = self._dropped, []
        if (self.tokens + need) * self.bytes_per_token > self.max_bytes:  # the chain it extends fills the cache
            return None, evict
        persist = False
        if self.disk_bytes and (node is self.root or node.disk) and need * self.bytes_per_token <= self.disk_bytes:
            self._make_room(need, keep, "disk")
            persist = (self.disk_tokens + need) * self.bytes_per_token <= self.disk_bytes
        self._clock += 1
        first, parent = self._next_id, node
        for s in range(0, len(rest), self.block_tokens):
            block = Block(self._next_id, parent, rest[s:s + self.block_tokens], self._clock)
            self._next_id += 1
            self._link(block)
            self._set_ram(block, True)
            if persist:
                self._set_disk(block, True)
            parent = block
        return Insert(start, len(tokens), first, node.id, persist), evict

    def plan_load(self, hit: Hit, most: int) -> tuple[int, list[int], list[int]]:
        """Bring up to `most` of `hit`'s disk blocks into RAM, as many as RAM can take:
        (the parent of the first, their ids, RAM copies freed for them). They count as RAM
        from now; `loaded` takes back those some rank could not read."""
        self._dropped = []
        chain = self._path(self.blocks[hit.block])
        want = [b for b in chain if not b.ram][:most]
        self._make_room(sum(len(b.tokens) for b in want), {id(b) for b in chain})
        room = self.max_bytes // self.bytes_per_token - self.tokens
        take = []
        for b in want:
            if len(b.tokens) > room:
                break
            room -= len(b.tokens)
            take.append(b)
        for b in take:
            self._set_ram(b, True)
        self._touch(chain)
        freed, self._dropped = self._dropped, []
        parent = take[0].parent.id if take else -1
        return parent, [b.id for b in take], freed

    def loaded(self, ids: list[int], valid: int) -> list[int]:
        """Every rank read the first `valid` of `ids` (plan_load's): the rest, and what hangs
        under them, are dropped from the index (deleted on disk; recomputed when next needed).
        Returns RAM copies to free (none, unless the index moved since plan_load)."""
        self._dropped = []
        if valid < len(ids):
            self.load_failures += len(ids) - valid
            for i in ids[valid:]:  # no rank holds them in RAM: nothing to free there
                if i in self.blocks:
                    self._set_ram(self.blocks[i], False)
            failed = self.blocks.get(ids[valid])  # (gone already if an insertion removed it since)
            if failed is not None:
                self._remove_subtree(failed)
        freed, self._dropped = self._dropped, []
        return freed

    def disk_off(self) -> None:
        """The disk tier stops (a rank's disk failed): disk-only blocks leave the index."""
        for b in [b for b in self.blocks.values() if not b.ram and (b.parent is self.root or b.parent.ram)]:
            self._remove_subtree(b, unlink=False)
        for b in self.blocks.values():
            if b.disk:
                self._set_disk(b, False)
        self.disk_bytes = 0
        self.unlinks = []

    def _make_room(self, need: int, keep: set, tier: str = "ram") -> None:
        """Free the least recently used leaves of `tier` (none in `keep`) until `need` more
        tokens fit there. A block also in the other tier stays in the tree (RAM: its copy on
        the ranks freed; disk: its files deleted); else it leaves the tree."""
        ram = tier == "ram"
        heap, limit = ("_leaves", self.max_bytes) if ram else ("_disk_leaves", self.disk_bytes)
        skipped = []
        while ((self.tokens if ram else self.disk_tokens) + need) * self.bytes_per_token > limit and getattr(self, heap):
            used, i = heapq.heappop(getattr(self, heap))
            block = self.blocks.get(i)
            if block is None or block.used != used or not getattr(block, tier) or (block.ram_kids if ram
                                                                                   else block.disk_kids):
                continue  # stale: evicted, touched since (a newer entry exists), or no longer a leaf
            if id(block) in keep:
                skipped.append((used, i))
                continue
            if ram:
                self.evictions += 1
            else:
                self.disk_evictions += 1
            if ram and block.disk:
                self._dropped.append(i)
                self._set_ram(block, False)
            elif not ram and block.ram:
                self.unlinks.append(i)
                self._set_disk(block, False)
            else:
                self._remove_subtree(block)
        for entry in skipped:
            heapq.heappush(getattr(self, heap), entry)

    # ---- tree and tier bookkeeping ----------------------------------------------------

    def _link(self, block: Block) -> None:
        parent = block.parent
        parent.children[block.tokens] = block
        parent.by_first.setdefault(block.tokens[0], set()).add(block)
        self.blocks[block.id] = block
        block.ram = block.disk = False
        self._next_id = max(self._next_id, block.id + 1)

    def _set_ram(self, block: Block, on: bool) -> None:
        if block.ram == on:
            return
        block.ram = on
        self._count["ram"] += 1 if on else -1
        self.tokens += len(block.tokens) if on else -len(block.tokens)
        parent = block.parent
        if parent is not self.root:
            parent.ram_kids += 1 if on else -1
            if not on and parent.ram and not parent.ram_kids:
                heapq.heappush(self._leaves, (parent.used, parent.id))
        if on and not block.ram_kids:
            self._push(block)

    def _set_disk(self, block: Block, on: bool) -> None:
        if block.disk == on:
            return
        block.disk = on
        self._count["disk"] += 1 if on else -1
        self.changed += 1
        self.disk_tokens += len(block.tokens) if on else -len(block.tokens)
        parent = block.parent
        if parent is not self.root:
            parent.disk_kids += 1 if on else -1
            if not on and parent.disk and not parent.disk_kids:
                heapq.heappush(self._disk_leaves, (parent.used, parent.id))
        if on and not block.disk_kids:
            heapq.heappush(self._disk_leaves, (block.used, block.id))

    def _remove_subtree(self, block: Block, unlink: bool = True) -> None:
        """Take `block` and everything under it out of the index: RAM copies freed, disk
        copies deleted (queued for the ranks)."""
        stack, order = [block], []
        while stack:
            b = stack.pop()
            order.append(b)
            stack.extend(b.children.values())
        for b in reversed(order):  # children first
            if b.ram:
                self._dropped.append(b.id)
                self._set_ram(b, False)
            if b.disk:
                if unlink:
                    self.unlinks.append(b.id)
                self._set_disk(b, False)
            parent = b.parent
            del parent.children[b.tokens]
            siblings = parent.by_first[b.tokens[0]]
            siblings.discard(b)
            if not siblings:
                del parent.by_first[b.tokens[0]]
            del self.blocks[b.id]

    def _push(self, block: Block) -> None:
        """`block` is a RAM leaf, last used now: its (newest) heap entry."""
        heapq.heappush(self._leaves, (block.used, block.id))
        if len(self._leaves) > 4 * len(self.blocks) + 64:  # every hit pushes one: drop the stale entries
            self._leaves = [(b.used, b.id) for b in self.blocks.values() if b.ram and not b.ram_kids]
            heapq.heapify(self._leaves)

    def _touch(self, chain: list[Block]) -> None:
        self._clock += 1
        for block in chain:
            block.used = self._clock
        if chain:
            last = chain[-1]
            if last.ram and not last.ram_kids:
                self._push(last)
            if last.disk and not last.disk_kids:
                heapq.heappush(self._disk_leaves, (last.used, last.id))
                if len(self._disk_leaves) > 4 * len(self.blocks) + 64:
                    self._disk_leaves = [(b.used, b.id) for b in self.blocks.values() if b.disk and not b.disk_kids]
                    heapq.heapify(self._disk_leaves)

    # ---- persistence (rank 0's manifest) ----------------------------------------------

    def manifest(self) -> list[list]:
        """The disk blocks, parents first: [id, parent id, tokens] each."""
        out, stack = [], [b for b in self.root.children.values() if b.disk]
        while stack:
            b = stack.pop()
            out.append([b.id, b.parent.id, list(b.tokens)])
            stack.extend(c for c in b.children.values() if c.disk)
        return out

    def restore(self, entries: list, next_id: int) -> None:
        """Rebuild the disk tier from a manifest (an empty index; parents listed first).
        Blocks past the disk budget, or whose parent is missing, are left out (and deleted)."""
        self._next_id = max(self._next_id, next_id)
        for entry in entries:
            try:
                i, parent_id, tokens = int(entry[0]), int(entry[1]), tuple(int(t) for t in entry[2])
            except (TypeError, ValueError, IndexError, KeyError):  # a damaged manifest: skip the entry
                continue
            parent = self.root if parent_id < 0 else self.blocks.get(parent_id)
            if parent is None or not tokens or tuple(tokens) in parent.children or i in self.blocks:
                self.unlinks.append(i)
                continue
            if (self.disk_tokens + len(tokens)) * self.bytes_per_token > self.disk_bytes:
                self.unlinks.append(i)
                continue
            block = Block(i, parent, tokens)
            self._link(block)
            self._set_disk(block, True)
        self.changed = 0
