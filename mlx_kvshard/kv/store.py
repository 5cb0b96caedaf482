"""One rank's prefix-cache blocks in RAM: for each block id (rank 0's index.py names them), its
parent and, per layer, a single-stream cache (KVCache, or QuantizedKVCache with
--kv-bits) holding this rank's heads at the block's positions. Every rank executes the
same PUT/SAVE/DROP messages, so every rank holds the same ids."""

from __future__ import annotations

import zlib

import mlx.core as mx
import numpy as np

from ..engine.kvcache import joined_copy, slice_copy


class BlockStore:
    def __init__(self, block_tokens: int):
        self.block_tokens = block_tokens
        self.blocks: dict[int, tuple[int, list]] = {}  # id -> (parent id or -1, per-layer cache)

    def __len__(self) -> int:
        return len(self.blocks)

    def put(self, caches: list, start: int, end: int, first: int, parent: int) -> list[int]:
        """Keep positions [start, end) of a sequence's per-layer caches as blocks first, first + 1, ...
        (returns their ids)"""
        made, ids = [], []
        for i, s in enumerate(range(start, end, self.block_tokens)):
            layers = [slice_copy(c, s, min(s + self.block_tokens, end)) for c in caches]
            self.blocks[first + i] = (parent if i == 0 else first + i - 1, layers)
            made += layers
            ids.append(first + i)
        mx.eval([c.state for c in made])
        return ids

    def adopt(self, block: int, parent: int, layers: list) -> None:
        """A block read back from the disk tier."""
        mx.eval([c.state for c in layers])
        self.blocks[block] = (parent, layers)

    def __contains__(self, block: int) -> bool:
        return block in self.blocks

    def drop(self, ids: list[int]) -> None:
        for i in ids:  # (a block whose disk load failed on some rank was never adopted: nothing to drop)
            self.blocks.pop(i, None)

    def start(self, last: int, tokens: int) -> list:
        """Per layer, a new cache holding the first `tokens` positions of the chain ending at block `last`."""
        chain = []
        while last >= 0:
            last, layers = self.blocks[last]
            chain.append(layers)
        chain.reverse()
        return [joined_copy([blk[layer] for blk in chain], tokens) for layer in range(len(chain[0]))]

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for _, layers in self.blocks.values() for c in layers)

    def summary(self) -> list[int]:
        """[blocks, checksum of their ids]: what --check-sync compares across ranks (never the list)."""
        return [len(self.blocks), zlib.crc32(np.array(sorted(self.blocks), np.int64).tobytes())]
