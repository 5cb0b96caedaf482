"""The cluster launcher: hostfile → wired ring → preflight doctor → ranks started
through MLX's launch scripts, supervised so that a failing rank fails the launch.

hostfile.py  read and validate MLX hostfiles plus our per-host fields
topology.py  order ranks along the cables; explain a topology that is not a ring
fit.py       memory each rank needs (ShardPlan weights + KV) against each host
spec.py      the exact per-rank commands (MLX's launch script) and MLX hostfile
probe.py     stdlib-only script the doctor runs on every host over ssh
doctor.py    run the probes, judge PASS/WARN/FAIL, suggest fixes
runner.py    start, stream, log, fail fast, tear down
simulate.py  N ranks on 127.0.0.1 through the same path
cli.py       `mlx-kvshard launch`
"""
