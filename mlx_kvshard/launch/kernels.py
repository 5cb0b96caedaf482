"""Keep MLX's compiled CPU kernels across runs.

MLX's CPU backend compiles every fused (`mx.compile`d) kernel with the system C++
compiler, about a second of CPU each, and keeps the library under
$TMPDIR/mlx/<version>/cpu, reusing it when the file exists. Local ranks get a per-run
$TMPDIR (MLX's launch files must not collide between runs), so each run compiled the same
kernels again: several seconds of start-up per simulated run, most of a short test.

Before a run the run's directory is seeded from one shared kernel directory with hard
links (a copy where links fail); after it, libraries the run compiled are copied into the
shared directory under a temporary name and renamed into place. Rename is atomic, so no
process ever opens a half-written library, and a process only ever compiles into its own
run's directory, as before. Only whole ELF files are shared (see `_whole`); on macOS the
Metal backend does not compile this way and the directory simply stays empty.
"""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path

from ..paths import cache_root

_SUBDIR = "mlx"  # what MLX creates under $TMPDIR


def shared_dir() -> Path:
    """$MLX_KVSHARD_KERNELS, else <cache root>/kernels."""
    return Path(os.environ.get("MLX_KVSHARD_KERNELS") or cache_root() / "kernels")


def _libraries(root: Path):
    base = root / _SUBDIR
    if base.is_dir():
        for path in base.rglob("*.so"):
            if path.is_file() and not path.name.startswith("."):
                yield path.relative_to(root)


def _whole(path: Path) -> bool:
    """An ELF64 file whose section header table (written last) is inside the file: a rank
    killed while the compiler wrote its library leaves a truncated one, never to be shared."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            size = os.fstat(f.fileno()).st_size
    except OSError:
        return False
    if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2:
        return False
    order = "<" if head[5] == 1 else ">"
    (shoff,) = struct.unpack_from(order + "Q", head, 0x28)
    shentsize, shnum = struct.unpack_from(order + "HH", head, 0x3A)
    return 0 < shoff and shoff + shentsize * shnum <= size


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _publish(src: Path, dst: Path) -> None:
    part = dst.with_name(f".{dst.name}.{os.getpid()}.part")
    shutil.copy2(src, part)
    os.replace(part, dst)  # atomic: another run sees the whole library or none


def _copy_missing(src_root: Path, dst_root: Path, place, accept=lambda path: True) -> int:
    """Place every library under src_root that dst_root lacks; return how many. A cache is a
    speed-up only: any OSError ends the copying, never the run (MLX then compiles as always)."""
    n = 0
    try:
        for rel in _libraries(src_root):
            dst = dst_root / rel
            if dst.exists() or not accept(src_root / rel):
                continue
            dst.parent.mkdir(parents=True, exist_ok=True)
            place(src_root / rel, dst)
            n += 1
    except OSError:
        pass
    return n


def seed(tmp: Path) -> int:
    """Link every shared kernel into the run's $TMPDIR; return how many. Never fails a run."""
    return _copy_missing(shared_dir(), tmp, _link)


def keep(tmp: Path) -> int:
    """Publish the whole kernels a run compiled into the shared directory; return how many."""
    return _copy_missing(tmp, shared_dir(), _publish, accept=_whole)
