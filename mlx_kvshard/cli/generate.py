"""`mlx-kvshard generate`: run one prompt on this rank (under a launcher) or on N
simulated local ranks (`--simulate N`)."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from . import batch, options

from ..liveness import checkpoint as gencheckpoint
from ..errors import UserError
from ..engine.generate import SamplingParams
from ..settings import (DEFAULT_CHECKPOINT_EVERY, CheckpointSettings, OutputSettings, RankSettings,
                        SpeculativeSettings, default_dtype)


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt")
    options.add_model_arguments(p)
    p.add_argument("--prompt", default="Hello", help="prompt text ('-' reads standard input)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temp", type=float, default=0.0, help="sampling temperature (0 = greedy)")
    p.add_argument("--top-p", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--repetition-context-size", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--no-chat-template", action="store_true", help="feed the prompt as is")
    p.add_argument("--check-sync", action="store_true",
                   help="debug: verify every rank holds the identical token sequence")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    p.add_argument("--stats", action="store_true", help="print a run summary (timings, memory, traffic) to stderr")
    add_speculative_arguments(p)
    add_checkpoint_arguments(p)
    options.add_liveness_arguments(p)
    batch.add_arguments(p)
    p.set_defaults(func=run, _parser=p)


def add_speculative_arguments(p) -> None:
    g = p.add_argument_group("speculative decoding (same tokens as without; fewer collectives per token)")
    g.add_argument("--draft-model", metavar="PATH|HUB_ID",
                   help="small model with the target's tokenizer; rank 0 runs it and shares its proposals")
    g.add_argument("--num-draft", type=int, default=3, metavar="K", help="tokens proposed per verify step (default 3)")
    g.add_argument("--prompt-lookup", type=int, default=0, metavar="N",
                   help="propose what followed the latest match of the last n <= N tokens in prompt + output")


def add_checkpoint_arguments(p) -> None:
    p.add_argument("--checkpoint", metavar="FILE",
                   help="where rank 0 keeps the generation checkpoint (default: the --resume file, else a new "
                        "file under the cache's checkpoints/ folder, removed when generation completes)")
    p.add_argument("--checkpoint-every", type=int, default=DEFAULT_CHECKPOINT_EVERY, metavar="K",
                   help=f"write the checkpoint every K tokens (0: never; default {DEFAULT_CHECKPOINT_EVERY})")
    p.add_argument("--resume", metavar="FILE",
                   help="continue the generation saved in FILE (its model, prompt, sampling and seed)")


def sampling_params(args) -> SamplingParams:
    params = SamplingParams(
        max_tokens=args.max_tokens, temp=args.temp, top_p=args.top_p, top_k=args.top_k,
        min_p=args.min_p, repetition_penalty=args.repetition_penalty,
        repetition_context_size=args.repetition_context_size, seed=args.seed, stop=tuple(args.stop),
    )
    params.validate()
    return params


def rank_settings(args: argparse.Namespace) -> RankSettings:
    """The typed settings of one rank job; the namespace stops here."""
    settings = dataclasses.replace(
        options.rank_settings(args),
        checkpoint=CheckpointSettings(args.checkpoint, args.checkpoint_every, args.resume),
        output=OutputSettings(args.json, args.stats, args.check_sync),
        speculative=SpeculativeSettings(args.draft_model, args.num_draft, args.prompt_lookup),
    )
    settings.validate()
    return settings


def apply_resume(ck, args: argparse.Namespace) -> None:
    """Make `args` describe the checkpointed run: its model (unless --model names one),
    sampling, seed, dtype and context. A flag set to another value is a mistake, except
    --max-tokens, which may extend or shorten the run."""
    default = args._parser.get_default
    for dest, value in gencheckpoint.resumed_values(ck).items():
        given = getattr(args, dest)
        if given != default(dest) and given != value and not (dest == "dtype" and given == "auto"):
            flag = "--" + dest.replace("_", "-")
            raise UserError(f"{flag} {given}: --resume continues a run that used {flag} {value}; "
                            f"drop {flag} to reproduce it")
        setattr(args, dest, value)
    if args.model == default("model"):
        args.model = ck.model["path"]
    if args.max_tokens == default("max_tokens"):
        args.max_tokens = ck.sampling["max_tokens"]


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.prompts_file:  # many prompts through the serving engine
        return batch.run(args, rank_settings(args), sampling_params(args), simulate)
    if args.prompt == "-":
        args.prompt = sys.stdin.read()
    sampling_params(args)
    rank_settings(args)  # every flag checked before anything starts
    if args.simulate is not None:
        return simulate(args)
    from ..engine.rank import run_rank

    def on_resume(ck):  # on every rank, once rank 0 has shared the checkpoint
        apply_resume(ck, args)
        return rank_settings(args), sampling_params(args)

    return run_rank(rank_settings(args), sampling_params(args), args.prompt,
                    chat_template=not args.no_chat_template, on_resume=on_resume)


def simulate(args: argparse.Namespace) -> int:
    """Check what can be checked once, build the model once, then start the ranks."""
    from ..engine.rank import check_prompt

    ck = None
    if args.resume:  # a corrupt or mismatched checkpoint fails here, before any rank starts
        ck = gencheckpoint.read(args.resume)
        apply_resume(ck, args)
    settings = rank_settings(args)
    model_dir, _ = options.resolve_checked(settings)
    _, tokenizer = check_prompt(settings, args.prompt, not args.no_chat_template, ck,  # fails fast before any rank starts
                                sampling_params(args))
    if args.draft_model:
        from ..engine.draft import check_draft

        args.draft_model = str(check_draft(args.draft_model, tokenizer))
    args.model = str(model_dir)
    args.dtype = default_dtype(args.dtype)
    return options.run_simulated(args, "generate")

