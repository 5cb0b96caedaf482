"""One rank's whole job for `mlx-kvshard perplexity`: join, load this rank's shard, read and
tokenize the text (every rank, the same ids: checked), score it, and rank 0 reports."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from ..errors import UserError
from ..settings import PerplexitySettings, RankSettings


def read_tokens(path: str, tokenizer) -> list[int]:
    """The text's token ids, as plain text (no chat template); at least two, or nothing to predict."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--file {path}: cannot read it as UTF-8 text ({e})") from None
    ids = list(tokenizer.encode(text))
    if len(ids) < 2:
        raise UserError(f"--file {path}: {len(ids)} token(s); need at least 2 to score one prediction")
    return ids


def window_tokens(ppl: PerplexitySettings, n_tokens: int, max_context: int) -> int:
    """Tokens per scored window: --context, or the whole text up to the max context."""
    if ppl.context is not None and ppl.context > max_context:
        raise UserError(f"--context {ppl.context}: the max context is {max_context}; lower --context or raise "
                        f"--max-context")
    return ppl.context or min(n_tokens, max_context)


def run_rank(settings: RankSettings, ppl: PerplexitySettings) -> int:
    from ..liveness.client import for_rank

    with for_rank(settings.liveness) as live:  # a lost peer ends in one line, as in generate
        return _score_on_rank(settings, ppl, live)


def _score_on_rank(settings: RankSettings, ppl: PerplexitySettings, live) -> int:
    from ..engine.dist import gather_json
    from ..engine.kvcache import make_cache
    from ..engine.startup import join_group, load_rank, load_tokenizer, max_context_for, resolve_model
    from .score import score

    comm = join_group(settings, live)
    model_dir, cfg = resolve_model(settings.model)
    tokenizer = load_tokenizer(model_dir, cfg)
    try:  # before the long load
        tokens, error = read_tokens(ppl.file, tokenizer), ""
        window_tokens(ppl, len(tokens), max_context_for(settings.model, cfg))
    except UserError as e:
        tokens, error = [], str(e)
    # the file is read on every rank: each must hold it, and the same text
    digest = hashlib.sha256(json.dumps(tokens).encode()).hexdigest()[:16]
    verdicts = gather_json(comm, [error[:400], digest], max_bytes=1024)
    failed = [(r, e) for r, (e, _) in enumerate(verdicts) if e]
    if failed:
        raise UserError(failed[0][1] if comm.world == 1 else f"rank {failed[0][0]}: {failed[0][1]}")
    if len({d for _, d in verdicts}) != 1:
        raise UserError(f"--file {ppl.file}: the ranks read different texts; give every rank the same file")
    rank = load_rank(settings, comm, tokenizer)
    context = window_tokens(ppl, len(tokens), rank.max_context)
    model, shard = rank.model, rank.plan.shards[comm.rank]
    fp_kv = settings.kv.full_precision()
    make_fp = (lambda: make_cache(shard, fp_kv, len(model.layers))) if ppl.compare_fp else None
    live.phase("prefill")
    result = score(lambda x, c: model(x, c), tokens, context, settings.model.prefill_step, model.make_cache, make_fp)
    live.phase("finishing")
    per_rank = gather_json(comm, {"rank": comm.rank, "kv_bytes": result.kv_bytes,
                                  "plan_kv_bytes_per_token": rank.plan.kv_bytes_per_token(comm.rank)})
    if comm.rank == 0:
        kv = settings.kv
        report = {**result.to_dict(), "context": context, "prefill_step": settings.model.prefill_step,
                  "text_tokens": len(tokens), "world": comm.world, "model": str(rank.model_dir),
                  "dtype": rank.dtype_name,
                  "kv": {"bits": kv.bits, "group_size": kv.group_size, "quant_start": kv.quant_start,
                         "shard": rank.plan.kv.shard, "rotated": kv.rotated, "fp_window": rank.plan.kv.window},
                  "ranks": per_rank}
        print(json.dumps(report) if ppl.json else format_report(report))
        sys.stdout.flush()
    return 0


def kv_label(kv: dict) -> str:
    if kv["bits"] is None:
        label = "full-precision KV"
    else:
        label = f"{kv['bits']}-bit KV (group {kv['group_size']})"
        if kv["quant_start"]:
            label += f" from token {kv['quant_start']}"
        if kv.get("fp_window"):
            label += f", last {kv['fp_window']} positions full precision"
    label += ", Hadamard-rotated" if kv["rotated"] else ""
    return label + (", sequence-sharded" if kv["shard"] == "sequence" else "")


def format_report(r: dict) -> str:
    from ..plan import human_bytes

    lines = [f"perplexity {r['perplexity']:.4f} ± {r['perplexity_stderr']:.4f} over {r['tokens_scored']} tokens "
             f"({r['windows']} window(s) of up to {r['context']}, prefill chunks of {r['prefill_step']}); "
             f"{kv_label(r['kv'])}, world {r['world']}, {r['dtype']}"]
    if "fp_perplexity" in r:
        lines.append(f"full-precision KV: perplexity {r['fp_perplexity']:.4f} ({100 * r['perplexity_change']:+.2f}%); "
                     f"mean KL divergence {r['kl_divergence_mean']:.5f} (max {r['kl_divergence_max']:.4f}); "
                     f"top-1 agreement {100 * r['top1_agreement']:.2f}%")
    kv = ", ".join(f"rank {k['rank']} {human_bytes(k['kv_bytes'])}" for k in r["ranks"])
    lines.append(f"KV cache held (largest window): {kv}")
    return "\n".join(lines)
