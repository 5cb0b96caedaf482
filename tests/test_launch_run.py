"""Real rank processes through the launcher: `generate` end to end on 2 simulated ranks,
a failing rank fails the launch by name, and SIGINT/SIGTERM/SIGKILL to the launcher
leave no rank behind."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RANK_SCRIPT = """
import os, sys, time
import mlx.core as mx
g = mx.distributed.init()
x = mx.distributed.all_sum(mx.array([1.0]))
mx.eval(x)
print(f"rank {g.rank()} sum {x.item():g} pid {os.getpid()}", flush=True)
print(f"stderr of {g.rank()}", file=sys.stderr, flush=True)
if sys.argv[1] == "fail" and g.rank() == 1:
    print("rank 1 gives up", file=sys.stderr, flush=True)
    raise SystemExit(3)
if sys.argv[1] in ("fail", "hang") or (sys.argv[1] == "straggle" and g.rank() == 1):
    time.sleep(120)  # the launcher must stop us
"""


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(REPO), e.get("PYTHONPATH", "")])
    return e


def run_local_cmd(tmp_path: Path, world: int, mode: str, quiet: bool = True, finish_timeout: float = 30) -> list[str]:
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    code = (f"import sys; from mlx_kvshard.launch.simulate import run_local; "
            f"sys.exit(run_local({world}, [], command=[sys.executable, {str(script)!r}, {mode!r}], "
            f"quiet_ranks={quiet}, run_dir={str(tmp_path / 'run')!r}, finish_timeout={finish_timeout}))")
    return [sys.executable, "-c", code]


def launcher(argv: list[str]) -> subprocess.Popen:
    # Default SIGINT in the child even when pytest itself runs with SIGINT ignored (a background job).
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env(), cwd=REPO,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def test_generate_end_to_end_on_two_simulated_ranks(tmp_path):
    gen = ["generate", "--prompt", "hello", "--max-tokens", "6", "--json"]
    launched = subprocess.run([sys.executable, "-m", "mlx_kvshard", "launch", "--simulate", "2", "--quiet-ranks",
                               "--run-dir", str(tmp_path / "run"), "--", *gen],
                              capture_output=True, text=True, env=env(), cwd=REPO, timeout=180)
    assert launched.returncode == 0, launched.stderr
    out = json.loads(launched.stdout)  # rank 0's stdout, unprefixed
    assert out["world"] == 2 and len(out["tokens"]) == 6
    assert len({r["tokens_digest"] for r in out["ranks"]}) == 1  # both ranks hold the same tokens
    assert "doctor: " in launched.stderr and "checks passed" in launched.stderr
    logs = sorted(p.name for p in (tmp_path / "run").glob("rank*.log"))
    assert logs == ["rank0-127.0.0.1.log", "rank1-127.0.0.1.log"]
    assert json.loads((tmp_path / "run" / "result.json").read_text())["exit_code"] == 0
    # `generate --simulate 2` takes the same path (run_local) and must produce the same tokens.
    direct = subprocess.run([sys.executable, "-m", "mlx_kvshard", *gen, "--simulate", "2"],
                            capture_output=True, text=True, env=env(), cwd=REPO, timeout=180)
    assert direct.returncode == 0, direct.stderr
    assert json.loads(direct.stdout)["tokens"] == out["tokens"]


def test_run_local_streams_rank0_raw_and_prefixes_stderr(tmp_path):
    done = subprocess.run(run_local_cmd(tmp_path, 3, "ok"), capture_output=True, text=True, env=env(), cwd=REPO,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert re.fullmatch(r"rank 0 sum 3 pid \d+\n", done.stdout)  # only rank 0, as is
    for r in range(3):
        assert f"[rank {r} 127.0.0.1] stderr of {r}\n" in done.stderr
    log = (tmp_path / "run" / "rank2-127.0.0.1.log").read_text()  # rank 2's stdout went to its log only
    assert re.search(r"^rank 2 sum 3 pid \d+$", log, re.M) and "stderr of 2" in log


def test_a_failing_rank_fails_the_launch_by_name_and_stops_the_others(tmp_path):
    t0 = time.monotonic()
    done = subprocess.run(run_local_cmd(tmp_path, 2, "fail"), capture_output=True, text=True, env=env(), cwd=REPO,
                          timeout=120)
    wall = time.monotonic() - t0
    assert done.returncode == 3, done.stderr  # the rank's own exit code, where mlx.launch says 0
    m = re.search(r"rank 1 \(127\.0\.0\.1\) failed: exited with code 3 after [\d.]+s; "
                  r"stopped rank 0 \(127\.0\.0\.1\) in ([\d.]+)s", done.stderr)
    assert m, done.stderr
    assert "    | rank 1 gives up" in done.stderr  # its last words, in the failure report
    assert wall < 100  # rank 0 would otherwise sleep 120 s
    pid0 = int(re.search(r"pid (\d+)", done.stdout)[1])
    assert not alive(pid0)
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    # rank 0 ended by SIGTERM (-15), not by the SIGKILL after the grace: SIGTERM was enough
    assert [(r["returncode"], r["stopped"]) for r in result["ranks"]] == [(-15, True), (3, False)]


def test_a_rank_left_running_after_the_others_finished_is_stopped(tmp_path):
    done = subprocess.run(run_local_cmd(tmp_path, 2, "straggle", finish_timeout=1.0), capture_output=True, text=True,
                          env=env(), cwd=REPO, timeout=120)
    assert done.returncode == 1
    assert "rank 1 (127.0.0.1) still running 1s after another rank finished; stopped" in done.stderr


SIGNALS = [signal.SIGINT, signal.SIGTERM]
if sys.platform.startswith("linux"):
    SIGNALS.append(signal.SIGKILL)  # no cleanup code runs: the kernel's parent-death signal does it


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
def test_signalling_the_launcher_leaves_no_rank_behind(tmp_path, sig):
    proc = launcher(run_local_cmd(tmp_path, 2, "hang", quiet=False))
    pids = []
    try:
        deadline = time.monotonic() + 90
        while len(pids) < 2 and time.monotonic() < deadline:
            line = proc.stdout.readline().decode()
            if not line:
                break
            if m := re.search(r"pid (\d+)", line):
                pids.append(int(m[1]))
        assert len(pids) == 2, f"ranks did not start: {proc.stderr.read().decode() if proc.poll() is not None else ''}"
        proc.send_signal(sig)
        code = proc.wait(timeout=30)
        deadline = time.monotonic() + 10
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [p for p in pids if alive(p)]
        if sig != signal.SIGKILL:
            assert code == 128 + sig  # 130 for Ctrl-C, 143 for SIGTERM: a stop on request, not a failure
            assert f"stopped on request ({sig.name}): stopped all 2 rank(s)" in proc.stderr.read().decode()
    finally:
        proc.kill()
        proc.wait(timeout=10)
        for p in pids:
            if alive(p):
                os.kill(p, signal.SIGKILL)


def shim_hostfile(tmp_path: Path, monkeypatch, hosts=("mini-a", "mini-b")) -> tuple[Path, Path, Path]:
    """'Remote' hosts reached through the ssh shim of the doctor tests."""
    from test_launch_doctor import SHIM

    shim, log = tmp_path / "ssh", tmp_path / "ssh.log"
    shim.write_text(SHIM)
    shim.chmod(0o755)
    monkeypatch.setenv("SHIM_LOG", str(log))
    hosts = [{"ssh": n, "ips": ["127.0.0.1"], "python": sys.executable, "cwd": str(REPO)} for n in hosts]
    hf = tmp_path / "hosts.json"
    hf.write_text(json.dumps({"backend": "ring", "envs": [f"PYTHONPATH={REPO}"], "hosts": hosts}))
    return hf, shim, log


def test_generate_on_remote_hosts_through_the_ssh_shim(tmp_path, monkeypatch):
    hf, shim, log = shim_hostfile(tmp_path, monkeypatch)
    done = subprocess.run([sys.executable, "-m", "mlx_kvshard", "launch", "--hostfile", str(hf), "--ssh-command",
                           str(shim), "--run-dir", str(tmp_path / "run"), "--", "generate", "--prompt", "hello",
                           "--max-tokens", "4", "--json"],
                          capture_output=True, text=True, env={**env(), "SHIM_LOG": str(log)}, cwd=REPO, timeout=180)
    assert done.returncode == 0, done.stderr
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("[rank 0 mini-a] {"))
    assert json.loads(line[len("[rank 0 mini-a] "):])["world"] == 2
    # Doctor probes and both ranks went through the shim.
    assert sorted(log.read_text().split()) == ["mini-a", "mini-a", "mini-b", "mini-b"]


def test_a_failing_remote_rank_stops_the_other_through_its_pidfile(tmp_path, monkeypatch):
    from mlx_kvshard.launch import runner
    from mlx_kvshard.launch.hostfile import load_hostfile
    from mlx_kvshard.launch.spec import build_spec
    from mlx_kvshard.launch.topology import wire

    hf, shim, log = shim_hostfile(tmp_path, monkeypatch)
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    spec = build_spec(wire(load_hostfile(hf)), "ring", [], ssh_command=[str(shim)],
                      command=[sys.executable, str(script), "fail"])
    code = runner.run(spec, tmp_path / "run", announce=False)
    assert code == 3
    # mini-b (rank 1) failed; mini-a was still running, so the launcher also asked mini-a to kill it by pid.
    assert sorted(log.read_text().split()) == ["mini-a", "mini-a", "mini-b"]
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert [(r["host"], r["stopped"]) for r in result["ranks"]] == [("mini-a", True), ("mini-b", False)]
