"""Text and JSON output of `mlx-kvshard plan`: the shard table, then fit, context, wire bytes,
predicted speed and the single-Mac-or-cluster decision, each number with its assumption."""

from __future__ import annotations

import json

from . import capacity
from .capacity import GIB, Decision, Evaluation, Options
from ..plan import human_bytes
from ..table import columns
from ..hardware.profiles import LinkProfile


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms"


def _kv_label(ev: Evaluation, opts: Options) -> str:
    label = f"KV {opts.kv_bits}-bit" + (f" ({ev.plan.compute_dtype})" if opts.kv_bits == 16 else
                                        f" (quantized, group {opts.kv_group_size})")
    return label + (", sequence-sharded" if ev.plan.sequence_sharded else "")


def fit_table(ev: Evaluation, opts: Options) -> list[str]:
    rows = [("rank", "host", "chip", "RAM", "usable", "weights", "KV", "headroom", "fits", "max context")]
    for f in ev.fits:
        known = f.usable_bytes is not None
        rows.append((
            str(f.rank), f.host.name, f.host.chip.name if f.host.chip else "?",
            f"{f.host.memory_gb:g} GB" if known else "?",
            human_bytes(f.usable_bytes) if known else "?",
            human_bytes(f.weight_bytes), human_bytes(f.kv_bytes),
            human_bytes(f.headroom_bytes) if known else "?",
            ("yes" if f.fits else "NO") if known else "?",
            f"{f.max_context:,}" if known else "?",
        ))
    head = f"per rank at context {opts.context:,} x batch {opts.batch}, {_kv_label(ev, opts)}:"
    return [head] + columns(rows)


def context_line(ev: Evaluation) -> str:
    mc = ev.max_context
    if mc is None:
        return "largest context that fits: unknown (give --memory, --chip with --memory, or a --hostfile)"
    tokens, rank = mc
    who = f"rank {rank}" + (f" ({ev.hosts[rank].name})" if ev.hosts[rank].name != f"rank{rank}" else "")
    if tokens == 0:
        line = f"largest context that fits: none; {who} cannot hold its weights"
    else:
        line = f"largest context that fits: {tokens:,} tokens ({who} runs out first)"
    max_pos = ev.plan.config.max_position_embeddings
    if max_pos and tokens > max_pos:
        line += f"; the model itself stops at {max_pos:,} (max_position_embeddings)"
    return line


def kv_mode_lines(ev: Evaluation, opts: Options) -> list[str]:
    """world > n_kv_heads: replicate vs sequence, side by side, and which the plan uses."""
    if not ev.kv_modes:
        return []
    lines = [f"KV heads shared (world {ev.plan.world} > {ev.plan.config.num_key_value_heads} KV heads), "
             f"--kv-shard {opts.kv_shard} uses {ev.plan.kv.shard}:"]
    for mode, m in ev.kv_modes.items():
        if "error" in m:
            lines.append(f"  {mode}: not possible ({m['error']})")
            continue
        ctx = "?" if m["max_context"] is None else f"{m['max_context']:,}"
        lines.append(f"  {mode}: fullest rank KV {human_bytes(m['kv_bytes_max_rank'])} at context "
                     f"{opts.context:,}, weights {human_bytes(m['weight_bytes_max_rank'])}, "
                     f"largest context {ctx}")
    return lines


def kv_capacity_lines(modes: list, recommended, why: str, opts: Options) -> list[str]:
    rows = [("KV mode", "KV per user (fullest rank)", f"users at {opts.context:,}", f"context at batch {opts.batch}")]
    for m in modes:
        if m.error:
            rows.append((m.name, "not possible: " + m.error.split(";")[0][:60], "", ""))
            continue
        rows.append((m.name + (" *" if m is recommended else ""), human_bytes(m.kv_bytes_per_user),
                     "?" if m.users is None else f"{m.users:,}",
                     "?" if m.max_context is None else f"{m.max_context:,}"))
    head = "users x context per KV mode (what is left after weights and overhead; * = recommended):"
    tail = f"recommended KV mode: {recommended.name}: {why}" if recommended else f"recommended KV mode: none ({why})"
    return [head] + columns(rows) + [tail]


def comm_lines(comm: dict, ev: Evaluation, link: LinkProfile | None, opts: Options) -> list[str]:
    tp, kv = comm["head_sharded"], comm["kv_allgather"]
    if ev.plan.world == 1:
        return ["per decode token: one rank, no collectives"]
    on = f" on {link.name}" if link else ""
    tp_line = (f"  head-sharded TP (this runtime): {tp['collectives_per_token']} all_sum x "
               f"{human_bytes(tp['payload_bytes_per_collective'])} = {human_bytes(tp['payload_bytes_per_token'])} "
               f"payload, whatever the context; {human_bytes(tp['wire_bytes_per_rank_per_token'])} sent per rank "
               f"on the wire ({tp['wire_rule']})")
    kv_line = (f"  KV all-gather design: {kv['collectives_per_token']} all_gather, "
               f"{human_bytes(kv['wire_bytes_per_rank_per_token'])} received per rank at context "
               f"{opts.context:,}: {comm['ratio_kv_allgather_to_head_sharded']:,.0f}x the head-sharded wire bytes")
    if link:
        tp_line += f"; {_ms(tp['link_seconds_per_token'])}{on}"
        kv_line += f"; at least {_ms(kv['link_seconds_per_token'])}{on}"
    return [f"per decode token (batch {opts.batch}):", tp_line, kv_line]


def prediction_lines(ev: Evaluation, link: LinkProfile | None) -> list[str]:
    p = ev.prediction
    if p is None:
        return ["predicted decode: unknown (give --chip, or chip in the hostfile)"]
    r = p["per_rank"][p["limiting_rank"]]
    chip = ev.hosts[r["rank"]].chip
    where = f" on {link.name}" if link and ev.plan.world > 1 else " on one Mac"
    lines = [f"predicted decode{where}: {p['tokens_per_second']:.1f} tok/s per sequence "
             f"({p['aggregate_tokens_per_second']:.1f} aggregate) = {_ms(p['seconds_per_token'])}/token:",
             f"  memory {_ms(p['memory_seconds'])} (rank {r['rank']} reads {human_bytes(r['bytes_read'])} at "
             f"{p['eta']:g} x {chip.mem_bandwidth_Bps / 1e9:g} GB/s)"
             + (f" + link {_ms(p['link_seconds'])} ({p['collectives_per_token']} all_sum x "
                f"{p['allreduce_seconds'] * 1e6:.0f} us)" if ev.plan.world > 1 else "")
             + f" + fixed {_ms(p['fixed_seconds'])}"]
    if "speculative" in p:
        s = p["speculative"]
        lines.append(f"predicted speculative decode (acceptance {s['acceptance_rate']:g}, {s['num_draft']} drafts): "
                     f"{s['tokens_per_second']:.1f} tok/s ({s['speedup']:.2f}x) = {s['tokens_per_step']:.2f} tokens "
                     f"per {_ms(s['seconds_per_step'])} verify step; "
                     f"{s['collectives_per_generated_token']:.1f} collectives per generated token")
    return lines


def assumption_lines(ev: Evaluation, link: LinkProfile | None, link_why: str, opts: Options) -> list[str]:
    usable = (f"usable = {opts.usable_fraction:g} of RAM (--usable-fraction)" if opts.usable_fraction
              else capacity.USABLE_RULE)
    lines = [f"assumptions: {usable}; minus {opts.overhead_gb:g} GiB runtime overhead per rank (estimate); "
             f"eta {opts.eta:g} of spec bandwidth (estimate); t_fixed {opts.t_fixed_s * 1e3:g} ms/token (estimate)"]
    if link and ev.plan.world > 1:
        src = link.sources or {}
        lines.append(f"link {link.name} ({link_why}): {link.description}; {link.algorithm} all_sum; "
                     f"alpha {link.alpha_s * 1e6:g} us/step [{src.get('alpha_us', '')}]; "
                     f"{link.bandwidth_Bps * 8 / 1e9:g} Gb/s [{src.get('bandwidth_gbps', '')}]")
        slow_tb = [h.name for h in ev.hosts if h.chip and h.chip.thunderbolt < 5]
        if link.backend.startswith("jaccl") and slow_tb:
            lines.append(f"warning: {link.name} needs Thunderbolt 5 but {', '.join(slow_tb)} only has "
                         f"Thunderbolt {min(h.chip.thunderbolt for h in ev.hosts if h.chip)}")
    for h in ev.hosts:
        if h.chip and h.memory_gb and h.memory_gb not in h.chip.memory_options_gb:
            options = ", ".join(f"{m:g}" for m in h.chip.memory_options_gb)
            lines.append(f"note: {h.name}: {h.chip.name} Macs come with {options} GB, not {h.memory_gb:g} GB")
    return lines


def checkpoint_line(ev: Evaluation, ckpt: tuple[int, str] | None) -> str:
    computed = ev.plan.total_weight_bytes_unsharded()
    line = f"whole model: {human_bytes(computed)} of weights computed from config.json"
    if ckpt is None:
        return line
    size, where = ckpt
    line += f"; the checkpoint ({where}) holds {human_bytes(size)}"
    if abs(size - computed) > 0.03 * computed:
        line += (f", {100 * (size - computed) / computed:+.0f}%: config.json does not describe every tensor; "
                 f"trust the fit less")
    return line


def render_text(ev: Evaluation, decision: Decision, link: LinkProfile | None, link_why: str,
                opts: Options, ckpt: tuple[int, str] | None, modes: dict | None = None) -> str:
    from .parallelism import lines as parallelism_lines

    comm = capacity.comm_per_token(ev.plan, opts, link)
    recommended, why = capacity.recommend_kv_mode(ev.kv_capacity, opts.batch)
    lines = [ev.plan.table(), checkpoint_line(ev, ckpt), *fit_table(ev, opts), context_line(ev),
             *kv_mode_lines(ev, opts), *kv_capacity_lines(ev.kv_capacity, recommended, why, opts),
             *comm_lines(comm, ev, link, opts), *prediction_lines(ev, link),
             f"single Mac or cluster? {decision.line}", *parallelism_lines(modes),
             *assumption_lines(ev, link, link_why, opts)]
    return "\n".join(lines)


def report_dict(ev: Evaluation, decision: Decision, link: LinkProfile | None, link_why: str,
                opts: Options, ckpt: tuple[int, str] | None, modes: dict | None = None) -> dict:
    d = ev.plan.to_dict()  # the shard plan's keys stay at the top level, as before
    for row, f in zip(d["ranks"], ev.fits):
        row.update(host=f.host.name, chip=f.host.chip.name if f.host.chip else None,
                   memory_gb=f.host.memory_gb, usable_bytes=f.usable_bytes, overhead_bytes=f.overhead_bytes,
                   kv_bytes=f.kv_bytes, kv_bytes_per_token=capacity.kv_bytes_per_token(ev.plan, f.rank, opts.kv_bits),
                   headroom_bytes=f.headroom_bytes, fits=f.fits, max_context=f.max_context)
    mc = ev.max_context
    single = decision.single
    recommended, why = capacity.recommend_kv_mode(ev.kv_capacity, opts.batch)
    d.update(
        kv_modes=ev.kv_modes,
        kv_capacity={"modes": [m.to_dict() for m in ev.kv_capacity],
                     "recommended": None if recommended is None else {"kv_bits": recommended.bits,
                                                                      "kv_shard": recommended.shard},
                     "why": why},
        inputs={"context": opts.context, "batch": opts.batch, "kv_bits": opts.kv_bits,
                "kv_shard": opts.kv_shard, "kv_group_size": opts.kv_group_size,
                "overhead_bytes": int(opts.overhead_gb * GIB), "usable_fraction": opts.usable_fraction,
                "eta": opts.eta, "t_fixed_s": opts.t_fixed_s},
        assumptions={"usable_memory": capacity.USABLE_RULE if opts.usable_fraction is None
                     else f"{opts.usable_fraction} of RAM (--usable-fraction)",
                     "link": None if link is None else {
                         "name": link.name, "why": link_why, "backend": link.backend, "algorithm": link.algorithm,
                         "alpha_s": link.alpha_s, "bandwidth_Bps": link.bandwidth_Bps,
                         "mesh_max_bytes": link.mesh_max_bytes, "sources": link.sources}},
        checkpoint={"computed_bytes": ev.plan.total_weight_bytes_unsharded(),
                    "file_bytes": ckpt[0] if ckpt else None, "file_source": ckpt[1] if ckpt else None},
        fits=ev.fits_all,
        max_context=None if mc is None else {"tokens": mc[0], "limiting_rank": mc[1],
                                             "max_position_embeddings": ev.plan.config.max_position_embeddings},
        communication=capacity.comm_per_token(ev.plan, opts, link),
        prediction=ev.prediction,
        decision={"choice": decision.choice, "reason": decision.reason,
                  "single_host": decision.single_host.name if decision.single_host else None,
                  "single_fits": single.fits_all if single else None,
                  "single_prediction": single.prediction if single else None,
                  "macs_needed": decision.macs_needed},
        parallelism=modes,  # TP vs PP (and why no hybrid), with the recommendation; None: not predictable
    )
    return d


def render_json(*args) -> str:
    return json.dumps(report_dict(*args), indent=2)
