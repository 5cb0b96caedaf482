"""`mlx-kvshard perplexity`: score a text through the sharded model and its KV cache exactly
as generation fills it (chunked prefill through the cache), on this rank (under a launcher)
or on N simulated local ranks (`--simulate N`). With --compare-fp, full-precision KV runs
beside it: mean KL divergence and top-1 agreement, as llama.cpp's perplexity tool reports."""

from __future__ import annotations

import argparse
import os

from . import options
from ..errors import UserError
from ..settings import PerplexitySettings, default_dtype


def register(sub) -> None:
    p = sub.add_parser("perplexity", help="perplexity of a text through the sharded model and its KV cache",
                       description=__doc__)
    options.add_model_arguments(p)
    p.add_argument("--file", required=True, metavar="TEXT", help="plain UTF-8 text to score (no chat template)")
    p.add_argument("--context", type=int, default=None, metavar="C",
                   help="tokens per scored window, each through a fresh cache (default: the whole text, "
                        "up to the max context)")
    p.add_argument("--compare-fp", action="store_true",
                   help="also run full-precision KV: perplexity change, mean KL divergence, top-1 agreement")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    options.add_liveness_arguments(p)
    p.set_defaults(func=run, _parser=p)


def perplexity_settings(args: argparse.Namespace) -> PerplexitySettings:
    ppl = PerplexitySettings(args.file, args.context, args.compare_fp, args.json)
    ppl.validate()
    return ppl


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    settings = options.rank_settings(args)  # every flag checked before anything starts
    ppl = perplexity_settings(args)
    if args.simulate is not None:
        return simulate(args)
    from ..quality.rank import run_rank

    return run_rank(settings, ppl)


def simulate(args: argparse.Namespace) -> int:
    """Resolve the model and read the text once (fail fast, before any rank starts)."""
    from ..engine.startup import load_tokenizer, max_context_for
    from ..quality.rank import read_tokens, window_tokens

    settings = options.rank_settings(args)
    model_dir, cfg = options.resolve_checked(settings)
    if not os.path.isfile(args.file):
        raise UserError(f"--file {args.file}: no such file; give a plain text file to score")
    tokens = read_tokens(args.file, load_tokenizer(model_dir, cfg))
    window_tokens(perplexity_settings(args), len(tokens), max_context_for(settings.model, cfg))
    args.file = os.path.abspath(args.file)
    args.model = str(model_dir)
    args.dtype = default_dtype(args.dtype)
    return options.run_simulated(args, "perplexity")
