"""Build one rank's model and load only its slices of the checkpoint."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .dist import Comm
from ..errors import UserError
from .model import ShardedModel
from ..models.gguf.modeldir import open_checkpoint
from ..plan import ShardPlan
from .sharding import tensor_slice


def load_rank_model(model_dir: Path, plan: ShardPlan, comm: Comm, dtype: mx.Dtype | None = None,
                    progress: Callable[[str], None] | None = None) -> ShardedModel:
    """`progress`, when given, receives a line every few seconds while slices load."""
    cfg = plan.config
    shard = plan.shards[comm.rank]
    vocab_sizes = [s.local_vocab(cfg.vocab_size) for s in plan.shards] if plan.vocab_parallel else None
    model = ShardedModel(cfg, shard, comm, vocab_sizes, kv=plan.kv)
    return load_slices(model, model_dir, shard, cfg, comm.rank, dtype, progress)


def load_slices(model: nn.Module, model_dir: Path, shard, cfg, rank: int, dtype: mx.Dtype | None = None,
                progress: Callable[[str], None] | None = None,
                checkpoint_name: Callable[[str], str] = lambda name: name) -> nn.Module:
    """Fill `model`'s parameters with `shard`'s slices of the checkpoint; `checkpoint_name`
    maps a parameter's (or module's) name to the checkpoint's (a pipeline stage numbers its
    layers from 0)."""
    ckpt = open_checkpoint(model_dir)  # safetensors, or the GGUF file the directory was derived from
    if cfg.quantization or cfg.quant_overrides:
        overrides = dict(cfg.quant_overrides)

        def stored_as(local: str, module: nn.Module):
            """As mlx-lm decides: a module's own entry in config.json first, else the defaults
            for exactly the modules the checkpoint stores quantized."""
            path = checkpoint_name(local)
            q = overrides[path] if path in overrides else (
                cfg.quantization if f"{path}.scales" in ckpt else None)
            return False if q is None else q.params()

        nn.quantize(model, class_predicate=stored_as)
    weights = []
    params = tree_flatten(model.parameters())
    t_last = time.monotonic()
    loaded = 0
    for i, (name, param) in enumerate(params):
        source = checkpoint_name(name)
        if source not in ckpt:
            raise UserError(f"{model_dir}: tensor {source} is missing from the checkpoint; "
                            f"the weights do not match config.json ({cfg.model_type})")
        sl = tensor_slice(source, shard, cfg)
        full = list(ckpt.shape(source))
        want = list(param.shape)
        if sl.axis is not None:
            want[sl.axis] = sl.global_extent
        if full != want:
            raise UserError(f"{model_dir}: tensor {source} has shape {full} but config.json implies "
                            f"{want}; the checkpoint and config.json disagree")
        if sl.zero:
            arr = mx.zeros(param.shape, dtype=param.dtype if dtype is None else dtype)
        else:
            arr = ckpt.read(source, sl.axis, sl.start, sl.stop)
        if dtype is not None and mx.issubdtype(arr.dtype, mx.floating):
            arr = arr.astype(dtype)
        mx.eval(arr)  # materialize slice by slice: peak memory stays at this rank's share
        weights.append((name, arr))
        loaded += arr.nbytes
        if progress and time.monotonic() - t_last > 5:
            t_last = time.monotonic()
            progress(f"loading rank {rank}'s shard: {i + 1}/{len(params)} tensors, "
                     f"{loaded / 2**30:.2f} GiB")
    if rank == 0 and progress and (line := getattr(ckpt, "summary", lambda: None)()):
        progress(line)  # GGUF tensors that could not map exactly, with their measured error
    model.load_weights(weights, strict=True)
    mx.eval(model.parameters())
    return model


def parameter_bytes(model: nn.Module) -> int:
    return sum(p.nbytes for _, p in tree_flatten(model.parameters()))
