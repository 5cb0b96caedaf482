"""The serving engine's ranks under liveness, with real processes: an idle engine parks its
ranks off the ring (little CPU), and a rank killed while the engine is busy or idle ends
every rank within the liveness bounds, the lost rank named, nothing left running."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from checkpoints import checkpoint
from liveness_procs import alive, rank_pids, reap, start, wait_for
from mlx_kvshard.liveness.client import EXIT_PEER_LOST

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads rank processes in /proc")

PEER_TIMEOUT = 5.0
IDLE_CPU_BOUND = 0.25  # cores per rank while parked: generous (a spinning ring thread is a whole core)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def run_and_kill(tmp: Path, model: Path, lines: list[dict], victim: int, mode: str, measure_idle: bool = False):
    f = tmp / "prompts.jsonl"
    f.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out, err = tmp / "stdout", tmp / "stderr"
    tag = f"engine-live-{os.getpid()}-{mode}"
    argv = ["-m", "mlx_kvshard", "generate", "--model", str(model), "--prompts-file", str(f), "--no-chat-template",
            "--simulate", "3", "--peer-timeout", str(PEER_TIMEOUT)]
    proc = start(argv, tag, out, err)
    try:
        pids = rank_pids(tag, 3)
        wait_for(lambda: out.read_bytes().count(b"\n") >= 1, proc, 300, "the first request's result")
        idle_cpu = None
        if measure_idle:
            time.sleep(1.0)  # the engine has parked by now (it broadcasts IDLE right after the step)
            before = {r: cpu_seconds(p) for r, p in pids.items()}
            t0 = time.monotonic()
            time.sleep(3.0)
            idle_cpu = {r: (cpu_seconds(p) - before[r]) / (time.monotonic() - t0) for r, p in pids.items()}
        t0 = time.monotonic()
        os.kill(pids[victim], signal.SIGKILL)
        rc = proc.wait(timeout=PEER_TIMEOUT + 60)
        exit_s = time.monotonic() - t0
        time.sleep(0.5)
        survivors = [p for p in pids.values() if alive(p)]
        return rc, err.read_text(errors="replace"), exit_s, survivors, idle_cpu
    finally:
        reap(tag, proc)


@pytest.fixture(scope="module")
def model(ckpt_root):
    return checkpoint(ckpt_root, "llama_kv8")


def test_rank_killed_while_busy(model, tmp_path):
    lines = [{"prompt": "short one", "max_tokens": 2}, {"prompt": "a long one", "max_tokens": 3000}]
    rc, err, exit_s, survivors, _ = run_and_kill(tmp_path, model, lines, victim=1, mode="busy")
    assert rc == EXIT_PEER_LOST, err[-3000:]
    assert "mlx-kvshard: rank 1 (host" in err, err[-3000:]
    assert exit_s < PEER_TIMEOUT + 30
    assert survivors == []


def test_idle_ranks_park_and_a_rank_killed_while_idle_is_named(model, tmp_path):
    lines = [{"prompt": "short one", "max_tokens": 2}, {"prompt": "much later", "max_tokens": 2, "arrival_s": 600}]
    rc, err, exit_s, survivors, idle_cpu = run_and_kill(tmp_path, model, lines, victim=2, mode="idle",
                                                        measure_idle=True)
    print(f"idle CPU per rank (cores): {idle_cpu}")
    assert all(c < IDLE_CPU_BOUND for c in idle_cpu.values()), idle_cpu
    assert rc == EXIT_PEER_LOST, err[-3000:]
    assert "mlx-kvshard: rank 2 (host" in err and "while idle" in err, err[-3000:]
    assert exit_s < PEER_TIMEOUT + 30
    assert survivors == []
