"""The prefix cache's disk tier (--prefix-cache-dir DIR): every rank keeps its own heads'
slice of each block in DIR/rank<r> (on a cluster, on its own Mac's disk), one file per
block id, so N Macs read their slices in parallel.

- Writes never block a step: the step thread hands the block's evaluated arrays to a writer
  thread through a bounded queue; past `max_pending_bytes` the write is dropped (a later
  hit on it finds no file, and every rank recomputes from there).
- Every file carries a header (the tier's epoch, block id, parent, array shapes) and a
  blake2b digest of its bytes: a missing, truncated, corrupt or foreign file reads as
  invalid. A LOAD reads a chain of blocks and stops at the first invalid one; the ranks
  agree on the shortest valid run with one all_gather (batch.py).
- Persistent: DIR/rank<r>/layout.json names what the blocks are (model identity, world,
  this rank's heads and sequence share, dtype, KV bits/group/rotation, block size) and an
  epoch. At start every rank reports its file with one gather, and every rank reaches the
  same verdict: all match with one epoch (resume: rank 0 rebuilds its index from its
  manifest, which holds each block's tokens), or start afresh with rank 0's new epoch
  (one notice when the old one was another model or layout), or, when a rank cannot
  write its directory, the tier is off on every rank (one warning).
- Block ids are never reused within an epoch (rank 0 reserves them ahead in its
  layout.json), so a stale file can never pass for a new block.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import secrets
import sys
import threading
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache, QuantizedKVCache

from ..liveness.checkpoint import model_identity as checkpoint_identity

FORMAT = 1
RESERVE = 1 << 20  # block ids rank 0 reserves ahead (written before any of them can reach a disk)
MAX_ID = 1 << 30  # past it, the tier starts a new epoch (ids travel as int32)
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def say(line: str) -> None:
    print(f"mlx-kvshard: {line}", file=sys.stderr, flush=True)


def model_identity(model_dir: Path) -> str:
    """The model's identity as a generation checkpoint records it (config, tokenizer, weight
    files' sizes and edges, path: liveness/checkpoint.py), as one short hash."""
    return hashlib.blake2b(json.dumps(checkpoint_identity(model_dir), sort_keys=True).encode(), digest_size=12).hexdigest()


def layout_of(loaded, block_tokens: int) -> dict:
    """What this rank's block files hold: another value here makes them unusable."""
    shard, kv = loaded.model.shard, loaded.model.kv
    return {"format": FORMAT, "model": model_identity(loaded.model_dir), "world": loaded.comm.world,
            "rank": loaded.comm.rank, "kv_heads": list(shard.kv_heads), "q_heads": list(shard.q_heads),
            "seq_sharers": shard.seq_sharers, "seq_index": shard.seq_index, "dtype": loaded.dtype_name,
            "kv_bits": kv.bits, "kv_group": kv.group_size, "kv_rotate": kv.rotated, "block_tokens": block_tokens}


class DiskTier:
    """One rank's block files, its writer thread and its counters."""

    def __init__(self, root: Path, epoch: str, kv, max_pending_bytes: int = 256 << 20):
        self.root = root
        self.blocks_dir = root / "blocks"
        self.epoch = epoch
        self.kv = kv  # KVSettings: which cache a file becomes
        self.max_pending_bytes = max_pending_bytes
        self.broken: str | None = None  # why the tier stopped on this rank
        self.off = False
        self.restored: list = []  # rank 0: the manifest's blocks, to rebuild the index
        self.next_id = 0  # rank 0: the first id this run may use
        self.reserved = 0
        self.stats = {"write_bytes": 0, "write_s": 0.0, "writes": 0, "writes_dropped": 0, "read_bytes": 0,
                      "read_s": 0.0, "reads": 0, "read_failures": 0}
        self._lock = threading.Lock()
        self._pending: dict[int, tuple[int, list]] = {}  # id -> (parent, arrays): queued, not yet written
        self._pending_bytes = 0
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._writer, name="mlx-kvshard-disk-writer", daemon=True)
        self._thread.start()

    # ---- the step thread ----------------------------------------------------------------

    def write(self, block: int, parent: int, layers: list) -> None:
        """Queue one block's layers (evaluated arrays) for writing; dropped when too much waits."""
        if self.off or self.broken:
            return
        arrays = [a for c in layers for a in _flat(c)]
        size = sum(a.nbytes for a in arrays)
        with self._lock:
            if self._pending_bytes + size > self.max_pending_bytes:
                self.stats["writes_dropped"] += 1
                return
            self._pending[block] = (parent, arrays)
            self._pending_bytes += size
        self._queue.put(("write", block))

    def unlink(self, ids: list[int]) -> None:
        if not self.off and ids:
            self._queue.put(("unlink", list(ids)))

    def read(self, parent: int, ids: list[int]) -> list[list]:
        """The layers of the leading blocks of `ids` (a chain from `parent`) this rank could
        read and verify, stopping at the first it could not."""
        out = []
        for i in ids:
            layers = None if self.off or self.broken else self._read_one(i, parent)
            if layers is None:
                self.stats["read_failures"] += 1
                break
            out.append(layers)
            parent = i
        return out

    def save_manifest(self, entries: list, next_id: int) -> None:
        """Rank 0: the disk blocks' tokens and parents (written off the step thread)."""
        if not self.off and not self.broken:
            self._queue.put(("manifest", (entries, next_id)))

    def reserve(self, next_id: int) -> None:
        """Rank 0: before ids up to `next_id` are handed out, record them as used (synchronously:
        one small file, once per RESERVE ids)."""
        if self.off or self.broken:
            return
        try:
            layout = json.loads((self.root / "layout.json").read_text())
            self.reserved = next_id + RESERVE
            _write_json(self.root / "layout.json", {**layout, "next_id": self.reserved})
        except (OSError, ValueError) as e:
            self._fail(e)

    def stop(self) -> None:
        """DISKOFF: the tier stops on every rank together."""
        self.off = True

    def close(self, timeout: float = 30.0) -> None:
        """Finish the queued writes (at shutdown), then end the writer."""
        self._queue.put(("close", None))
        self._thread.join(timeout)

    # ---- reading ------------------------------------------------------------------------

    def _read_one(self, block: int, parent: int) -> list | None:
        with self._lock:
            queued = self._pending.get(block)
        if queued is not None:  # not written yet: the arrays are still here
            return self._layers(queued[1]) if queued[0] == parent else None
        t0 = time.perf_counter()
        try:
            data = (self.blocks_dir / f"{block}.kv").read_bytes()
        except OSError:
            return None
        head, _, payload = data.partition(b"\n")
        try:
            h = json.loads(head)
            ok = (h["epoch"] == self.epoch and h["id"] == block and h["parent"] == parent
                  and len(payload) == sum(n for _, _, n in h["arrays"])
                  and hashlib.blake2b(payload, digest_size=16).hexdigest() == h["digest"])
        except (ValueError, KeyError, TypeError):
            return None
        if not ok:
            return None
        arrays, at = [], 0
        for dtype, shape, n in h["arrays"]:
            dt = getattr(mx, dtype)
            raw = np.frombuffer(payload, dtype=_UINT[dt.size], count=n // dt.size, offset=at)
            arrays.append(mx.array(raw).view(dt).reshape(shape))
            at += n
        self.stats["reads"] += 1
        self.stats["read_bytes"] += len(data)
        self.stats["read_s"] += time.perf_counter() - t0
        return self._layers(arrays)

    def _layers(self, arrays: list) -> list:
        """Per layer, a single-stream cache of this rank's kind holding one block."""
        per = 2 if self.kv.bits is None else 6
        out = []
        for j in range(0, len(arrays), per):
            a = arrays[j:j + per]
            if self.kv.bits is None:
                c = KVCache()
                c.keys, c.values = a
            else:
                c = QuantizedKVCache(group_size=self.kv.group_size, bits=self.kv.bits)
                c.keys, c.values = list(a[:3]), list(a[3:])
            c.offset = a[0].shape[2]
            out.append(c)
        return out

    # ---- the writer thread --------------------------------------------------------------

    def _writer(self) -> None:
        while True:
            kind, arg = self._queue.get()
            if kind == "close":
                return
            try:
                if kind == "write":
                    self._write_block(arg)
                elif kind == "unlink":
                    for i in arg:
                        (self.blocks_dir / f"{i}.kv").unlink(missing_ok=True)
                elif kind == "manifest":
                    entries, next_id = arg
                    _write_json(self.root / "manifest.json", {"epoch": self.epoch, "next_id": next_id,
                                                              "blocks": entries})
            except OSError as e:
                self._fail(e)
            finally:
                if kind == "write":
                    with self._lock:
                        parent, arrays = self._pending.pop(arg)
                        self._pending_bytes -= sum(a.nbytes for a in arrays)

    def _write_block(self, block: int) -> None:
        if self.off or self.broken:
            return
        with self._lock:
            parent, arrays = self._pending[block]
        t0 = time.perf_counter()
        views = [memoryview(a) for a in arrays]  # evaluated arrays: their bytes, read without MLX ops
        digest = hashlib.blake2b(digest_size=16)
        for v in views:
            digest.update(v)
        head = {"epoch": self.epoch, "id": block, "parent": parent, "digest": digest.hexdigest(),
                "arrays": [[str(a.dtype).rsplit(".", 1)[-1], list(a.shape), a.nbytes] for a in arrays]}
        tmp = self.blocks_dir / f".{block}.tmp"
        with open(tmp, "wb") as f:
            f.write(json.dumps(head, separators=(",", ":")).encode() + b"\n")
            for v in views:
                f.write(v)
        os.replace(tmp, self.blocks_dir / f"{block}.kv")
        self.stats["writes"] += 1
        self.stats["write_bytes"] += sum(a.nbytes for a in arrays)
        self.stats["write_s"] += time.perf_counter() - t0

    def _fail(self, e: Exception) -> None:
        if self.broken is None:
            self.broken = f"{self.root}: {getattr(e, 'strerror', None) or e}"
            say(f"warning: the prefix cache's disk tier stops ({self.broken}); serving goes on from RAM")


def _flat(cache) -> list:
    """A single-stream cache's arrays: keys then values (each a triple when quantized)."""
    keys, values = cache.keys, cache.values
    if isinstance(keys, (tuple, list)):
        return [*keys, *values]
    return [keys, values]


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, separators=(",", ":")))
    os.replace(tmp, path)


def open_tier(loaded, settings) -> DiskTier | None:
    """Every rank, at start (one gather): this rank's tier, or None when it is off on every rank."""
    from ..engine.dist import gather_json

    comm = loaded.comm
    base = Path(os.path.expanduser(settings.prefix_cache_dir))
    mine = base / f"rank{comm.rank}"
    report: dict = {"error": None, "found": None, "epoch": None, "next_id": 0}
    try:
        layout = layout_of(loaded, settings.prefix_block_tokens)
        (mine / "blocks").mkdir(parents=True, exist_ok=True)
        probe = mine / f".probe-{os.getpid()}"
        probe.write_bytes(b"x")
        probe.unlink()
        try:
            saved = json.loads((mine / "layout.json").read_text())
            report.update(found=_differs(saved.get("layout"), layout)[:200], epoch=_epoch(saved.get("epoch")),
                          next_id=int(saved.get("next_id", 0)))
        except FileNotFoundError:
            pass
        except (ValueError, TypeError, AttributeError):  # anything unreadable: not this layout
            report.update(found="an unreadable layout.json", epoch=None)
    except OSError as e:
        report["error"] = f"{mine}: {e.strerror or e}"[-300:]  # (the gather below has a fixed size on every rank)
    if comm.rank == 0:
        report["fresh"] = secrets.token_hex(8)
    reports = gather_json(comm, report, max_bytes=1024)
    lead = comm.rank == 0
    bad = [(r, x["error"]) for r, x in enumerate(reports) if x["error"]]
    if bad:
        if lead:
            where = "; ".join(f"rank {r}: {e}" for r, e in bad)
            say(f"warning: --prefix-cache-dir {settings.prefix_cache_dir} cannot be written ({where}); "
                f"the disk tier is off, serving goes on with the RAM prefix cache")
        return None
    epochs = {x["epoch"] for x in reports}
    resume = (all(x["found"] == "" for x in reports) and len(epochs) == 1 and None not in epochs
              and reports[0]["next_id"] < MAX_ID)
    tier = DiskTier(mine, reports[0]["epoch"] if resume else reports[0]["fresh"], loaded.model.kv)
    if resume:
        if lead:
            tier.restored, tier.next_id = _manifest(mine, tier.epoch, reports[0]["next_id"])
            tier.reserve(tier.next_id)
        return tier
    if lead:
        why = next((f"rank {r}: {x['found']}" for r, x in enumerate(reports) if x["found"]), None)
        if why is None and any(x["found"] is not None for x in reports):
            why = "its ranks' directories are from different runs" if len(epochs) > 1 else "its ids ran out"
        if why:
            say(f"notice: --prefix-cache-dir {settings.prefix_cache_dir} holds prefix blocks this server cannot use "
                f"({why}); ignored, starting the disk tier afresh")
    try:
        for f in (mine / "blocks").iterdir():
            f.unlink()
        (mine / "manifest.json").unlink(missing_ok=True)
        _write_json(mine / "layout.json", {"layout": layout, "epoch": tier.epoch, "next_id": RESERVE})
        tier.reserved = RESERVE
    except OSError as e:
        tier._fail(e)
    return tier


def _epoch(value) -> str | None:
    return value if isinstance(value, str) and 0 < len(value) <= 64 else None


def _differs(saved, layout: dict) -> str:
    """'' when `saved` is this layout, else what differs (for the notice)."""
    if not isinstance(saved, dict):
        return "no layout recorded"
    for k, v in layout.items():
        if saved.get(k) != v:
            return "another model" if k == "model" else f"{k} {saved.get(k)} here, {v} now"
    return ""


def _manifest(root: Path, epoch: str, next_id: int) -> tuple[list, int]:
    """Rank 0's manifest of this epoch: (blocks, the first id this run may use)."""
    try:
        m = json.loads((root / "manifest.json").read_text())
    except (OSError, ValueError):
        return [], next_id
    if not isinstance(m, dict) or m.get("epoch") != epoch or not isinstance(m.get("blocks"), list):
        return [], next_id
    return m["blocks"], next_id
