"""N ranks on 127.0.0.1: the localhost hostfile, run through the launcher's one path.

`generate --simulate N` calls `run_local`; `launch --simulate N` builds the same
hostfile. Every test and CI run exercises the code a cluster of Macs runs.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Sequence

from ..errors import UserError
from ..paths import new_run_dir

from . import runner
from .hostfile import ClusterFile, HostSpec
from .spec import build_spec
from .topology import wire

OPENBLAS = "/usr/lib/x86_64-linux-gnu/libopenblas.so.0"


def localhost_cluster(world: int) -> ClusterFile:
    if world < 1:
        raise UserError(f"--simulate {world}: need at least 1 rank")
    hosts = [HostSpec(i, "127.0.0.1", ["127.0.0.1"], [], "127.0.0.1") for i in range(world)]
    return ClusterFile(hosts, "ring", [], [], f"<simulate {world}>")


def simulation_env(world: int, env: dict[str, str] | None = None) -> list[str]:
    """KEY=VALUE for every simulated rank: the caller's `env`, then our CPU defaults
    unless the caller (or our own environment) already chose them."""
    env = dict(env or {})
    chosen = {**os.environ, **env}
    if sys.platform.startswith("linux") and os.path.exists(OPENBLAS) and "LD_PRELOAD" not in chosen:
        env["LD_PRELOAD"] = OPENBLAS  # MLX's bundled BLAS is ~12x slower at fp32 matmul
    threads = str(max(1, (os.cpu_count() or 1) // world))  # ranks share the cores: don't oversubscribe
    for key in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        if key not in chosen:
            env[key] = threads
    return [f"{k}={v}" for k, v in env.items()]


def run_local(world: int, rank_args: list[str], env: dict[str, str] | None = None, *, quiet_ranks: bool = True,
              run_dir: str | Path | None = None, command: Sequence[str] | None = None,
              module: str = "mlx_kvshard", finish_timeout: float | None = 30.0, on_interrupt=None) -> int:
    """Start `world` ranks of `sys.executable -m mlx_kvshard <rank_args>` over the ring
    on 127.0.0.1 (or `command` verbatim). Rank 0's stdout comes through unprefixed;
    returns non-zero, naming the failing rank, if any rank fails. Logs are kept in
    `run_dir`, or in a temporary one that is removed when every rank succeeded.
    `on_interrupt`: see runner.run."""
    cluster = localhost_cluster(world)
    spec = build_spec(wire(cluster), "ring", rank_args, envs=simulation_env(world, env), command=command,
                      module=module)
    keep = run_dir is not None
    run_dir = Path(run_dir) if keep else new_run_dir("sim-")
    code = runner.run(spec, run_dir, quiet_ranks=quiet_ranks, announce=False, finish_timeout=finish_timeout,
                      on_interrupt=on_interrupt)
    if code == 0 and not keep:
        shutil.rmtree(run_dir, ignore_errors=True)
    return code
