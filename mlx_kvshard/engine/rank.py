"""One rank's whole job for `generate`: start the rank, generate one prompt, report."""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass, field
from typing import Callable

from ..errors import UserError
from ..settings import RankSettings
from .generate import DecodeTimings, SamplingParams, StopChecker, generate_tokens
from .kvcache import allocated_positions, stored_positions
from .startup import (LoadedRank, check_context, encode_prompt, join_group, load_rank, load_tokenizer,
                      max_context_for, probing_tokens, resolve_model)

# on_resume(checkpoint) -> the settings and sampling of the run it continues (the CLI's
# checks its flags against it); default: everything from the checkpoint.
OnResume = Callable[[object], tuple[RankSettings, SamplingParams]]


def check_prompt(settings: RankSettings, text: str, chat_template: bool = True, ck=None,
                 params: SamplingParams | None = None) -> tuple[list[int], object]:
    """Resolve the model, tokenize the prompt and check it (and `params`) fit the model; the
    ids and the tokenizer. Deterministic, so every rank reaches the same verdict without
    talking to the others. `ck`, a generation checkpoint to resume, brings the prompt ids instead."""
    model_dir, cfg = resolve_model(settings.model)
    if params is not None:
        params.check_model(cfg.vocab_size)
    tokenizer = load_tokenizer(model_dir, cfg)
    if ck is not None:  # its ids mean something only with its model and tokenizer
        from ..liveness.checkpoint import check_model

        check_model(ck, model_dir, settings.checkpoint.resume)
        ids = list(ck.prompt)
    else:
        ids = encode_prompt(tokenizer, text, chat_template)
    check_context(len(ids), max_context_for(settings.model, cfg))
    return ids, tokenizer


def run_rank(settings: RankSettings, params: SamplingParams, prompt: str, chat_template: bool = True,
             on_resume: OnResume | None = None) -> int:
    from ..liveness.client import for_rank

    with for_rank(settings.liveness) as live:  # side channel and own watchdog: a lost peer ends in one line, exit 75
        return generate_on_rank(settings, params, prompt, chat_template, live, on_resume)


def generate_on_rank(settings: RankSettings, params: SamplingParams, prompt: str, chat_template: bool, live,
                     on_resume: OnResume | None = None) -> int:
    """Setup, loop, report."""
    from ..liveness.checkpoint import load_on_ranks, resumed

    comm = join_group(settings, live)
    ck = load_on_ranks(settings.checkpoint.resume, comm) if settings.checkpoint.resume else None
    if ck:  # that run's model, sampling, dtype, context
        settings, params = (on_resume or (lambda c: resumed(c, settings, params)))(ck)
    ids, tokenizer = check_prompt(settings, prompt, chat_template, ck, params)  # before the long load
    rank = load_rank(settings, comm, tokenizer)
    from .draft import load_draft

    draft = load_draft(settings.speculative.draft_model, rank)  # rank 0's; None elsewhere
    run = _generate(rank, settings, params, ids, ck, live, draft, chat_template)
    _report(rank, settings, run)
    return 0


@dataclass
class _Run:
    prompt: list[int]
    stopper: StopChecker
    tokens: list[int] = field(default_factory=list)
    resumed_tokens: int = 0
    timings: DecodeTimings = field(default_factory=DecodeTimings)
    after_prefill: tuple[int, int] = (0, 0)  # comm collectives and bytes when prefill ended
    probe: list = field(default_factory=list)  # test hook: (local token, agreed token) per step
    cache: list = field(default_factory=list)
    spec: object | None = None  # speculative.SpecStats when speculating


def _generate(rank: LoadedRank, settings: RankSettings, params: SamplingParams, prompt: list[int], ck, live,
              draft=None, chat_template: bool = True):
    from ..liveness.checkpoint import Writer

    comm = rank.comm
    # the text as the server gives it: a chat's content (first space trimmed), else a completion's
    chat = chat_template and bool(rank.tokenizer.chat_template)
    stopper = StopChecker(rank.tokenizer, params.stop, prompt, trim_first_space=chat)
    run = _Run(prompt, stopper, resumed_tokens=len(ck.tokens) if ck else 0,
               cache=rank.model.make_cache())
    show = comm.rank == 0 and not settings.output.json
    ckpt = Writer.for_rank(settings.checkpoint, comm.rank, rank.model_dir, prompt, params, rank.max_context,
                           rank.dtype_name, comm.world, on_write=live.checkpoint_written)

    def emit(text: str) -> None:
        if show and text:
            sys.stdout.write(text)
            sys.stdout.flush()

    done = False
    for tok in ck.tokens if ck else []:  # resumed: the text so far, and whether it had ended
        run.tokens.append(tok)
        text, done = run.stopper.add(tok)
        emit(text)
        if done:
            break
    live.phase("prefill")
    context = prompt + run.tokens  # a resumed run re-prefills what it had generated
    if not done and len(context) < rank.max_context:
        for tok in _tokens(rank, settings, params, context, run, draft):
            run.tokens.append(tok)
            live.progress(len(run.tokens))
            ckpt.step(run.tokens)
            text, done = run.stopper.add(tok)
            emit(text)
            if done:
                break
    live.phase("finishing")
    ckpt.finish(run.tokens, run.stopper.finish_reason)
    tail = run.stopper.flush()
    if show:
        sys.stdout.write(tail + "\n")
        sys.stdout.flush()
    return run


def _tokens(rank: LoadedRank, settings: RankSettings, params: SamplingParams, context: list[int], run: _Run,
            draft=None):
    comm = rank.comm

    def mark_prefill():
        run.after_prefill = (comm.stats.collectives, comm.stats.bytes)

    pay_link = comm.pay_link_time if comm.link_cost is not None else None
    agree = _token_agreement(rank, run)
    decoder = None
    if settings.speculative.enabled:
        from .speculative import speculative_for_rank

        run.spec, decoder = speculative_for_rank(rank, settings, context, run.cache, draft)
    return generate_tokens(rank.model, run.cache, context, params, rank.max_context,
                           settings.model.prefill_step, run.timings, mark_prefill, after_eval=pay_link,
                           first_step=len(run.tokens), agree=agree, decoder=decoder)


def _token_agreement(rank: LoadedRank, run: _Run):
    """Every rank continues with rank 0's token (DESIGN invariant 6): replicated final norm,
    lm_head and sampler can round a near-tie differently on another chip. One 4-byte
    all_sum per token, inside the lazy step graph (no extra host sync). Not needed on one
    rank, nor with --vocab-parallel: there every rank samples from the same gathered logits."""
    comm = rank.comm
    if rank.stages is not None:  # only the last stage has logits: its token is every rank's
        last = rank.stages.stages - 1
        if comm.rank == last:
            return lambda y: comm.broadcast_from(y, last)
        # Before the last stage the logits are placeholder zeros: contribute zeros that do not
        # depend on them, so neither they nor their sample are ever computed (this stage's
        # send is evaluated inside the forward already, so no collective can overtake it).
        import mlx.core as mx

        return lambda y: comm.all_sum(mx.zeros(y.shape, dtype=mx.int32)).astype(y.dtype)
    if comm.world == 1 or rank.plan.vocab_parallel:
        return None
    if not probing_tokens():
        return comm.broadcast_from_rank0

    def agree(y):  # test hook: keep this rank's own token beside the agreed one
        agreed = comm.broadcast_from_rank0(y)
        run.probe.append((y, agreed))
        return agreed

    return agree


def _report(rank: LoadedRank, settings: RankSettings, run: _Run) -> None:
    """Gather every rank's facts; rank 0 prints the JSON report and/or the stats."""
    from .dist import gather_json

    comm = rank.comm
    steps = max(1, run.timings.decode_steps)  # before the gather below, which is no decode traffic
    decode_collectives = comm.stats.collectives - run.after_prefill[0]
    per_token = {"collectives_per_token": decode_collectives / steps,  # per decode (or verify) step
                 "bytes_per_token": (comm.stats.bytes - run.after_prefill[1]) / steps,
                 # compares plain and speculative runs: this run's tokens after the first come from decode
                 "collectives_per_generated_token":
                     decode_collectives / max(1, len(run.tokens) - run.resumed_tokens - 1)}
    ranks = gather_json(comm, _rank_facts(rank, run))
    if settings.output.check_sync:
        digests = {r["tokens_digest"] for r in ranks}
        if len(digests) != 1:
            raise UserError("ranks disagree on the generated tokens: " +
                            ", ".join(f"rank {r['rank']}={r['tokens_digest']}" for r in ranks))
    if comm.rank != 0:
        return
    # every rank issued the same collectives: the KV cache shard sizes are local facts
    report = {
        "text": run.stopper.text,
        "tokens": run.tokens,
        "prompt_tokens": len(run.prompt),
        "resumed_tokens": run.resumed_tokens,
        "finish_reason": run.stopper.finish_reason,
        "world": comm.world,
        "pp": rank.stages.stages if rank.stages else 1,
        "model": str(rank.model_dir),
        "dtype": rank.dtype_name,
        "timings": _timings(run.timings, rank.load_s),
        "comm": per_token,
        "ranks": ranks,
        "sync_checked": settings.output.check_sync,
    }
    if run.spec is not None:
        report["speculative"] = {"proposer": "draft_model" if settings.speculative.draft_model else "prompt_lookup",
                                 "num_draft": settings.speculative.num_draft, **run.spec.to_dict()}
    if settings.output.json:
        print(json.dumps(report))
    if settings.output.stats:
        print(format_stats(report), file=sys.stderr)


def _rank_facts(rank: LoadedRank, run: _Run) -> dict:
    import mlx.core as mx

    from .loader import parameter_bytes

    comm, cache, shard = rank.comm, run.cache, rank.plan.shards[rank.shard_index]
    offset = cache[0].offset if cache else 0
    plan_weight_bytes = rank.plan.weight_bytes(rank.shard_index)
    plan_kv_per_token = rank.plan.kv_bytes_per_token(rank.shard_index)
    plan_kv_bytes = rank.plan.kv_bytes(rank.shard_index, offset)
    if rank.stages is not None:  # this stage's layers only
        plan_weight_bytes = rank.stages.weight_bytes(comm.rank)
        plan_kv_per_token = rank.stages.kv_bytes_per_token(comm.rank)
        plan_kv_bytes = rank.stages.kv_bytes(comm.rank, offset)
    facts = {
        "rank": comm.rank,
        "kv_heads": list(shard.kv_heads),
        "q_heads": list(shard.q_heads),
        "local_kv_heads": shard.local_kv_heads,
        "local_q_heads": shard.local_q_heads,
        "mlp_cols": list(shard.mlp_cols),
        "weight_bytes": parameter_bytes(rank.model),
        "plan_weight_bytes": plan_weight_bytes,
        "kv_bytes": sum(c.nbytes for c in cache),
        "kv_tokens_allocated": allocated_positions(cache[0]) if cache else 0,  # positions this rank has room for
        "kv_tokens": cache[0].offset if cache else 0,  # positions of the sequence
        "kv_positions": stored_positions(cache[0]) if cache else 0,  # of which this rank holds (sequence-sharded: a share)
        "plan_kv_bytes_per_token": plan_kv_per_token,  # per position held
        "plan_kv_bytes": plan_kv_bytes,
        "kv_bits": rank.plan.kv.bits,
        "kv_shard": rank.plan.kv.shard,
        "kv_rotated": rank.plan.kv.rotated,
        "kv_fp_window": rank.plan.kv.window,
        "seq_sharers": shard.seq_sharers,
        "peak_memory_bytes": mx.get_peak_memory(),
        "layers": list(rank.stages.layers[comm.rank]) if rank.stages else [0, rank.cfg.num_hidden_layers],
        "sends": comm.stats.sends,  # pipeline: activations this stage sent on (prefill chunks and decode steps)
        "send_bytes": comm.stats.send_bytes,
        "tokens_digest": hashlib.sha256(json.dumps(run.tokens).encode()).hexdigest()[:16],
    }
    if run.probe:  # test hook: steps where this rank's own sampled token was not rank 0's
        mx.eval(run.probe)
        facts["local_token_disagreements"] = sum(int(a.item()) != int(b.item()) for a, b in run.probe)
    return facts


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
        f"{human_bytes(c['bytes_per_token'])} collective payload per rank; "
        f"{c['collectives_per_generated_token']:.1f} collectives per generated token",
    ]
    if "speculative" in r:
        s = r["speculative"]
        lines.append(f"[stats] speculative ({s['proposer']}, {s['num_draft']} per step): {s['drafted']} drafted, "
                     f"{s['accepted']} accepted (rate {num(s['acceptance_rate'], '.2f')}), "
                     f"{num(s['tokens_per_step'], '.2f')} tokens per verify step")
    for k in r["ranks"]:
        lines.append(
            f"[stats] rank {k['rank']}: KV heads {k['kv_heads'][0]}-{k['kv_heads'][1] - 1}, "
            f"query heads {k['q_heads'][0]}-{k['q_heads'][1] - 1}, weights {human_bytes(k['weight_bytes'])}, "
            f"KV cache {human_bytes(k['kv_bytes'])}, peak memory {human_bytes(k['peak_memory_bytes'])}")
    return "\n".join(lines)
