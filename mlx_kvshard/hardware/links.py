"""The link cost model: seconds one collective (or one send to a neighbour) takes over a
link profile. The planner predicts with it, and `--link` makes the engine pay it."""

from __future__ import annotations

from typing import Callable

from .profiles import LinkProfile, load_link

# (kind 'sum' | 'gather' | 'send', world, nbytes) -> seconds
LinkCost = Callable[[str, int, int], float]


def allreduce_seconds(link: LinkProfile, world: int, nbytes: float) -> float:
    """One all_sum of `nbytes` (the payload each rank holds) across `world` ranks."""
    if world <= 1:
        return 0.0
    if link.algorithm == "mesh" and nbytes <= link.mesh_max_bytes:
        # one step: each rank sends its whole payload to every peer at once, one cable per peer
        return link.alpha_s + nbytes / link.bandwidth_Bps
    # ring: N-1 reduce-scatter steps then N-1 all-gather steps of payload/N each (MLX ring.cpp)
    steps = 2 * (world - 1)
    return steps * link.alpha_s + steps / world * nbytes / link.bandwidth_Bps


def allgather_seconds(link: LinkProfile, world: int, nbytes: float) -> float:
    """One all_gather where each rank contributes `nbytes` (ring: N-1 steps of one block)."""
    if world <= 1:
        return 0.0
    return (world - 1) * (link.alpha_s + nbytes / link.bandwidth_Bps)


def send_seconds(link: LinkProfile, nbytes: float) -> float:
    """One send of `nbytes` to a neighbour (a pipeline stage boundary): one hop."""
    return link.alpha_s + nbytes / link.bandwidth_Bps


def link_cost(name: str) -> LinkCost:
    """cost(kind, world, nbytes) -> seconds for a link profile, by name or path."""
    link = load_link(name)

    def cost(kind: str, world: int, nbytes: int) -> float:
        if kind == "send":
            return send_seconds(link, nbytes)
        return (allreduce_seconds if kind == "sum" else allgather_seconds)(link, world, nbytes)

    return cost
