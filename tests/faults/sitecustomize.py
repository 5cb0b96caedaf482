"""Fault injection for tests (on PYTHONPATH only in the tests that want it): with
MLX_KVSHARD_TEST_FAIL_STEP=N, rank 0's BatchState raises at step N, as an engine bug would."""

import os

if os.environ.get("MLX_KVSHARD_TEST_FAIL_STEP") and os.environ.get("MLX_RANK", "0") == "0":
    from mlx_kvshard.serving import batch

    _apply, _at = batch.BatchState.apply, int(os.environ["MLX_KVSHARD_TEST_FAIL_STEP"])

    def apply(self, step):
        if step.index >= _at and (step.decode or step.prefill):
            raise RuntimeError(f"injected fault at step {step.index}")
        return _apply(self, step)

    batch.BatchState.apply = apply
