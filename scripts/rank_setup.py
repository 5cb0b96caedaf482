"""Run a rank program pinned to its own cores and/or at another priority:
`python rank_setup.py WORLD PIN NICE program.py args...` (PIN 0 or 1, NICE an increment).

Pinning: MLX's ring backend moves bytes on socket threads that busy-poll while a
collective waits; on a machine with few cores an unpinned waiting rank's pollers steal
the core a peer is computing on. Rank r goes on cores [r*k, (r+1)*k) (k = cores // world;
core r % cores when there are more ranks than cores). Every thread already started (a
preloaded BLAS may have started some) is moved; later ones inherit it.

Priority: a negative NICE (root only) keeps other work on a shared machine from
preempting a rank mid-step; every collective is a barrier, so one preempted rank stalls
all of them (see docs/benchmarks.md)."""

import os
import runpy
import sys


def cores_for(rank: int, world: int, n_cores: int) -> set[int]:
    if world >= n_cores:
        return {rank % n_cores}
    k = n_cores // world
    return set(range(rank * k, (rank + 1) * k))


def main() -> None:
    world, pin, nice = int(sys.argv[1]), sys.argv[2] == "1", int(sys.argv[3])
    # Linux keeps priority and affinity per thread: set both on every thread there is
    # (a preloaded OpenBLAS has started its workers already); later threads inherit them.
    threads = [int(t) for t in os.listdir("/proc/self/task")]
    if nice:
        for tid in threads:
            os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + nice)
    if pin:
        rank = int(os.environ.get("MLX_RANK", "0"))
        cores = sorted(os.sched_getaffinity(0))
        mine = {cores[i] for i in cores_for(rank, world, len(cores))}
        for tid in threads:
            os.sched_setaffinity(tid, mine)
    sys.argv = sys.argv[4:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
