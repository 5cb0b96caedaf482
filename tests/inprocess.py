"""A serving engine in this process at world 1, for tests and in-process benchmarks."""

from __future__ import annotations

import threading

from mlx_kvshard.serving.worker import serve_rank


def with_engine(rank_settings, engine_settings, body):
    """Run `body(engine)` on a thread while the engine runs on this one (serve_rank's front
    contract), shut it down after; return body's result (its exception re-raised here)."""
    out = {}

    def front(engine):
        def drive():
            try:
                out["result"] = body(engine)
            except BaseException as e:  # re-raised in the caller's thread
                out["error"] = e
            finally:
                engine.shutdown(cancel=True)
        threading.Thread(target=drive).start()
        engine.run()
        return 0

    assert serve_rank(rank_settings, engine_settings, front) == 0
    if "error" in out:
        raise out["error"]
    return out["result"]
