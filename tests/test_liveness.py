"""Liveness with real rank processes. SIGKILL (a crash) or SIGSTOP (a stall) one of 3
simulated ranks mid-generation: the others stop within the deadline, the launcher names
the rank and exits 75, and no process survives. Then resume from the checkpoint written
before the signal: the tokens equal an uninterrupted run's, greedy and sampled, on 3
ranks and on 2."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from liveness_procs import (alive, checkpoint_tokens, env_for, rank_pids, reap, start, tagged,
                            wait_for)
from mlx_kvshard.liveness.client import EXIT_PEER_LOST

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds rank processes in /proc")

PEER_TIMEOUT = 5.0
SAMPLING = {"greedy": [], "sampled": ["--temp", "0.8", "--top-k", "50", "--seed", "1"]}
SIGNAL = {"greedy": signal.SIGKILL, "sampled": signal.SIGSTOP}  # one run each: a crash and a stall
MORE = 10  # tokens a resumed run generates past its checkpoint
REFERENCE_TOKENS = 28
TIMINGS: dict[str, dict] = {}


def generate_cmd(*args: str) -> list[str]:
    return ["-m", "mlx_kvshard", "generate", "--peer-timeout", str(PEER_TIMEOUT), *args]


def interrupted_run(tmp: Path, mode: str) -> dict:
    """Generate on 3 ranks, signal rank 2 once a checkpoint holds 8 tokens, watch the end."""
    tag = f"lv-{os.getpid()}-{mode}"
    ck, err = tmp / "gen.json", tmp / "stderr"
    argv = generate_cmd("--simulate", "3", "--max-tokens", "400", "--checkpoint-every", "4",
                        "--checkpoint", str(ck), *SAMPLING[mode])
    proc = start(argv, tag, tmp / "stdout", err)
    try:
        pids = rank_pids(tag, 3)
        wait_for(lambda: checkpoint_tokens(ck) >= 8, proc, 300, "a checkpoint of 8 tokens")
        t0 = time.monotonic()
        os.kill(pids[2], SIGNAL[mode])
        detect_s = None
        while proc.poll() is None and time.monotonic() - t0 < PEER_TIMEOUT + 60:
            if detect_s is None and b"mlx-kvshard: rank 2 (host" in err.read_bytes():
                detect_s = time.monotonic() - t0
            time.sleep(0.02)
        exit_s = time.monotonic() - t0
        rc = proc.wait(timeout=5)
        survivors = [p for p in pids.values() if alive(p)]
        shutil.copy(ck, tmp / "saved.json")  # a resumed run writes on into its file: keep this one
        TIMINGS[mode] = {"signal": SIGNAL[mode].name, "detect_s": detect_s, "launcher_exit_s": exit_s}
        return {"rc": rc, "stderr": err.read_text(errors="replace"), "detect_s": detect_s, "exit_s": exit_s,
                "survivors": survivors, "checkpoint": tmp / "saved.json",
                "saved_tokens": checkpoint_tokens(tmp / "saved.json")}
    finally:
        reap(tag, proc)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return {mode: interrupted_run(tmp_path_factory.mktemp(mode), mode) for mode in SAMPLING}


def generate_json(args: list[str], tag: str, timeout: float = 300) -> dict:
    try:
        proc = subprocess.run([sys.executable, *generate_cmd("--json", *args)], capture_output=True, text=True,
                              timeout=timeout, env=env_for(tag), cwd=Path(__file__).resolve().parent.parent,
                              start_new_session=True)
    finally:
        reap(tag, None)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


_references: dict = {}


def uninterrupted(mode: str, max_tokens: int) -> list[int]:
    """The first `max_tokens` of one uninterrupted 3-rank run: max_tokens only sets the
    budget, so a shorter run's tokens are this run's prefix."""
    assert max_tokens <= REFERENCE_TOKENS, "the checkpoint came late: raise REFERENCE_TOKENS"
    if mode not in _references:
        got = generate_json(["--simulate", "3", "--max-tokens", str(REFERENCE_TOKENS), "--checkpoint-every", "0",
                             *SAMPLING[mode]], f"lv-{os.getpid()}-ref-{mode}")
        _references[mode] = got["tokens"]
    return _references[mode][:max_tokens]


@pytest.mark.parametrize("mode", ["greedy", "sampled"])
def test_lost_rank_stops_every_rank(runs, mode):
    r = runs[mode]
    what = "died" if mode == "greedy" else "stopped responding"
    m = re.search(rf"mlx-kvshard: rank 2 \(host 127\.0\.0\.1\) {what} at token (\d+) \(.*\); stopping all "
                  rf"ranks\. Resume with --resume (\S+) \((\d+) tokens saved\)\.", r["stderr"])
    assert m, r["stderr"][-3000:]
    assert int(m.group(1)) >= 8 and int(m.group(3)) >= 8
    assert r["rc"] == EXIT_PEER_LOST, r["stderr"][-3000:]
    assert not r["survivors"], f"rank processes still alive: {r['survivors']}"
    # bounds, not tight timings: detection by a closed connection is immediate, a stall takes
    # the peer timeout; the launcher then tears down (SIGTERM, 3 s grace, SIGKILL)
    # (generous: a loaded 2-core machine; the message names which detector fired)
    bound = 20 if mode == "greedy" else PEER_TIMEOUT + 20
    assert r["detect_s"] is not None and r["detect_s"] < bound, TIMINGS
    assert r["exit_s"] < bound + 10, TIMINGS
    print(f"\n[liveness] {TIMINGS[mode]}")


# greedy 3 -> 2 is the relaunch in test_restart_resumes_without_the_lost_rank
@pytest.mark.parametrize("mode, world", [("greedy", 3), ("sampled", 3), ("sampled", 2)])
def test_resume_equals_uninterrupted(runs, mode, world, tmp_path):
    r = runs[mode]
    n = r["saved_tokens"]
    total = n + MORE
    ck = tmp_path / "ck.json"
    shutil.copy(r["checkpoint"], ck)
    got = generate_json(["--simulate", str(world), "--resume", str(ck), "--max-tokens", str(total)],
                        f"lv-{os.getpid()}-resume-{mode}-{world}")
    want = uninterrupted(mode, total)
    assert got["resumed_tokens"] == n and got["world"] == world
    assert got["tokens"] == want, f"{mode}, resumed on {world} ranks after {n} tokens"
    print(f"\n[resume] {mode} 3->{world} ranks: resumed at token {n}, {len(got['tokens'])} tokens identical")


def test_without_coordinator_own_step_deadline(tmp_path):
    """No coordinator (as under plain mlx.launch): a stalled peer ends the others by their
    own step deadline, with the one line and exit 75. The ranks run under our runner with
    no coordinator, so the exit codes are our launcher's report (result.json), not
    another tool's log lines (mlx.launch's WARN lines can be cut short on a busy machine)."""
    tag = f"lv-{os.getpid()}-plain"
    ck, run_dir = tmp_path / "gen.json", tmp_path / "run"
    rank_args = generate_cmd("--max-tokens", "400", "--step-timeout", "3", "--checkpoint-every", "4",
                             "--checkpoint", str(ck))[2:]
    launcher = ("import sys; from mlx_kvshard.launch.simulate import run_local; "
                f"sys.exit(run_local(3, {rank_args!r}, run_dir={str(run_dir)!r}, quiet_ranks=False))")
    proc = start(["-c", launcher], tag, tmp_path / "stdout", tmp_path / "stderr")
    try:
        pids = rank_pids(tag, 3)
        assert not any("MLX_KVSHARD_COORDINATOR=" in Path(f"/proc/{p}/environ").read_text(errors="replace")
                       for p in pids.values())
        wait_for(lambda: checkpoint_tokens(ck) >= 4, proc, 300, "a checkpoint of 4 tokens")
        t0 = time.monotonic()
        os.kill(pids[2], signal.SIGSTOP)
        rc = proc.wait(timeout=3 + 120)
        print(f"\n[liveness] no coordinator, SIGSTOP: the launcher exited after {time.monotonic() - t0:.2f} s")
    finally:
        reap(tag, proc)
    out = (tmp_path / "stdout").read_text(errors="replace") + (tmp_path / "stderr").read_text(errors="replace")
    assert rc == EXIT_PEER_LOST, out[-3000:]  # the first rank to fail, by its own exit code
    result = json.loads((run_dir / "result.json").read_text())
    first = [r for r in result["ranks"] if r["returncode"] == EXIT_PEER_LOST and not r["stopped"]]
    assert first and first[0]["rank"] in (0, 1), result  # rank 2 was the stalled one
    r = first[0]["rank"]
    assert re.search(rf"mlx-kvshard: rank {r} \(host [^)]*\): no progress for 3 s at token \d+ "
                     rf"\(a peer died or stalled\); stopping\.", out), out[-3000:]
    assert not tagged(tag)


def test_restart_resumes_without_the_lost_rank(tmp_path):
    """`launch --restart 1 --exclude failed`: SIGKILL rank 2; the launcher relaunches on 2
    ranks from the checkpoint and the final tokens are the uninterrupted run's."""
    tag = f"lv-{os.getpid()}-restart"
    ck, err = tmp_path / "gen.json", tmp_path / "stderr"
    argv = ["-m", "mlx_kvshard", "launch", "--simulate", "3", "--skip-check", "--quiet-ranks", "--run-dir",
            str(tmp_path / "run"), "--restart", "1", "--exclude", "failed", "--",
            *generate_cmd("--json", "--max-tokens", str(REFERENCE_TOKENS), "--checkpoint-every", "4",
                          "--checkpoint", str(ck))[2:]]
    proc = start(argv, tag, tmp_path / "stdout", err)
    try:
        pids = rank_pids(tag, 3)
        wait_for(lambda: checkpoint_tokens(ck) >= 8, proc, 300, "a checkpoint of 8 tokens")
        os.kill(pids[2], signal.SIGKILL)
        rc = proc.wait(timeout=300)
    finally:
        reap(tag, proc)
    text = err.read_text(errors="replace")
    assert rc == 0, text[-3000:]
    assert "mlx-kvshard: rank 2 (host 127.0.0.1) died at token" in text, text[-3000:]
    assert f"restart 1/1 on 2 rank(s) (127.0.0.1, 127.0.0.1): resuming from {ck}" in text, text[-3000:]
    got = json.loads((tmp_path / "stdout").read_text().strip().splitlines()[-1])
    assert got["world"] == 2 and got["resumed_tokens"] >= 8
    assert got["tokens"] == uninterrupted("greedy", REFERENCE_TOKENS)
    assert not tagged(tag)
