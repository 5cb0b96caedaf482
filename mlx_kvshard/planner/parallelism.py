"""Head sharding (TP) or pipeline stages (PP, `--pp`) on these Macs and this link: predicted
decode tokens/s for one stream and aggregate tokens/s at 8 concurrent streams, and which to
run. Pure Python (no MLX); the same cost model as `--link` emulation (hardware/links.py).

TP, per token: every rank reads its 1/N of the weights and KV, and 2·L all_sums cross the
link. PP, one stream: the stages run one after another (each reads its layers' weights and
KV), S−1 activations cross one hop each and one 4-byte all_sum hands the last stage's token
to every rank. PP serving keeps S micro-batches in flight so every stage works every step:
a round of S micro-steps gives each row one token, as `serve --pp` runs decode-only steps
(pipeline/batch.py), beside the in-turn figure (`concurrent_in_turn_tok_s`: the whole batch
through every stage in turn, as serve --pp runs steps with prefills, or --kv-bits).
Micro-batching gains on what scales with rows (each stage's KV reads, compute), not on the
weights, which every stage reads once per micro-step. Hybrid TP x PP
cannot run on MLX's ring (no Group.split): it is reported as not runnable."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Sequence

from ..config import DTYPE_BYTES, ModelConfig
from ..errors import UserError
from ..hardware.links import allreduce_seconds, send_seconds
from ..hardware.profiles import LinkProfile
from ..pipeline.stages import HYBRID_REFUSAL, HYBRID_SHORT, StagePlan
from .capacity import GIB, Host, Options, build_plan, fit_ranks, memory_shares, predict_decode, usable_bytes

CONCURRENT = 8  # the serving figure: streams decoding together


def _stage_seconds(stages: StagePlan, s: int, chip, context: int, rows: int, eta: float) -> float:
    read = stages.decode_read_bytes(s) + stages.kv_bytes(s, context, rows)
    return read / (eta * chip.mem_bandwidth_Bps)


def predict_pipeline(stages: StagePlan, context: int, batch: int, link: LinkProfile,
                     chips: Sequence, eta: float, t_fixed: float) -> dict:
    """One decode step of `batch` rows through every stage in turn (no micro-batches)."""
    S, cfg = stages.stages, stages.config
    act = batch * cfg.hidden_size * DTYPE_BYTES.get(stages.full.compute_dtype, 2)
    memory = [_stage_seconds(stages, s, chips[s], context, batch, eta) for s in range(S)]
    hops = (S - 1) * send_seconds(link, act)
    token = allreduce_seconds(link, S, 4 * batch)
    t = sum(memory) + hops + token + t_fixed
    return {"seconds_per_token": t, "tokens_per_second": 1 / t, "aggregate_tokens_per_second": batch / t,
            "memory_seconds": sum(memory), "stage_memory_seconds": memory, "link_seconds": hops + token,
            "hop_seconds": send_seconds(link, act), "token_broadcast_seconds": token,
            "sends_per_token": S - 1, "collectives_per_token": 1, "fixed_seconds": t_fixed}


def predict_pipeline_microbatched(stages: StagePlan, context: int, batch: int, link: LinkProfile,
                                  chips: Sequence, eta: float, t_fixed: float) -> dict:
    """`batch` rows as S micro-batches, each a stage behind the next: a round of S micro-steps
    gives every row a token. A round takes S x the slowest stage's micro-step, or one
    micro-batch's trip through every stage and back, whichever is longer."""
    S, cfg = stages.stages, stages.config
    rows = math.ceil(batch / S)
    act = rows * cfg.hidden_size * DTYPE_BYTES.get(stages.full.compute_dtype, 2)
    hop = send_seconds(link, act)
    micro = [_stage_seconds(stages, s, chips[s], context, rows, eta) for s in range(S)]
    trip = sum(micro) + (S - 1) * hop + allreduce_seconds(link, S, 4 * rows)
    round_s = max(S * (max(micro) + hop), trip) + t_fixed
    return {"seconds_per_round": round_s, "rows_per_micro_batch": rows, "micro_batches": S,
            "tokens_per_second": 1 / round_s, "aggregate_tokens_per_second": batch / round_s,
            "implemented": True}


def _stage_fits(stages: StagePlan, hosts: Sequence[Host], opts: Options) -> bool | None:
    overhead = int(opts.overhead_gb * GIB)
    out = []
    for s, h in enumerate(hosts):
        usable = usable_bytes(h, opts.usable_fraction)
        if usable is None:
            return None
        out.append(stages.weight_bytes(s) + stages.kv_bytes(s, opts.context, opts.batch) + overhead <= usable)
    return all(out)


def compare(cfg: ModelConfig, hosts: Sequence[Host], link: LinkProfile | None, opts: Options,
            shares: Sequence[float] | None = None, compute_dtype: str | None = None) -> dict | None:
    """TP vs PP (vs hybrid, not runnable) on these hosts; None where it cannot be predicted
    (one host, no link, or a chip unknown)."""
    hosts = list(hosts)
    S = len(hosts)
    if S < 2 or link is None or any(h.chip is None for h in hosts):
        return None
    chips = [h.chip for h in hosts]
    shares = shares if shares is not None else memory_shares(hosts, opts)
    one = replace(opts, batch=1)
    out: dict = {"link": link.name, "concurrent": CONCURRENT,
                 "hybrid": {"runs": False, "why": HYBRID_REFUSAL}}
    try:
        tp_plan = build_plan(cfg, hosts, one, shares, compute_dtype)
        tp_many = build_plan(cfg, hosts, replace(opts, batch=CONCURRENT), shares, compute_dtype)
        tp1 = predict_decode(tp_plan, opts.context, 1, link, chips, opts.eta, opts.t_fixed_s, opts.kv_bits)
        tp8 = predict_decode(tp_many, opts.context, CONCURRENT, link, chips, opts.eta, opts.t_fixed_s, opts.kv_bits)
        tp_fits = [f.fits for f in fit_ranks(tp_plan, hosts, opts)]
        out["tp"] = {"flag": "", "one_stream_tok_s": tp1["tokens_per_second"],
                     "concurrent_tok_s": tp8["aggregate_tokens_per_second"],
                     "link_ms_per_token": tp1["link_seconds"] * 1e3,
                     "fits": None if None in tp_fits else all(tp_fits)}
    except UserError as e:
        out["tp"] = {"error": str(e)}
    try:
        stages = StagePlan.build(cfg, S, shares, compute_dtype, opts.kv, opts.context)
        pp1 = predict_pipeline(stages, opts.context, 1, link, chips, opts.eta, opts.t_fixed_s)
        pp8 = predict_pipeline_microbatched(stages, opts.context, CONCURRENT, link, chips, opts.eta, opts.t_fixed_s)
        pp8_turn = predict_pipeline(stages, opts.context, CONCURRENT, link, chips, opts.eta, opts.t_fixed_s)
        out["pp"] = {"flag": f"--pp {S}", "layers": [list(r) for r in stages.layers],
                     "one_stream_tok_s": pp1["tokens_per_second"], "concurrent_tok_s": pp8["aggregate_tokens_per_second"],
                     "concurrent_implemented": True,  # serve --pp micro-batches decode-only steps
                     "concurrent_in_turn_tok_s": pp8_turn["aggregate_tokens_per_second"],  # prefills, --kv-bits
                     "link_ms_per_token": pp1["link_seconds"] * 1e3,
                     "fits": _stage_fits(stages, hosts, opts)}
    except UserError as e:
        out["pp"] = {"error": str(e)}
    out["recommend"], out["reason"] = _recommend(out)
    return out


def _recommend(c: dict) -> tuple[str | None, str]:
    runnable = {m: c[m] for m in ("tp", "pp") if "error" not in c[m] and c[m]["fits"] is not False}
    if not runnable:
        return None, "neither head sharding nor pipeline stages fit these Macs"
    if len(runnable) == 1:
        (m, d), = runnable.items()
        other = "pp" if m == "tp" else "tp"
        why = c[other].get("error") or "it does not fit"
        return m, f"only {_name(m)} runs here ({_name(other)}: {why})"
    tp, pp = runnable["tp"], runnable["pp"]
    m = "pp" if pp["one_stream_tok_s"] > tp["one_stream_tok_s"] else "tp"
    a, b = runnable[m], runnable["pp" if m == "tp" else "tp"]
    return m, (f"one stream at {a['one_stream_tok_s']:.1f} tok/s vs "
               f"{b['one_stream_tok_s']:.1f} on {c['link']} (TP's all_sums cost {tp['link_ms_per_token']:.1f} ms/token, "
               f"PP's hops {pp['link_ms_per_token']:.2f} ms)")


def _name(m: str) -> str:
    return {"tp": "head sharding (TP)", "pp": "pipeline stages (PP)"}[m]


def lines(c: dict | None) -> list[str]:
    """The comparison as text for `plan`."""
    if c is None:
        return []
    out = [f"TP vs PP on {c['link']} (decode tok/s; {c['concurrent']} concurrent = aggregate):"]
    for m in ("tp", "pp"):
        d = c[m]
        if "error" in d:
            out.append(f"  {_name(m)}: cannot run ({d['error']})")
            continue
        note = (f" (micro-batched, as serve --pp decodes; stages in turn: {d['concurrent_in_turn_tok_s']:.1f} tok/s)"
                if m == "pp" else "")
        fits = {True: "", False: "; does NOT fit", None: ""}[d["fits"]]
        flag = f" [{d['flag']}]" if d["flag"] else ""
        out.append(f"  {_name(m)}{flag}: one stream {d['one_stream_tok_s']:.1f} tok/s, "
                   f"{c['concurrent']} concurrent {d['concurrent_tok_s']:.1f} tok/s{note}{fits}")
    out.append(f"  hybrid TP x PP: does not run ({HYBRID_SHORT})")
    rec = f"{_name(c['recommend'])}" if c["recommend"] else "none"
    out.append(f"recommended: {rec}: {c['reason']}")
    return out
