"""The process group and the collectives the model issues, counted where they are issued."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
import mlx.core as mx

from ..hardware.links import LinkCost


@dataclass
class CommStats:
    collectives: int = 0
    bytes: int = 0  # payload bytes handed to collectives (per rank)
    link_s: float = 0.0  # emulated link time paid (--link)
    sends: int = 0  # pipeline stage boundaries crossed (point-to-point, counted by the sender)
    send_bytes: int = 0


class Comm:
    """Wraps an `mx.distributed.Group`; every collective of a step goes through here."""

    def __init__(self, group: mx.distributed.Group | None):
        self.group = group
        self.rank = group.rank() if group is not None else 0
        self.world = group.size() if group is not None else 1
        self.stats = CommStats()
        # cost(kind, world, nbytes) -> seconds of an emulated link (simulation only, --link)
        self.link_cost: LinkCost | None = None
        self._owed_s = 0.0

    def emulate_link(self, cost: LinkCost) -> None:
        """Make each collective cost at least `cost(kind, world, nbytes)` seconds ('sum' or
        'gather'): owed at issue, paid by `pay_link_time()` after the step that ran it is evaluated."""
        self.link_cost = cost

    def pay_link_time(self) -> float:
        owed, self._owed_s = self._owed_s, 0.0
        if owed > 0:
            time.sleep(owed)
            self.stats.link_s += owed
        return owed

    def _issue(self, x: mx.array, kind: str) -> None:
        """Count a collective where it is issued, and owe its emulated link time."""
        self.stats.collectives += 1
        self.stats.bytes += x.nbytes
        if self.link_cost is not None:
            self._owed_s += self.link_cost(kind, self.world, x.nbytes)

    def all_sum(self, x: mx.array) -> mx.array:
        if self.world == 1:
            return x
        self._issue(x, "sum")
        return mx.distributed.all_sum(x, group=self.group)

    def broadcast_from_rank0(self, y: mx.array) -> mx.array:
        return self.broadcast_from(y, 0)

    def broadcast_from(self, y: mx.array, src: int) -> mx.array:
        """Rank `src`'s integer `y` on every rank: an all_sum of (y on `src`, zeros elsewhere).
        Lazy like every collective here, so it joins the step's graph without a host sync."""
        if self.world == 1:
            return y
        # Multiply, not zeros_like: the zeros must depend on y, or this all_sum could be
        # scheduled before the step's other collectives on some ranks (a deadlock).
        mine = y.astype(mx.int32) * (1 if self.rank == src else 0)
        return self.all_sum(mine).astype(y.dtype)

    def send(self, x: mx.array, dst: int) -> mx.array:
        """Send `x` to ring neighbour `dst` (lazy: evaluating the result sends)."""
        self.stats.sends += 1
        self.stats.send_bytes += x.nbytes
        return mx.distributed.send(x, dst, group=self.group)

    def recv(self, shape: tuple[int, ...], dtype: mx.Dtype, src: int) -> mx.array:
        """Receive from ring neighbour `src`; the receiver owes the emulated link time (the
        hop delays what it computes next)."""
        x = mx.distributed.recv(shape, dtype, src, group=self.group)
        if self.link_cost is not None:
            self._owed_s += self.link_cost("send", self.world, x.nbytes)
        return x

    def all_gather(self, x: mx.array) -> mx.array:
        """Concatenate `x` from every rank along axis 0 (rank order)."""
        if self.world == 1:
            return x
        self._issue(x, "gather")
        return mx.distributed.all_gather(x, group=self.group)

    def gather_last_axis(self, x: mx.array, sizes: tuple[int, ...]) -> mx.array:
        """Concatenate along the last axis the slices every rank holds; rank r's slice has
        `sizes[r]` columns (uneven splits are padded for the gather, then trimmed)."""
        width, lead = max(sizes), x.shape[:-1]
        rows = x.reshape(-1, x.shape[-1])
        if rows.shape[-1] < width:
            rows = mx.pad(rows, [(0, 0), (0, width - rows.shape[-1])])
        every = self.all_gather(rows).reshape(self.world, -1, width)
        parts = [every[r, :, :n] for r, n in enumerate(sizes)]
        return mx.concatenate(parts, axis=-1).reshape(*lead, sum(sizes))


def init_comm(backend: str = "any") -> Comm:
    """Join the group that `mlx.launch` (or our launcher) described in the environment;
    a plain process is a world of one."""
    launched = any(k in os.environ for k in ("MLX_RANK", "MLX_JACCL_COORDINATOR", "OMPI_COMM_WORLD_RANK"))
    if not launched:
        return Comm(None)
    group = mx.distributed.init(strict=True, backend=backend)
    return Comm(group if group.size() > 1 else None)


def gather_json(comm: Comm, obj, max_bytes: int = 4096) -> list:
    """Every rank's small JSON-able `obj`, in rank order (one all_gather)."""
    import json

    import numpy as np

    data = json.dumps(obj, separators=(",", ":")).encode()
    if len(data) > max_bytes:
        raise ValueError(f"gather_json payload of {len(data)} bytes exceeds {max_bytes}")
    if comm.world == 1:
        return [obj]
    buf = np.zeros(max_bytes, dtype=np.uint8)
    buf[:len(data)] = np.frombuffer(data, dtype=np.uint8)
    rows = np.array(comm.all_gather(mx.array(buf)[None])).reshape(comm.world, max_bytes)
    return [json.loads(bytes(r).rstrip(b"\0").decode()) for r in rows]


def agree(comm: Comm, error: str | None) -> None:
    """Share each rank's startup verdict, so a failure on one rank stops every rank
    instead of leaving the others blocked in their first collective."""
    from ..errors import UserError

    verdicts = gather_json(comm, (error or "")[:400], max_bytes=2048)
    failed = [(r, e) for r, e in enumerate(verdicts) if e]
    if failed:
        r, e = failed[0]
        raise UserError(e if comm.world == 1 else f"rank {r}: {e}")
