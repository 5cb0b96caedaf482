"""Start real rank processes for tests: `mlx.launch` ring on 127.0.0.1, free ports."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
from pathlib import Path

from mlx_kvshard.launch.simulate import OPENBLAS  # noqa: F401  (scripts/benchlib.py imports it from here)


def free_port_base(n: int) -> int:
    """A base port with n consecutive free ports (the ring listens on base..base+n-1)."""
    for _ in range(200):
        base = random.randint(20000, 60000 - n)
        try:
            socks = []
            for p in range(base, base + n):
                s = socket.socket()
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("127.0.0.1", p))
                socks.append(s)
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port range found")


def rank_env(world: int) -> dict[str, str]:
    """The environment `generate --simulate` gives its ranks (OpenBLAS, BLAS threads), plus
    this checkout on the path."""
    from mlx_kvshard.launch.simulate import simulation_env

    env = dict(os.environ)
    env.update(kv.split("=", 1) for kv in simulation_env(world))
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parent.parent),
                                         env.get("PYTHONPATH", "")])
    return env


def mlx_launch(world: int, argv: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `python argv...` on `world` ranks; raise with the output if it fails or hangs."""
    # mlx.launch's entry point, run with this interpreter (its module has no __main__ guard)
    launcher = "from mlx._distributed_utils.launch import main; main()"
    cmd = [sys.executable, "-c", launcher, "-n", str(world), "--backend", "ring",
           "--starting-port", str(free_port_base(world)), "--", sys.executable, *argv]
    if world == 1:
        cmd = [sys.executable, *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=rank_env(world))
    if proc.returncode != 0 or "Traceback" in proc.stderr:
        raise AssertionError(f"ranks failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc
