"""The serving engine: ranks that stay up and run many requests at once.

Rank 0 runs the scheduler and the `Engine` API; every step it sends every rank one
compact int32 step message (wire.py), and every rank, rank 0 included, executes it on
its own slice of the batched KV cache (batch.py). Only rank 0 samples; its tokens reach
the others inside the next step's message, so every rank feeds the same tokens.
"""
