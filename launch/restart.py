"""`--restart N` and `--exclude HOST`: when a rank is lost (the ranks exit 75, see
mlx_kvshard/liveness.py), start them again from the last generation checkpoint,
optionally without some hosts. Each rank re-plans its shard for the world it finds,
and sampling keyed by (seed, step) makes the resumed tokens those of an uninterrupted run.

The launcher supplies `run_once(hosts, rank_args) -> Attempt`, running the ranks under a
liveness coordinator; this module only decides what the next attempt runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from mlx_kvshard.errors import UserError
from mlx_kvshard.liveness import EXIT_PEER_LOST

FAILED = "failed"  # --exclude failed: the host of the rank that was lost


def add_arguments(p) -> None:
    p.add_argument("--restart", type=int, default=0, metavar="N",
                   help="after a rank is lost, relaunch up to N times, resuming from the last checkpoint")
    p.add_argument("--exclude", action="append", default=[], metavar="HOST",
                   help=f"leave HOST out of relaunches ('{FAILED}': the lost rank's host); repeatable")


def check_arguments(args) -> None:
    if args.restart < 0:
        raise UserError(f"--restart {args.restart}: must be 0 or a number of relaunches")
    if args.exclude and not args.restart:
        raise UserError("--exclude applies to relaunches: give --restart N as well")


@dataclass
class Attempt:
    code: int
    lost_rank: int | None  # the rank the coordinator named, if one
    checkpoint: str | None  # the last checkpoint rank 0 reported


def supervise(hosts: list[str], run: Callable[[dict[str, str]], int], peer_timeout: float, step_timeout: float,
              bind: str = "127.0.0.1", advertise: str | None = None) -> Attempt:
    """One attempt under a liveness coordinator in this (the launcher's) process. `run`
    starts the ranks with the environment it is given and returns the exit code; a
    rank that dies or stalls is named, every rank stops, and the code is EXIT_PEER_LOST.
    On a cluster bind 0.0.0.0 and advertise `local_address_towards(first host's IP)`."""
    from mlx_kvshard.coordinator import Coordinator

    with Coordinator(len(hosts), peer_timeout, step_timeout, hosts=hosts, bind=bind, advertise=advertise) as coord:
        code = run(coord.env())
    lost = coord.failure is not None and code not in (0, 130)
    return Attempt(EXIT_PEER_LOST if lost else code, coord.failure.rank if lost else None,
                   coord.checkpoint[0] if coord.checkpoint else None)


def with_resume(rank_args: list[str], path: str) -> list[str]:
    """`rank_args` continuing from `path`: any earlier --resume replaced."""
    out, skip = [], False
    for a in rank_args:
        if skip:
            skip = False
        elif a == "--resume":
            skip = True
        elif not a.startswith("--resume="):
            out.append(a)
    return [*out, "--resume", path]


def next_hosts(hosts: list[str], exclude: list[str], lost_rank: int | None) -> list[str]:
    """The hosts of the next attempt, in rank order."""
    named = {h for h in exclude if h != FAILED}
    keep = [h for r, h in enumerate(hosts) if h not in named and not (FAILED in exclude and r == lost_rank)]
    if not keep:
        raise UserError(f"--exclude {' '.join(exclude)} leaves no host to relaunch on")
    return keep


def run_with_restarts(run_once: Callable[[list[str], list[str]], Attempt], hosts: list[str],
                      rank_args: list[str], restarts: int, exclude: list[str], say: Callable[[str], None]) -> int:
    attempt = run_once(hosts, rank_args)
    for n in range(1, restarts + 1):
        if attempt.code != EXIT_PEER_LOST:
            break
        hosts = next_hosts(hosts, exclude, attempt.lost_rank)
        if attempt.checkpoint:
            rank_args = with_resume(rank_args, attempt.checkpoint)
        resumed = rank_args[rank_args.index("--resume") + 1] if "--resume" in rank_args else None
        what = f"resuming from {resumed}" if resumed else "no checkpoint was written yet: starting over"
        say(f"restart {n}/{restarts} on {len(hosts)} rank(s) ({', '.join(hosts)}): {what}")
        attempt = run_once(hosts, rank_args)
    return attempt.code
