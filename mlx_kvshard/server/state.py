"""What the HTTP side knows about the engine: the Engine once every rank has loaded, the
health state, and the responses still open (so a lost rank's error reaches them before
the process ends). Written from the engine and liveness threads, read by the event loop."""

from __future__ import annotations

import threading
import time


class Backend:
    def __init__(self, world: int | None = None):
        self.engine = None  # serving.engine.Engine, once loaded
        self.world = world
        self.state = "loading"  # loading -> ready -> lost | stopping
        self.reason = "the ranks are loading the model"
        self.started = int(time.time())
        self._open = 0
        self._cond = threading.Condition()

    def attach(self, engine) -> None:
        self.engine = engine
        self.world = engine.comm.world
        self.state, self.reason = "ready", ""

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def lost(self, message: str) -> None:
        self.state, self.reason = "lost", message

    def stopping(self, why: str) -> None:
        if self.state != "lost":
            self.state, self.reason = "stopping", why

    # ---- open responses ----------------------------------------------------------------

    def opened(self) -> None:
        with self._cond:
            self._open += 1

    def closed(self) -> None:
        with self._cond:
            self._open -= 1
            self._cond.notify_all()

    def drain(self, timeout: float) -> int:
        """Wait (bounded) until every open response has ended; return how many remain."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._open > 0 and time.monotonic() < deadline:
                self._cond.wait(max(0.0, deadline - time.monotonic()))
            return self._open
