"""`mlx-kvshard plan`: what each rank would own, whether it fits, how fast it would decode,
and whether one Mac would do. Reads config.json only (plus checkpoint sizes when at hand)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..planner import capacity, parallelism
from ..planner.capacity import Host, Options
from ..config import ModelConfig
from ..errors import UserError
from ..models.resolve import _looks_like_hub_id
from ..settings import parse_numbers


def register(sub) -> None:
    p = sub.add_parser("plan", help="shard plan, memory fit, context and decode speed per rank "
                                    "(reads config.json only)")
    p.add_argument("--model", required=True, help="local model directory, HF hub id, or 'tiny'")
    p.add_argument("--world", type=int, help="number of ranks (or give --hostfile)")
    p.add_argument("--hostfile", help="MLX hostfile (JSON), or the name of a shipped example; per host "
                                     "optional memory_gb and chip (IPs and RDMA devices may be missing)")
    p.add_argument("--shares", "--weights", dest="weights", metavar="SHARES",
                   help="comma-separated per-rank shares of the split (default: usable memory; --weights: old spelling)")
    p.add_argument("--dtype", default=None, help="compute/KV dtype (default: the checkpoint's)")
    p.add_argument("--context", type=int, default=8192, help="tokens of context per sequence (default 8192)")
    p.add_argument("--batch", type=int, default=1, help="sequences decoded together (default 1)")
    p.add_argument("--kv-bits", type=int, default=16, choices=capacity.KV_BITS,
                   help="KV cache precision: 16 (compute dtype), 8 or 4 (mlx-lm quantized cache)")
    p.add_argument("--kv-group-size", type=int, default=capacity.KV_QUANT_GROUP, choices=(32, 64, 128),
                   help="head_dim elements per KV quantization scale/bias (default 64)")
    p.add_argument("--kv-shard", default="replicate", choices=("replicate", "sequence", "auto"),
                   help="world > KV heads: replicate a shared head's cache, split it by sequence "
                        "position, or pick the smaller per-rank memory at --context (default replicate)")
    p.add_argument("--memory", help="RAM per rank in GB, one value or comma-separated: 64 or 64,24,16")
    p.add_argument("--chip", help="chip profile for every rank (m4pro) or comma-separated per rank")
    p.add_argument("--link", help="link profile name or JSON file (default: from hostfile backend and chips)")
    p.add_argument("--usable-fraction", type=float, default=None,
                   help="fraction of RAM the GPU may use (default: macOS rule, 2/3 up to 36 GB, 3/4 above)")
    p.add_argument("--overhead-gb", type=float, default=capacity.DEFAULT_OVERHEAD_GB,
                   help=f"runtime overhead per rank in GiB (default {capacity.DEFAULT_OVERHEAD_GB})")
    p.add_argument("--eta", type=float, default=capacity.DEFAULT_ETA,
                   help=f"achieved fraction of memory bandwidth (default {capacity.DEFAULT_ETA})")
    p.add_argument("--t-fixed-ms", type=float, default=capacity.DEFAULT_T_FIXED_S * 1e3,
                   help=f"fixed per-token overhead in ms (default {capacity.DEFAULT_T_FIXED_S * 1e3:g})")
    p.add_argument("--vocab-parallel", action="store_true",
                   help="split lm_head by vocabulary rows (one logits all_gather per token) instead of replicating it")
    p.add_argument("--spec-accept", type=float, default=None, metavar="A",
                   help="also predict speculative decoding with per-token acceptance rate A (batch 1)")
    p.add_argument("--num-draft", type=int, default=3, metavar="K", help="tokens proposed per verify step (default 3)")
    p.add_argument("--draft-gb", type=float, default=0.0,
                   help="draft model weights in GB, read per drafted token on rank 0 (default 0: prompt lookup)")
    p.add_argument("--pp", type=int, default=1, metavar="S",
                   help="check a pipeline of S stages (one per rank) as `generate --pp S` would run it; the TP vs "
                        "PP comparison is printed whenever chips and a link are known")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def _per_rank(values: list | None, world: int, flag: str) -> list | None:
    if values is None or len(values) == world:
        return values
    if len(values) == 1:
        return values * world
    raise UserError(f"{flag}: got {len(values)} values for a world of {world}; give one, or one per rank")


def resolve_hosts(args: argparse.Namespace) -> tuple[list[Host], str | None]:
    """Hosts from --hostfile, --world, --memory and --chip (flags override the hostfile)."""
    from ..launch.hostfile import load_hostfile
    from ..hardware.profiles import load_chip

    cluster = load_hostfile(args.hostfile, planning=True) if args.hostfile else None
    entries, backend = (cluster.hosts, cluster.backend) if cluster else ([], None)
    memory = parse_numbers(args.memory, "--memory")
    chips = args.chip.split(",") if args.chip else None
    world = args.world
    if world is None:
        world = len(entries) or (len(memory) if memory else 0) or (len(chips) if chips else 0)
    if not world:
        raise UserError("give --world N or --hostfile FILE")
    if world < 1:
        raise UserError(f"--world must be at least 1, got {world}")
    if entries and len(entries) != world:
        raise UserError(f"--world {world} but --hostfile {args.hostfile} lists {len(entries)} hosts")
    names = [h.label for h in entries] or [f"rank{r}" for r in range(world)]
    memory = _per_rank(memory, world, "--memory") or [h.memory_gb for h in entries] or [None] * world
    chips = _per_rank(chips, world, "--chip") or [h.chip for h in entries] or [None] * world
    loaded = {name: load_chip(name.strip()) for name in set(chips) if name}
    hosts = [Host(name=names[r], memory_gb=memory[r], chip=loaded[chips[r]] if chips[r] else None)
             for r in range(world)]
    return hosts, backend


def choose_link(args: argparse.Namespace, hosts: list[Host], backend: str | None):
    """The --link profile, else one implied by the hostfile's backend and the chips' Thunderbolt."""
    from ..hardware.profiles import load_link

    if args.link:
        return load_link(args.link), "--link"
    if len(hosts) == 1:
        return None, "one rank: no link"
    if backend in ("jaccl", "jaccl-ring"):
        name = "tb5-rdma" if backend == "jaccl" else "tb5-rdma-ring"
        return load_link(name), f"hostfile backend {backend}"
    if hosts and all(h.chip is not None and h.chip.thunderbolt >= 5 for h in hosts):
        return load_link("tb5-ring"), "default for Thunderbolt 5 Macs without RDMA; pass --link"
    return load_link("tb4-ring"), "default; pass --link"


def checkpoint_bytes(model: str, config_path: Path) -> tuple[int, str] | None:
    """Tensor bytes the checkpoint declares (index total_size, or .safetensors sizes), if at hand."""
    folder = config_path.parent
    index = folder / "model.safetensors.index.json"
    if not index.exists() and not any(folder.glob("*.safetensors")) and _looks_like_hub_id(model):
        try:  # a hub id: the index is small; honours HF_HUB_OFFLINE (then only the cache)
            from huggingface_hub import hf_hub_download

            index = Path(hf_hub_download(model, "model.safetensors.index.json"))
        except Exception:  # no index (single-file checkpoint), offline, no network: not needed
            return None
    if index.exists():
        try:
            total = json.loads(index.read_text())["metadata"]["total_size"]
            return int(total), index.name
        except (ValueError, KeyError, TypeError):
            return None
    files = list(folder.glob("*.safetensors"))
    if files:
        return sum(f.stat().st_size for f in files), f"{len(files)} .safetensors file(s)"
    return None


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from ..planner.report import render_json, render_text
    from ..models.resolve import resolve_config_path

    config_path = resolve_config_path(args.model)
    cfg = ModelConfig.from_file(config_path)
    opts = Options(context=args.context, batch=args.batch, kv_bits=args.kv_bits, overhead_gb=args.overhead_gb,
                   usable_fraction=args.usable_fraction, eta=args.eta, t_fixed_s=args.t_fixed_ms / 1e3,
                   vocab_parallel=args.vocab_parallel, spec_accept=args.spec_accept, num_draft=args.num_draft,
                   draft_gb=args.draft_gb, kv_shard=args.kv_shard, kv_group_size=args.kv_group_size)
    opts.check()
    hosts, backend = resolve_hosts(args)
    link, link_why = choose_link(args, hosts, backend)
    shares = _per_rank(parse_numbers(args.weights, "--shares"), len(hosts), "--shares")
    if args.pp > 1:  # what `generate --pp S` would refuse, refused here
        from ..pipeline.stages import StagePlan, check_world

        check_world(args.pp, len(hosts))
        StagePlan.build(cfg, args.pp, shares, args.dtype, opts.kv, opts.context)
    cluster = capacity.evaluate(cfg, hosts, link, opts, shares=shares, compute_dtype=args.dtype)
    decision = capacity.decide(cfg, cluster, link, opts, compute_dtype=args.dtype)
    modes = parallelism.compare(cfg, hosts, link, opts, shares, args.dtype)
    ckpt = checkpoint_bytes(args.model, Path(config_path))
    render = render_json if args.json else render_text
    print(render(cluster, decision, link, link_why, opts, ckpt, modes))
    return 0

