"""Loopback cost of the collectives alone: `python allsum_rank.py HIDDEN N_PER_TOKEN REPS`
under MLX's launcher. Each "token" is a chain of N_PER_TOKEN dependent all_sums of a
(1, 1, HIDDEN) float32 activation, evaluated once, as a decode step issues them (with no
compute between). Rank 0 prints {"per_token_s", "per_all_sum_s"} as one JSON line."""

import json
import sys
import time

import mlx.core as mx


def main() -> None:
    hidden, n, reps = map(int, sys.argv[1:4])
    group = mx.distributed.init(strict=True, backend="ring")
    x = mx.ones((1, 1, hidden))

    def token():
        y = x
        for _ in range(n):
            y = mx.distributed.all_sum(y, group=group) * (1.0 / group.size())
        mx.eval(y)

    for _ in range(3):
        token()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        token()
        times.append(time.perf_counter() - t)
    times.sort()
    med = times[len(times) // 2]
    if group.rank() == 0:
        print(json.dumps({"per_token_s": med, "per_all_sum_s": med / n, "min_token_s": times[0]}))


if __name__ == "__main__":
    main()
