"""KV memory (issue 17): the prefix cache as shared fixed-size token blocks.

- `index.py` (rank 0, pure Python): the block tree, hits, insertions, LRU eviction of leaf
  blocks within --prefix-cache-bytes. Rank 0 decides everything; the ranks learn it from
  the step message (PREFILL's hit, PUT/SAVE's new blocks, DROP's evictions).
- `store.py` (every rank, MLX): the KV of each block for this rank's heads, by block id.

The running batch's layout (left-padded `BatchKVCache` rows) stays in serving/batch.py
and engine/kvcache.py for now.
"""
