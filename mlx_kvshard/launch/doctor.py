"""Preflight doctor: run probe.py on every host (through the same ssh and Python the
ranks will use), then judge each finding PASS / WARN / FAIL with a one-line fix."""

from __future__ import annotations

import json
import shlex
import subprocess
import threading
import time
from pathlib import Path

from . import probe
from .fit import ModelRequest
from .checks import Check, Probe, Report
from .judge import judge
from .spec import LaunchSpec, RankLaunch

PROBE_TIMEOUT = 30.0  # seconds for one host's probe, ssh connect included
REACH_TIMEOUT = 2.0


def run_doctor(spec: LaunchSpec, request: ModelRequest, context: int | None = None) -> Report:
    probes = plan_probes(spec, request.model)
    threads = [threading.Thread(target=run_probe, args=(spec, p), daemon=True) for p in probes]
    for t in threads:
        t.start()
    for t in threads:
        t.join(PROBE_TIMEOUT + 5)
    return judge(spec, probes, request, context)


def plan_probes(spec: LaunchSpec, model: str | None) -> list[Probe]:
    groups: dict[tuple, Probe] = {}
    for r in spec.ranks:
        key = (r.host.ssh, r.python, r.cwd)
        groups.setdefault(key, Probe([])).ranks.append(r)
    probe_of = {r.rank: p for p in groups.values() for r in p.ranks}
    for p in groups.values():
        p.job = {"model": model, "bind": [], "reach": [], "timeout": REACH_TIMEOUT,
                 "rdma": spec.backend != "ring"}
    for target, addrs in spec.listen_targets().items():
        probe_of[target].job["bind"] += addrs
        # The ring's left neighbour connects to a rank; under jaccl everyone dials rank 0.
        if spec.backend == "ring":
            sources = [probe_of[(target - 1) % spec.world]]
        else:
            sources = [probe_of[i] for i in range(1, spec.world)]
        for p in {id(p): p for p in sources}.values():
            p.job["reach"] += addrs
    return list(groups.values())


def probe_argv(spec: LaunchSpec, r: RankLaunch) -> list[str]:
    """Run the host's Python on a script fed through stdin, in the rank's cwd and env."""
    cd = (f"cd {shlex.quote(r.cwd)} || exit 97; " if r.cwd else
          f"cd {shlex.quote(str(Path.cwd()))} 2>/dev/null; ")  # mlx.launch's fallback, as the rank gets
    exports = "".join(f"export {k}={shlex.quote(v)}; " for k, v in (e.split("=", 1) for e in r.env))
    script = f"{cd}{exports}exec {shlex.quote(r.python)} -"
    if r.host.is_local:
        return ["/bin/bash", "-c", script]
    return [*spec.ssh_command, r.host.ssh, script]


def run_probe(spec: LaunchSpec, p: Probe) -> None:
    source = Path(probe.__file__).read_text() + f"\nraise SystemExit(main(json.loads({json.dumps(p.job)!r})))\n"
    argv = probe_argv(spec, p.first)
    t0 = time.monotonic()
    try:
        done = subprocess.run(argv, input=source, capture_output=True, text=True, timeout=PROBE_TIMEOUT)
    except subprocess.TimeoutExpired:
        p.failure = _unreachable(p, f"no answer within {PROBE_TIMEOUT:g}s")
        return
    except OSError as e:
        p.failure = Check(p.label, "ssh", "FAIL", f"cannot run {argv[0]}: {e}", "install OpenSSH or pass --ssh-command")
        return
    p.seconds = time.monotonic() - t0
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith(probe.MARKER)), None)
    if line is not None:
        p.result = json.loads(line[len(probe.MARKER):])
        return
    why = (done.stderr.strip().splitlines() or ["no output"])[-1]
    r = p.first
    if done.returncode == 255 and not r.host.is_local:
        p.failure = _unreachable(p, why)
    elif done.returncode == 97:
        p.failure = Check(p.label, "cwd", "FAIL", f"cwd {r.cwd} does not exist on {r.host.ssh}",
                          f"create it, or fix \"cwd\" for {r.host.label} in the hostfile")
    elif done.returncode in (126, 127):
        p.failure = Check(p.label, "python", "FAIL", f"{r.python} not found on {r.host.ssh} ({why})",
                          f"set \"python\" for {r.host.label} in the hostfile to the venv's python, "
                          f"e.g. ~/mlx-venv/bin/python (ssh runs a non-login shell: PATH is short)")
    else:
        p.failure = Check(p.label, "python", "FAIL", f"probe failed with exit code {done.returncode}: {why}",
                          f"run `{shlex.join(argv[:-1])} '{r.python} -V'` by hand to see why")


def _unreachable(p: Probe, why: str) -> Check:
    h = p.first.host
    return Check(p.label, "ssh", "FAIL", f"cannot ssh to {h.ssh} in BatchMode: {why}",
                 f"`ssh-copy-id {h.ssh}` from this machine, and turn on Remote Login on {h.label} "
                 f"(System Settings > General > Sharing); `ssh -o BatchMode=yes {h.ssh} true` must work")
