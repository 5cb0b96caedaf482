"""Start one rank from typed settings: join the group, resolve the model, load the
tokenizer and this rank's shard, and agree that every rank got there. No command line:
`generate` (engine/rank.py), the serving engine and the server all start ranks here."""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import ModelConfig
from ..errors import UserError
from ..plan import ShardPlan
from ..settings import ModelSettings, RankSettings

if TYPE_CHECKING:  # MLX-free at import: the CLI checks settings before any rank starts
    import mlx.core as mx

    from ..pipeline.stages import StagePlan
    from .dist import Comm
    from .model import ShardedModel

# Test-only hooks, read here and nowhere else. Never set them outside tests.
# FAIL_LOAD_RANK=<r>: rank r alone fails loading its shard (the others must exit with its message).
# PERTURB_LM_HEAD=<r>: rank r's final norm gets noise, so its local logits (and argmax) differ.
TEST_FAIL_LOAD_RANK = "MLX_KVSHARD_TEST_FAIL_LOAD_RANK"
TEST_PERTURB_LM_HEAD = "MLX_KVSHARD_TEST_PERTURB_LM_HEAD"


@dataclass
class LoadedRank:
    """One rank, joined and loaded, ready to prefill and decode."""
    comm: Comm
    plan: ShardPlan
    cfg: ModelConfig
    model_dir: Path
    tokenizer: object  # mlx-lm TokenizerWrapper
    model: ShardedModel
    dtype: mx.Dtype | None  # None: the checkpoint's own
    dtype_name: str
    max_context: int
    load_s: float
    perturbed: bool = False  # the test-only hook changed this rank's logits
    stages: StagePlan | None = None  # --pp: this rank is stage comm.rank of these (plan is then the world-1 plan)

    @property
    def shard_index(self) -> int:
        """This rank's shard in `plan`: a pipeline stage holds whole layers (the world-1 plan's)."""
        return 0 if self.stages is not None else self.comm.rank

    def kv_bytes_per_token(self, rank: int) -> int:
        """KV bytes per position rank `rank` holds: its stage's layers under --pp, its heads otherwise."""
        return self.stages.kv_bytes_per_token(rank) if self.stages is not None else self.plan.kv_bytes_per_token(rank)


def eos_token_ids(model_dir: Path, cfg: ModelConfig) -> list[int] | None:
    """End-of-turn ids as mlx-lm takes them: generation_config.json first, then config.json
    (Llama 3 instruct ends turns with <|eot_id|>, which is not the tokenizer's eos_token)."""
    gen = Path(model_dir) / "generation_config.json"
    ids = None
    if gen.exists():
        try:
            ids = json.loads(gen.read_text()).get("eos_token_id")
        except (json.JSONDecodeError, AttributeError):
            ids = None
    ids = ids if ids is not None else cfg.raw.get("eos_token_id")
    if ids is None:
        return None
    return [int(i) for i in (ids if isinstance(ids, list) else [ids])]


def resolve_model(model: ModelSettings) -> tuple[Path, ModelConfig]:
    from ..models.resolve import resolve_model_dir

    model_dir = resolve_model_dir(model.source)
    return model_dir, ModelConfig.from_file(model_dir)


def load_tokenizer(model_dir: Path, cfg: ModelConfig):
    from mlx_lm.tokenizer_utils import load as load_mlx_lm_tokenizer

    try:
        return load_mlx_lm_tokenizer(model_dir, eos_token_ids=eos_token_ids(model_dir, cfg))
    except Exception as e:
        raise UserError(f"{model_dir}: could not load the tokenizer ({type(e).__name__}: {e})") from None


def encode_prompt(tokenizer, text: str, chat_template: bool) -> list[int]:
    """Token ids of a user prompt: through the chat template when asked and the tokenizer has one."""
    if chat_template and tokenizer.chat_template:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    else:
        ids = tokenizer.encode(text)
    if not ids:
        raise UserError("the prompt is empty after tokenization; give some text with --prompt")
    return list(ids)


def max_context_for(model: ModelSettings, cfg: ModelConfig) -> int:
    return model.max_context or cfg.max_position_embeddings or 4096


def check_context(prompt_tokens: int, max_context: int) -> None:
    if prompt_tokens >= max_context:
        raise UserError(f"the prompt is {prompt_tokens} tokens, but the max context is {max_context}; "
                        f"shorten the prompt or raise --max-context")


def mx_dtype(name: str) -> mx.Dtype | None:
    """The mx dtype for a settings dtype name; None for 'auto' (the checkpoint's own)."""
    import mlx.core as mx

    return None if name == "auto" else getattr(mx, name)


def join_group(settings: RankSettings, live) -> Comm:
    """Join the group (through liveness, which guards the join) and emulate the link if asked."""
    from ..hardware.links import link_cost
    from .dist import init_comm

    comm = live.join(lambda: init_comm(settings.sharding.backend))
    if settings.sharding.link:
        comm.emulate_link(link_cost(settings.sharding.link))
    return comm


def start_rank(settings: RankSettings, live) -> LoadedRank:
    """Join the group, then load this rank's shard (see load_rank)."""
    return load_rank(settings, join_group(settings, live))


def load_rank(settings: RankSettings, comm: Comm, tokenizer=None) -> LoadedRank:
    """Resolve the model, load the tokenizer (unless given), plan the split and load this rank's shard.
    Every rank shares its verdict before any collective of the model runs: one rank
    failing to load stops all of them with its message (DESIGN invariant 1)."""
    import mlx.core as mx

    from .dist import agree
    from .loader import load_rank_model

    model_dir, cfg = resolve_model(settings.model)
    tokenizer = tokenizer or load_tokenizer(model_dir, cfg)
    dtype = mx_dtype(settings.model.dtype_name)
    dtype_name = str(dtype).split(".")[-1] if dtype is not None else cfg.dtype
    max_context = max_context_for(settings.model, cfg)
    stages = None
    if settings.sharding.pp > 1:
        from ..pipeline.stages import StagePlan, check_world

        check_world(settings.sharding.pp, comm.world)  # the same verdict on every rank
        stages = StagePlan.build(cfg, comm.world, settings.sharding.shares, dtype_name, settings.kv, max_context)
        plan = stages.full
    else:
        plan = ShardPlan.build(cfg, comm.world, settings.sharding.shares, compute_dtype=dtype_name,
                               vocab_parallel=settings.sharding.vocab_parallel, kv=settings.kv, context=max_context)
    mx.reset_peak_memory()  # peak then covers loading as well as generation
    t_load = time.perf_counter()
    error, model = None, None
    try:
        if os.environ.get(TEST_FAIL_LOAD_RANK) == str(comm.rank):
            raise UserError(f"test hook {TEST_FAIL_LOAD_RANK}: rank {comm.rank} fails its load")
        progress = _to_stderr if comm.rank == 0 else None
        if stages is not None:
            from ..pipeline.model import load_stage_model

            model = load_stage_model(Path(model_dir), stages, comm, dtype, progress)
        else:
            model = load_rank_model(Path(model_dir), plan, comm, dtype, progress)
    except UserError as e:
        error = str(e)
    agree(comm, error)  # a load failure on any rank stops all of them
    perturbed = _perturb_for_test(model, comm.rank)
    return LoadedRank(comm, plan, cfg, Path(model_dir), tokenizer, model, dtype, dtype_name,
                      max_context, time.perf_counter() - t_load, perturbed, stages)


def probing_tokens() -> bool:
    """Test-only: keep each rank's own sampled token beside the agreed one, to count how
    often they differ (only while a test perturbs a rank)."""
    return TEST_PERTURB_LM_HEAD in os.environ


def _perturb_for_test(model, rank: int) -> bool:
    """Test-only: give this rank's final norm noise, as a chip rounding differently would."""
    if os.environ.get(TEST_PERTURB_LM_HEAD) != str(rank):
        return False
    import mlx.core as mx

    norm = model.model.norm
    noise = mx.random.normal(norm.weight.shape, key=mx.random.key(rank + 1)).astype(norm.weight.dtype)
    norm.weight = norm.weight * (1 + noise)
    mx.eval(norm.weight)
    return True


def _to_stderr(line: str) -> None:
    print(f"mlx-kvshard: {line}", file=sys.stderr, flush=True)
