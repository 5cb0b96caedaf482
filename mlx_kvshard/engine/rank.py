"""One rank's whole job for `generate`: join the group, load its shard, generate, report."""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

from ..config import ModelConfig
from ..errors import UserError
from .generate import DecodeTimings, SamplingParams, StopChecker, generate_tokens


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


def prepare_prompt(args, ck=None):
    """Resolve the model, tokenize the prompt and check it fits. Deterministic, so every
    rank reaches the same verdict without talking to the others. `ck`, a generation
    checkpoint to resume, brings the prompt ids instead."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    from ..models.resolve import resolve_model_dir

    model_dir = resolve_model_dir(args.model)
    cfg = ModelConfig.from_file(model_dir)
    try:
        tokenizer = load_tokenizer(model_dir, eos_token_ids=eos_token_ids(model_dir, cfg))
    except Exception as e:
        raise UserError(f"{model_dir}: could not load the tokenizer ({type(e).__name__}: {e})") from None
    if ck is not None:  # its ids mean something only with its model and tokenizer
        from ..liveness.checkpoint import check_model

        check_model(ck, model_dir, args.resume)
        ids = ck.prompt
    elif not args.no_chat_template and tokenizer.chat_template:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}],
                                            add_generation_prompt=True)
    else:
        ids = tokenizer.encode(args.prompt)
    if not ids:
        raise UserError("the prompt is empty after tokenization; give some text with --prompt")
    max_context = args.max_context or cfg.max_position_embeddings or 4096
    if len(ids) >= max_context:
        raise UserError(f"the prompt is {len(ids)} tokens, but the max context is {max_context}; "
                        f"shorten the prompt or raise --max-context")
    return model_dir, cfg, tokenizer, list(ids), max_context


def _dtype(name: str | None, cfg: ModelConfig):
    import mlx.core as mx

    from ..cli.generate import default_dtype

    name = default_dtype(name)
    return None if name == "auto" else getattr(mx, name)


def run_rank(args, params: SamplingParams) -> int:
    from ..liveness.client import for_rank

    with for_rank(args) as live:  # side channel and own watchdog: a lost peer ends in one line, exit 75
        return _run_rank(args, params, live)


def _run_rank(args, params: SamplingParams, live) -> int:
    import mlx.core as mx

    from ..cli.generate import kv_settings
    from ..cli.plan import parse_weights
    from .dist import agree, gather_json, init_comm
    from ..liveness.checkpoint import Writer, apply_checkpoint, load_on_ranks
    from .kvcache import allocated_positions, stored_positions
    from .loader import load_rank_model, parameter_bytes
    from ..plan import ShardPlan

    comm = live.join(lambda: init_comm(args.backend))
    if args.link:
        from ..planner.profiles import load_link

        comm.emulate_link(load_link(args.link))
    ck = load_on_ranks(args.resume, comm) if args.resume else None
    if ck:
        params = apply_checkpoint(ck, args, args._parser)  # that run's model, sampling, dtype, context
    model_dir, cfg, tokenizer, prompt, max_context = prepare_prompt(args, ck)
    dtype = _dtype(args.dtype, cfg)
    dtype_name = str(dtype).split(".")[-1] if dtype is not None else cfg.dtype
    plan = ShardPlan.build(cfg, comm.world, parse_weights(args.weights), compute_dtype=dtype_name,
                           vocab_parallel=args.vocab_parallel, kv=kv_settings(args), context=max_context)
    mx.reset_peak_memory()  # peak then covers loading as well as generation
    t_load = time.perf_counter()
    error = None
    try:
        model = load_rank_model(Path(model_dir), plan, comm, dtype,
                                progress=_to_stderr if comm.rank == 0 else None)
    except UserError as e:
        error = str(e)
    agree(comm, error)  # a load failure on any rank stops all of them
    load_s = time.perf_counter() - t_load

    stopper = StopChecker(tokenizer, params.stop)
    timings = DecodeTimings()
    show = comm.rank == 0 and not args.json
    tokens: list[int] = []
    stats_after_prefill = {}
    ckpt = Writer.for_rank(args, comm.rank, model_dir, prompt, params, max_context, dtype_name, comm.world,
                           on_write=live.checkpoint_written)

    def emit(text: str) -> None:
        if show and text:
            sys.stdout.write(text)
            sys.stdout.flush()

    done = False
    for tok in ck.tokens if ck else []:  # resumed: the text so far, and whether it had ended
        tokens.append(tok)
        text, done = stopper.add(tok)
        emit(text)
        if done:
            break

    def mark_prefill():
        stats_after_prefill.update(collectives=comm.stats.collectives, bytes=comm.stats.bytes)

    cache = model.make_cache()
    pay_link = comm.pay_link_time if comm.link is not None else None
    live.phase("prefill")
    context = prompt + tokens  # a resumed run re-prefills what it had generated
    if not done and len(context) < max_context:
        for tok in generate_tokens(model, cache, context, params, max_context, args.prefill_step, timings,
                                   mark_prefill, after_eval=pay_link, first_step=len(tokens)):
            tokens.append(tok)
            live.progress(len(tokens))
            ckpt.step(tokens)
            text, done = stopper.add(tok)
            emit(text)
            if done:
                break
    live.phase("finishing")
    ckpt.finish(tokens, stopper.finish_reason)
    tail = stopper.flush()
    if show:
        sys.stdout.write(tail + "\n")
        sys.stdout.flush()

    # every rank issued the same collectives: the KV cache shard sizes are local facts
    decode_collectives = comm.stats.collectives - stats_after_prefill.get("collectives", 0)
    decode_bytes = comm.stats.bytes - stats_after_prefill.get("bytes", 0)
    steps = max(1, timings.decode_steps)
    shard = plan.shards[comm.rank]
    mine = {
        "rank": comm.rank,
        "kv_heads": list(shard.kv_heads),
        "q_heads": list(shard.q_heads),
        "local_kv_heads": shard.local_kv_heads,
        "local_q_heads": shard.local_q_heads,
        "mlp_cols": list(shard.mlp_cols),
        "weight_bytes": parameter_bytes(model),
        "plan_weight_bytes": plan.weight_bytes(comm.rank),
        "kv_bytes": sum(c.nbytes for c in cache),
        "kv_tokens_allocated": allocated_positions(cache[0]),  # positions this rank has room for
        "kv_tokens": cache[0].offset,  # positions of the sequence
        "kv_positions": stored_positions(cache[0]),  # of which this rank holds (sequence-sharded: a share)
        "plan_kv_bytes_per_token": plan.kv_bytes_per_token(comm.rank),  # per position held
        "plan_kv_bytes": plan.kv_bytes(comm.rank, cache[0].offset),
        "kv_bits": plan.kv.bits,
        "kv_shard": plan.kv.shard,
        "seq_sharers": shard.seq_sharers,
        "peak_memory_bytes": mx.get_peak_memory(),
        "tokens_digest": hashlib.sha256(json.dumps(tokens).encode()).hexdigest()[:16],
    }
    ranks = gather_json(comm, mine)
    if args.check_sync:
        digests = {r["tokens_digest"] for r in ranks}
        if len(digests) != 1:
            raise UserError("ranks disagree on the generated tokens: " +
                            ", ".join(f"rank {r['rank']}={r['tokens_digest']}" for r in ranks))
    if comm.rank == 0:
        report = {
            "text": stopper.text,
            "tokens": tokens,
            "prompt_tokens": len(prompt),
            "resumed_tokens": len(ck.tokens) if ck else 0,
            "finish_reason": stopper.finish_reason,
            "world": comm.world,
            "model": str(model_dir),
            "dtype": dtype_name,
            "timings": _timings(timings, load_s),
            "comm": {
                "collectives_per_token": decode_collectives / steps,
                "bytes_per_token": decode_bytes / steps,
            },
            "ranks": ranks,
            "sync_checked": bool(args.check_sync),
        }
        if args.json:
            print(json.dumps(report))
        if args.stats:
            print(format_stats(report), file=sys.stderr)
    return 0



def _timings(t: DecodeTimings, load_s: float) -> dict:
    decode_tps = t.decode_tokens / t.decode_s if t.decode_s > 0 and t.decode_tokens else None
    return {
        "load_s": load_s,
        "ttft_s": t.prefill_s,
        "prefill_tok_s": t.prompt_tokens / t.prefill_s if t.prefill_s else None,
        "decode_tok_s": decode_tps,
        "time_per_output_token_s": 1 / decode_tps if decode_tps else None,
    }


def format_stats(r: dict) -> str:
    from ..plan import human_bytes

    t, c = r["timings"], r["comm"]

    def num(v, fmt):
        return "n/a" if v is None else format(v, fmt)

    lines = [
        f"[stats] world {r['world']}, {r['prompt_tokens']} prompt + {len(r['tokens'])} generated tokens "
        f"({r['finish_reason']}), dtype {r['dtype']}",
        f"[stats] TTFT {num(t['ttft_s'], '.3f')} s, prefill {num(t['prefill_tok_s'], '.1f')} tok/s, "
        f"decode {num(t['decode_tok_s'], '.2f')} tok/s "
        f"({num(t['time_per_output_token_s'] and 1000 * t['time_per_output_token_s'], '.2f')} ms/token)",
        f"[stats] per decode token: {c['collectives_per_token']:.0f} collectives, "
        f"{human_bytes(c['bytes_per_token'])} collective payload per rank",
    ]
    for k in r["ranks"]:
        lines.append(
            f"[stats] rank {k['rank']}: KV heads {k['kv_heads'][0]}-{k['kv_heads'][1] - 1}, "
            f"query heads {k['q_heads'][0]}-{k['q_heads'][1] - 1}, weights {human_bytes(k['weight_bytes'])}, "
            f"KV cache {human_bytes(k['kv_bytes'])}, peak memory {human_bytes(k['peak_memory_bytes'])}")
    return "\n".join(lines)


def _to_stderr(line: str) -> None:
    print(f"mlx-kvshard: {line}", file=sys.stderr, flush=True)
