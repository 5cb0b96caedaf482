"""Run a rank program pinned to its own cores: `python pin_rank.py WORLD program.py args...`.

MLX's ring backend moves bytes on socket threads that busy-poll while a collective
waits; on a machine with few cores an unpinned waiting rank's pollers steal the core a
peer is computing on. Pinning rank r to cores [r*k, (r+1)*k) (k = cores // world; rank
r % cores when there are more ranks than cores) keeps each rank's pollers on its own
cores. Threads inherit the affinity, so it is set before MLX starts any."""

import os
import runpy
import sys


def cores_for(rank: int, world: int, n_cores: int) -> set[int]:
    if world >= n_cores:
        return {rank % n_cores}
    k = n_cores // world
    return set(range(rank * k, (rank + 1) * k))


def main() -> None:
    world = int(sys.argv[1])
    rank = int(os.environ.get("MLX_RANK", "0"))
    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cores[i] for i in cores_for(rank, world, len(cores))})
    sys.argv = sys.argv[2:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
