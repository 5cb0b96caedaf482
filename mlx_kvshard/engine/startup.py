"""Start one rank: join the group, resolve the model, build the plan, load this rank's
shard, and share the load verdict. What `generate` and the serving engine both do first."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import ModelConfig
from ..errors import UserError
from ..settings import RankSettings


@dataclass
class LoadedRank:
    comm: Any  # engine.dist.Comm
    plan: Any  # plan.ShardPlan
    cfg: ModelConfig
    model_dir: Path
    tokenizer: Any  # mlx-lm TokenizerWrapper
    model: Any  # engine.model.ShardedModel
    dtype: Any  # mx.Dtype or None (the checkpoint's)
    dtype_name: str
    max_context: int
    load_s: float


def load_tokenizer(model_dir: Path, cfg: ModelConfig):
    from mlx_lm.tokenizer_utils import load as mlx_load_tokenizer

    from .rank import eos_token_ids

    try:
        return mlx_load_tokenizer(model_dir, eos_token_ids=eos_token_ids(model_dir, cfg))
    except Exception as e:
        raise UserError(f"{model_dir}: could not load the tokenizer ({type(e).__name__}: {e})") from None


def start_rank(settings: RankSettings, live) -> LoadedRank:
    import mlx.core as mx

    from ..cli.generate import default_dtype
    from ..models.resolve import resolve_model_dir
    from ..plan import ShardPlan
    from .dist import agree, init_comm
    from .loader import load_rank_model

    comm = live.join(lambda: init_comm(settings.sharding.backend))
    if settings.sharding.link:
        from ..planner.profiles import load_link

        comm.emulate_link(load_link(settings.sharding.link))
    model_dir = resolve_model_dir(settings.model.source)
    cfg = ModelConfig.from_file(model_dir)
    tokenizer = load_tokenizer(model_dir, cfg)
    name = default_dtype(settings.model.dtype)
    dtype = None if name == "auto" else getattr(mx, name)
    dtype_name = str(dtype).split(".")[-1] if dtype is not None else cfg.dtype
    max_context = settings.model.max_context or cfg.max_position_embeddings or 4096
    shares = list(settings.sharding.shares) if settings.sharding.shares else None
    plan = ShardPlan.build(cfg, comm.world, shares, compute_dtype=dtype_name,
                           vocab_parallel=settings.sharding.vocab_parallel)
    mx.reset_peak_memory()
    t_load = time.perf_counter()
    error = model = None
    try:
        model = load_rank_model(Path(model_dir), plan, comm, dtype, progress=_to_stderr if comm.rank == 0 else None)
    except UserError as e:
        error = str(e)
    agree(comm, error)  # a load failure on any rank stops all of them
    return LoadedRank(comm, plan, cfg, Path(model_dir), tokenizer, model, dtype, dtype_name, max_context,
                      time.perf_counter() - t_load)


def _to_stderr(line: str) -> None:
    print(f"mlx-kvshard: {line}", file=sys.stderr, flush=True)
