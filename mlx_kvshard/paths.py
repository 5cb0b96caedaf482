"""Where mlx-kvshard finds and keeps its files: the shipped configs (link and chip
profiles, example hostfiles) and one cache root for everything it writes (the `tiny`
model, benchmark checkpoints, generation checkpoints, launch run directories)."""

from __future__ import annotations

import os
import tempfile
import time
from importlib import resources
from pathlib import Path

# Shipped inside the package (an installed wheel has them too); MLX_KVSHARD_CONFIGS overrides it.
CONFIGS_DIR = Path(os.environ.get("MLX_KVSHARD_CONFIGS") or str(resources.files("mlx_kvshard") / "configs"))


def cache_root() -> Path:
    """$MLX_KVSHARD_CACHE, else $XDG_CACHE_HOME/mlx-kvshard, else ~/.cache/mlx-kvshard."""
    base = os.environ.get("MLX_KVSHARD_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mlx-kvshard")
    return Path(base)


def runs_root() -> Path:
    """Per-launch log directories: $MLX_KVSHARD_RUNS, else <cache root>/runs."""
    return Path(os.environ.get("MLX_KVSHARD_RUNS") or cache_root() / "runs")


def new_run_dir(prefix: str = "") -> Path:
    """A fresh, uniquely named run directory under runs_root() (created)."""
    root = runs_root()
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-", dir=root))
