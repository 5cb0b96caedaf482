"""The cluster launcher: hostfile → wired ring → preflight doctor → ranks started
through MLX's launch scripts, supervised so that a failing rank fails the launch.

hostfile.py  read and validate MLX hostfiles plus our per-host fields (also `plan`'s reader)
topology.py  order ranks along the cables; explain a topology that is not a ring
fit.py       the rank command's memory request; the rule itself is planner/capacity.py
spec.py      the exact per-rank commands (MLX's launch script) and MLX hostfile
probe.py     stdlib-only script the doctor runs on every host over ssh
doctor.py    run the probes; judge.py turns results into PASS/WARN/FAIL with fixes (checks.py)
runner.py    start, stream, log, fail fast, tear down
simulate.py  N ranks on 127.0.0.1 through the same path
restart.py   relaunch from the last checkpoint without the lost hosts
secrets.py   tokens to a rank on its stdin, never on a command line
The command line is mlx_kvshard/cli/launch.py.
"""
