"""The draft model of speculative decoding: a small unsharded mlx-lm model that rank 0
alone loads and runs, with no collectives. Its proposals reach the other ranks as integers
(engine/speculative.py), so the other ranks need neither its memory nor its compute."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError


def check_draft(source: str, target_tokenizer) -> Path:
    """The draft's model folder, once its tokenizer is known to be the target's: a draft's
    token ids must mean the same text, or its proposals are noise (or out of range)."""
    from .startup import load_tokenizer, resolve_model
    from ..settings import ModelSettings

    try:
        draft_dir, cfg = resolve_model(ModelSettings(source))
        draft_vocab = load_tokenizer(draft_dir, cfg).get_vocab()
    except UserError as e:
        raise UserError(f"--draft-model: {e}") from None
    target_vocab = target_tokenizer.get_vocab()
    if draft_vocab != target_vocab:
        differ = sorted(set(draft_vocab.items()) ^ set(target_vocab.items()), key=lambda kv: kv[1])[:1]
        example = f"; e.g. token {differ[0][0]!r} id {differ[0][1]}" if differ else ""
        raise UserError(f"--draft-model {source}: its tokenizer differs from the target model's "
                        f"({len(draft_vocab)} vs {len(target_vocab)} tokens{example}); "
                        f"a draft model must use the target's tokenizer")
    return draft_dir


def load_draft(source: str | None, rank) -> object | None:
    """Rank 0's draft model (None on the other ranks, or without --draft-model). Every rank
    shares rank 0's verdict first: a draft that fails to load stops all of them."""
    from .dist import agree

    if not source:
        return None
    model, error = None, None
    if rank.comm.rank == 0:
        try:
            model = _load(check_draft(source, rank.tokenizer), rank.dtype)
        except UserError as e:
            error = str(e)
    agree(rank.comm, error)
    return model


def _load(draft_dir: Path, dtype):
    from ..models.architectures import load_oracle

    try:
        return load_oracle(draft_dir, dtype)
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise UserError(f"--draft-model {draft_dir}: cannot load it ({type(e).__name__}: {e})") from None
