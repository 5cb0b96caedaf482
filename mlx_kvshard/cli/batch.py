"""`mlx-kvshard generate --prompts-file F.jsonl`: many prompts through the serving engine
at once (continuous batching, prefix cache), one JSON line out per request.

Input: one JSON object per line, `prompt` (text) or `messages` (a chat), and optional
OpenAI-named fields; the command's own flags (--max-tokens, --temp, ...) are the defaults.
Two scheduling fields drive tests and benchmarks: `arrival_s` (submit that many seconds
after the engine is up) and `cancel_after_tokens` (cancel it once it has that many).
A bad line is reported with its line number and the others still run.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import threading
import time
from pathlib import Path

from ..errors import UserError

FIELDS = {"prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p",
          "seed", "stop", "presence_penalty", "frequency_penalty", "repetition_penalty", "logprobs",
          "top_logprobs", "arrival_s", "cancel_after_tokens"}


def add_arguments(p) -> None:
    g = p.add_argument_group("batch (--prompts-file: many prompts through the serving engine)")
    g.add_argument("--prompts-file", metavar="F.jsonl",
                   help="run every line's request through the engine; one JSON result line each on stdout")
    add_engine_arguments(g)
    g.add_argument("--engine-report", metavar="FILE", help="write the engine's metrics as JSON to FILE at the end")


def add_engine_arguments(g) -> None:
    """The serving engine's knobs, shared by `generate --prompts-file` and `serve`."""
    g.add_argument("--max-batch", type=int, default=16, help="sequences decoding together (default 16)")
    g.add_argument("--max-waiting", type=int, default=64, help="requests queued beyond the batch (default 64)")
    g.add_argument("--max-kv-tokens", type=int, default=None,
                   help="KV tokens a rank may hold (default: measured from each rank's free memory)")
    g.add_argument("--kv-layout", choices=("auto", "groups", "padded"), default="auto",
                   help="the running rows' KV: groups (rows in length groups, each holding about its own tokens; "
                        "admission counts each row's own prompt + max_tokens), padded (one left-padded batch: every "
                        "row as long as the longest), auto (groups, except with --pp or sequence-sharded KV: padded)")
    g.add_argument("--prefix-cache-bytes", type=int, default=256 << 20,
                   help="per-rank bytes for cached prompt prefixes (0 = off; default 256 MiB)")
    g.add_argument("--prefix-block-tokens", type=int, default=64, metavar="N",
                   help="tokens per prefix-cache block: a prefix shared by many requests is stored once, as a "
                        "chain of blocks (default 64)")
    g.add_argument("--prefix-cache-dir", metavar="DIR", default=None,
                   help="a disk tier for the prefix cache that survives restarts: every new block is also written "
                        "(off the step path) to DIR/rank<r> on its rank's host, and a hit on blocks that left RAM "
                        "reads them back; a different model or layout is ignored (default: off)")
    g.add_argument("--prefix-cache-disk-bytes", type=int, metavar="N", default=16 << 30,
                   help="per-rank bytes of the disk tier (LRU; default 16 GiB)")
    g.add_argument("--prefill-decode-ratio", type=float, default=2.0, metavar="R",
                   help="while requests decode, prefill at most ~R decode steps' time of prompt per step "
                        "(streaming slows at most ~(1+R)x during a long prefill; 0 = always --prefill-step; a burst of "
                        "at least half as many waiting prompts as decoding rows gets all of --prefill-step)")


@dataclasses.dataclass
class Line:
    index: int  # 0-based line number in the file
    request: object = None  # serving.requests.Request
    arrival_s: float = 0.0
    cancel_after: int | None = None
    error: str | None = None


def read_lines(path: str, defaults, chat_template: bool) -> list[Line]:
    """Parse the file (rank 0 only); a bad line becomes an error entry, not a failure."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--prompts-file {path}: cannot read it ({e})") from None
    out = []
    for i, raw in enumerate(text.splitlines()):
        if raw.strip():
            try:
                out.append(parse_line(i, raw, defaults, chat_template))
            except (ValueError, TypeError, UserError) as e:
                out.append(Line(i, error=f"line {i + 1}: {e}"))
    if not out:
        raise UserError(f"--prompts-file {path}: no requests in it (one JSON object per line)")
    return out


def parse_line(i: int, raw: str, defaults, chat_template: bool) -> Line:
    from ..serving.requests import Request

    obj = json.loads(raw)
    if not isinstance(obj, dict):
        raise ValueError("expected a JSON object")
    unknown = sorted(set(obj) - FIELDS)
    if unknown:
        raise ValueError(f"unknown field {unknown[0]!r} (known: {', '.join(sorted(FIELDS))})")
    if ("prompt" in obj) == ("messages" in obj):
        raise ValueError("give exactly one of 'prompt' (text) or 'messages' (a chat)")
    if "prompt" in obj and not isinstance(obj["prompt"], str):
        raise ValueError("'prompt' must be a string")
    if "messages" in obj and not isinstance(obj["messages"], list):
        raise ValueError("'messages' must be a list of {role, content} objects")
    stop = obj.get("stop", list(defaults.stop))
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise ValueError("'stop' must be a string or a list of strings")
    change = {"max_tokens": obj.get("max_completion_tokens", obj.get("max_tokens")), "temp": obj.get("temperature"),
              "top_p": obj.get("top_p"), "top_k": obj.get("top_k"), "min_p": obj.get("min_p"),
              "seed": obj.get("seed"), "presence_penalty": obj.get("presence_penalty"),
              "frequency_penalty": obj.get("frequency_penalty"),
              "repetition_penalty": obj.get("repetition_penalty")}
    for k, v in change.items():
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise ValueError(f"{k!r} must be a number")
    params = dataclasses.replace(defaults, stop=tuple(stop), **{k: v for k, v in change.items() if v is not None})
    request = Request(prompt=obj.get("prompt"), messages=obj.get("messages"), params=params,
                      chat_template=chat_template, logprobs=bool(obj.get("logprobs", False)),
                      top_logprobs=int(obj.get("top_logprobs", 0)), tag=i)
    cancel = obj.get("cancel_after_tokens")
    return Line(i, request, float(obj.get("arrival_s", 0.0)), int(cancel) if cancel is not None else None)


def engine_settings(args):
    from ..settings import EngineSettings

    if args.pp > 1 and args.prompt_lookup:
        raise UserError(f"not implemented: speculative decoding (--prompt-lookup) with --pp {args.pp}; "
                        f"drop --prompt-lookup or --pp")
    if args.pp > 1 and args.prefix_cache_dir is not None:
        raise UserError(f"not implemented: the prefix cache's disk tier (--prefix-cache-dir) with --pp {args.pp}; "
                        f"drop one of them")
    if args.pp > 1 and args.kv_layout == "groups":  # decided before any rank starts (ranks refuse it too)
        from ..kv.admission import resolve_layout

        resolve_layout(args.kv_layout, pipeline=True, sequence_sharded=False)
    return EngineSettings(max_batch=args.max_batch, max_waiting=args.max_waiting, prefill_step=args.prefill_step,
                          max_kv_tokens=args.max_kv_tokens, kv_layout=args.kv_layout, prefix_cache_bytes=args.prefix_cache_bytes,
                          prefix_block_tokens=args.prefix_block_tokens, prefix_cache_dir=args.prefix_cache_dir,
                          prefix_cache_disk_bytes=args.prefix_cache_disk_bytes,
                          prefill_decode_ratio=args.prefill_decode_ratio, check_sync=args.check_sync,
                          prompt_lookup=args.prompt_lookup, num_draft=args.num_draft)


def run(args, settings, defaults, simulate) -> int:
    """The --prompts-file branch of `generate` (which hands over the rank settings, the
    default sampling and its `simulate(args)`): under --simulate, start the ranks (they run
    this again, without --simulate); on a rank, serve the file's requests."""
    import os

    for flag in ("resume", "json", "restart"):
        if getattr(args, flag):
            raise UserError(f"--{flag} applies to one prompt; it does not combine with --prompts-file")
    if args.draft_model:
        raise UserError("--draft-model: a draft model is not implemented in the serving engine yet (it runs in "
                        "one-prompt generate); use --prompt-lookup N with --prompts-file, or drop it")
    engine = engine_settings(args)
    engine.validate()
    if args.simulate is not None:
        read_lines(args.prompts_file, defaults, True)  # an unreadable file fails here, before any rank starts
        return simulate(args)
    from ..serving.worker import serve_rank

    lines = None
    if int(os.environ.get("MLX_RANK", "0")) == 0:  # only rank 0 reads the file (it lives on rank 0's host)
        lines = read_lines(args.prompts_file, defaults, not args.no_chat_template)
    return serve_rank(settings, engine, lambda e: serve_file(e, lines, args))


def serve_file(engine, lines: list[Line], args) -> int:
    """Rank 0: a feeder thread submits the lines at their arrival times and prints each
    result as it completes; this thread runs the engine until the feeder is done."""
    failures = []
    t0 = time.perf_counter()

    def feed() -> None:
        try:
            threads = []
            for line in sorted(lines, key=lambda ln: ln.arrival_s):
                time.sleep(max(0.0, line.arrival_s - (time.perf_counter() - t0)))
                t = threading.Thread(target=one, args=(line,), daemon=True)
                t.start()
                threads.append(t)
            for t in threads:
                t.join()
        finally:
            engine.shutdown()

    def one(line: Line) -> None:
        from ..serving.requests import RequestError

        if line.error is None:
            try:
                result = collect(engine.submit(line.request), line.cancel_after)
            except RequestError as e:
                line.error = f"line {line.index + 1}: {e}"
        if line.error is not None:
            failures.append(line.index)
            print(f"mlx-kvshard: {line.error}", file=sys.stderr, flush=True)
            emit({"index": line.index, "error": line.error})
        else:
            emit({"index": line.index, **result})

    threading.Thread(target=feed, name="mlx-kvshard-feeder", daemon=True).start()
    engine.run()
    wall = time.perf_counter() - t0
    if args.engine_report:
        report = {"info": engine.info(), "wall_s": wall, "metrics": engine.metrics.snapshot(recent=100000),
                  "audits": engine.audits}
        Path(args.engine_report).write_text(json.dumps(report))
    if args.stats:
        print(stats_line(engine.metrics.snapshot(), wall), file=sys.stderr)
    return 0


_print_lock = threading.Lock()


def emit(obj: dict) -> None:
    with _print_lock:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()


def collect(handle, cancel_after: int | None) -> dict:
    text, tokens, logprobs, done = [], [], [], None
    for ev in handle:
        if ev.kind == "token":
            tokens.append(ev.token)
            if ev.logprob is not None:
                logprobs.append({"token": ev.token, "logprob": ev.logprob, "top": ev.top_logprobs})
            if cancel_after is not None and len(tokens) == cancel_after:
                handle.cancel()
        text.append(ev.text)
        done = ev
    out = {"text": "".join(text), "tokens": tokens, "finish_reason": done.finish_reason,
           "usage": done.usage.to_dict() if done.usage else None}
    if done.kind == "error":
        out["error"] = done.error
    if logprobs:
        out["logprobs"] = logprobs
    return out


def stats_line(m: dict, wall: float) -> str:
    t = m["totals"]
    return (f"[stats] {t['requests']} requests ({', '.join(f'{k} {v}' for k, v in sorted(m['outcomes'].items()))}), "
            f"{t['refused']} refused; {t['prompt_tokens']} prompt tokens ({t['cached_tokens']} from the prefix "
            f"cache), {t['generated_tokens']} generated in {wall:.2f} s = {t['generated_tokens'] / wall:.1f} tok/s; "
            f"{t['steps']} steps, {t['collectives']} collectives, {t['bytes']} bytes per rank"
            + (f"; speculative: {t['drafted']} drafted, {t['accepted']} accepted in {t['verify_steps']} verify steps, "
               f"{m['collectives_per_generated_token']:.1f} decode collectives per generated token"
               if t["verify_steps"] else ""))
