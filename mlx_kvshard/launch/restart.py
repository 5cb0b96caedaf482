"""`--restart N` and `--exclude HOST`: when a rank is lost (the ranks exit 75, see
mlx_kvshard/liveness/client.py), start them again from the last generation checkpoint,
optionally without some hosts. Each rank re-plans its shard for the world it finds,
and sampling keyed by (seed, step) makes the resumed tokens those of an uninterrupted run.

The launcher supplies `run_once(hosts, rank_args) -> Attempt`, running the ranks under a
liveness coordinator; this module only decides what the next attempt runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..errors import UserError
from ..liveness.client import EXIT_PEER_LOST

FAILED = "failed"  # --exclude failed: the host of the rank that was lost
# What a relaunch without a checkpoint does: `serve --restart` always runs behind the front
# (mlx_kvshard/front), which moves the requests that were open to the new group.
FRESH = {"serve": "serving again; the requests in flight continue on the relaunched group"}
FRESH_DEFAULT = "no checkpoint was written yet: starting over"


@dataclass
class Attempt:
    code: int
    lost_rank: int | None  # the rank the coordinator named, if one
    checkpoint: str | None  # the last checkpoint rank 0 reported
    hosts: list | None = None  # the hosts of this attempt in rank order, when wiring reordered them


def supervise(hosts: list[str], run: Callable[[dict[str, str], Callable[[str, int], None]], int],
              peer_timeout: float, step_timeout: float, bind: str = "127.0.0.1",
              advertise: str | None = None) -> Attempt:
    """One attempt under a liveness coordinator in this (the launcher's) process.
    `run(env, request_stop)` starts the ranks with the environment it is given (the
    coordinator's address and the launch's token), hands `request_stop` to the runner
    for a stop on request, and returns the exit code; a rank that dies or stalls is
    named, every rank stops, and the code is EXIT_PEER_LOST.
    On a cluster bind 0.0.0.0 and advertise `local_address_towards(first host's IP)`."""
    from ..liveness.coordinator import Coordinator

    with Coordinator(len(hosts), peer_timeout, step_timeout, hosts=hosts, bind=bind, advertise=advertise) as coord:
        code = run(coord.env(), coord.request_stop)
    lost = coord.failure is not None and coord.stop_requested is None and code not in (0, 130, 143)
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


def next_hosts(hosts: list, exclude: list[str], lost_rank: int | None, label=str) -> list:
    """The hosts of the next attempt: `hosts` (in the last attempt's rank order) without
    those --exclude names, nor the lost rank's with `--exclude failed`. By position, so
    simulated ranks that share 127.0.0.1 drop one at a time."""
    named = {h for h in exclude if h != FAILED}
    keep = [h for r, h in enumerate(hosts) if label(h) not in named and not (FAILED in exclude and r == lost_rank)]
    if not keep:
        raise UserError(f"--exclude {' '.join(exclude)} leaves no host to relaunch on")
    return keep


def run_with_restarts(run_once: Callable[[list, list[str]], Attempt], hosts: list, rank_args: list[str],
                      restarts: int, exclude: list[str], say: Callable[[str], None], label=str) -> int:
    attempt = run_once(hosts, rank_args)
    for n in range(1, restarts + 1):
        if attempt.code != EXIT_PEER_LOST:
            break
        hosts = next_hosts(attempt.hosts or hosts, exclude, attempt.lost_rank, label)
        if attempt.checkpoint:
            rank_args = with_resume(rank_args, attempt.checkpoint)
        resumed = rank_args[rank_args.index("--resume") + 1] if "--resume" in rank_args else None
        what = f"resuming from {resumed}" if resumed else FRESH.get(rank_args[0] if rank_args else "", FRESH_DEFAULT)
        say(f"restart {n}/{restarts} on {len(hosts)} rank(s) ({', '.join(map(label, hosts))}): {what}")
        attempt = run_once(hosts, rank_args)
    return attempt.code


# ---- the cluster launcher (`mlx-kvshard launch`) ---------------------------------------

def subset(cluster, cables, kept: list):
    """`cluster` (and `cables`) with only the HostSpecs `kept`, re-indexed: the cables and
    RDMA links between kept hosts stay, so the smaller world is wired like the first."""
    from dataclasses import replace

    from .hostfile import Cable

    old = [h.index for h in kept]
    pos = {o: i for i, o in enumerate(old)}
    hosts = [replace(h, index=i, rdma=[h.rdma[o] for o in old] if h.rdma else h.rdma) for i, h in enumerate(kept)]

    def remap(cs):
        return [Cable(pos[c.a], pos[c.b], c.a_ip, c.b_ip) for c in cs if c.a in pos and c.b in pos]

    return replace(cluster, hosts=hosts, cables=remap(cluster.cables)), None if cables is None else remap(cables)


def address_towards(host) -> str:
    """This machine's address on the route to `host` (a HostSpec): where its rank reaches the launcher."""
    from ..liveness.coordinator import local_address_towards

    if host.is_local:
        return "127.0.0.1"
    return local_address_towards(host.ips[0] if host.ips else host.ssh.split("@")[-1])


def run_launch(cluster, cables, rank_args: list[str], timeouts: tuple[float, float], restarts: int,
               exclude: list[str], start: Callable, say: Callable[[str], None]) -> int:
    """Every attempt under a coordinator with the rank command's (peer, step) `timeouts`.
    `start(cluster, cables, rank_args, env, attempt, request_stop)` wires, builds and runs
    the ranks with `env` added, and returns the exit code."""
    from .topology import wire

    peer_timeout, step_timeout = timeouts
    remote = [h for h in cluster.hosts if not h.is_local]
    # Remote ranks reach the launcher at its address on the route to them.
    bind, advertise = ("127.0.0.1", None) if not remote else ("0.0.0.0", address_towards(remote[0]))
    attempts = 0

    def once(kept: list, attempt_args: list[str]) -> Attempt:
        nonlocal attempts
        n, attempts = attempts, attempts + 1
        sub, sub_cables = subset(cluster, cables, kept)
        ranks = [kept[h.index] for h in wire(sub, sub_cables).hosts]  # rank order, as start() wires them
        attempt = supervise([h.label for h in ranks],
                            lambda env, stop: start(sub, sub_cables, attempt_args, env, n, stop),
                            peer_timeout, step_timeout, bind, advertise)
        attempt.hosts = ranks
        return attempt

    return run_with_restarts(once, list(cluster.hosts), rank_args, restarts, exclude, say, label=lambda h: h.label)
