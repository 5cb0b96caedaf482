"""One rank of `mlx-kvshard serve`.

Rank 0: uvicorn serves the app on a thread of its own; the engine runs on the main thread.
The engine must (Engine.run owns the thread the model and collectives were set up on),
and the main thread is where Python delivers signals: SIGTERM/SIGINT shut the engine down
(open requests cancelled, every rank told to stop) and then uvicorn. The port is bound
before the model loads, so a taken port fails at once and /health answers 503 while the
ranks load. The other ranks follow the engine's step messages and never parse HTTP.

A lost rank: the liveness client ends the process with exit 75 from its watchdog thread;
just before, `before_exit` marks /health 503, hands every open request the verdict naming
the lost rank, and waits (bounded) for the open responses to carry it out."""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time

from ..errors import UserError
from ..settings import EngineSettings, RankSettings, ServerSettings
from .guards import is_loopback
from .state import Backend


def serve(rank: RankSettings, engine: EngineSettings, server: ServerSettings) -> int:
    from ..serving.worker import serve_rank

    server.validate()
    if int(os.environ.get("MLX_RANK", "0")) != 0:
        return serve_rank(rank, engine, lambda _engine: 0)  # rank 0 only runs the front
    from ..front.messages import ENV_FRONT

    if os.environ.get(ENV_FRONT):  # --restart: the launcher holds HTTP and the requests (mlx_kvshard/front)
        from ..front.link import run_engine_link

        return serve_rank(rank, engine, run_engine_link)
    sock = listen(server)
    backend = Backend()
    http = HttpThread(backend, server, sock)
    http.start()
    try:
        return serve_rank(rank, engine, lambda eng: run_front(eng, backend, http, server))
    finally:
        http.stop()


def listen(server: ServerSettings) -> socket.socket:
    family = socket.AF_INET6 if ":" in server.host else socket.AF_INET
    # IPPROTO_TCP named explicitly: asyncio sets TCP_NODELAY only on sockets whose proto says
    # TCP, and an accepted socket inherits the listener's. With proto 0, Nagle's algorithm
    # held each small response write until the client's delayed ACK: +40 ms per request.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((server.host, server.port))
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {server.host}:{server.port} ({e.strerror or e}); "
                        f"choose another --port or --host") from None
    sock.listen(128)
    port = sock.getsockname()[1]
    say(f"HTTP on http://{server.host}:{port} (OpenAI API under /v1; /health turns 200 once every rank has loaded)")
    if not server.api_key and not is_loopback(server.host):
        say(f"warning: --host {server.host} is reachable from other machines and no --api-key is set: "
            f"anyone who can reach port {port} can use this server")
    return sock


class HttpThread:
    """uvicorn on a thread of its own (it installs no signal handlers off the main thread)."""

    def __init__(self, backend: Backend, settings: ServerSettings, sock: socket.socket):
        import uvicorn

        from .app import create_app

        self.backend = backend
        config = uvicorn.Config(create_app(backend, settings), lifespan="off", log_level="warning",
                                access_log=False, timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.sock = sock
        self.on_exit = None  # called if uvicorn ends while the engine still runs
        self.thread = threading.Thread(target=self._run, name="mlx-kvshard-http", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        try:
            self.server.run(sockets=[self.sock])
        finally:
            if self.on_exit is not None and not self.server.should_exit:
                self.on_exit("the HTTP server stopped")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


def run_front(engine, backend: Backend, http: HttpThread, server: ServerSettings) -> int:
    """Rank 0 once every rank has loaded: serve until a signal (exit 0) or a lost rank (75)."""
    from ..liveness.client import is_connection_error

    if not http.thread.is_alive():  # uvicorn failed while the ranks loaded (it logged why)
        raise UserError("the HTTP server stopped before the model was loaded; see the error above")
    backend.attach(engine)
    notify_engine = engine.live.before_exit

    def before_exit(message: str) -> None:
        backend.lost(message)
        notify_engine(message)  # every open request gets an error event
        backend.drain(server.drain_s)
        time.sleep(0.2)  # the event loop writes the last bytes

    engine.live.before_exit = before_exit

    def stop(why: str) -> None:
        backend.stopping(why)
        threading.Thread(target=engine.shutdown, kwargs={"cancel": True}, daemon=True).start()

    http.on_exit = stop
    engine.live.on_shutdown = stop  # SIGTERM/Ctrl-C to the launcher, passed on by the coordinator
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda n, _f: stop(f"stopping on {signal.Signals(n).name}"))
    info = engine.info()
    say(f"ready: {server.model_id} on {info['world']} rank(s), max context {info['max_context']}, "
        f"KV capacity {info['kv_capacity_tokens']} tokens per rank, max batch {info['max_batch']}")
    try:
        engine.run()
    except BaseException as e:
        if not is_connection_error(e):  # a lost peer is the liveness client's to report (before_exit)
            backend.lost(f"the engine stopped: {type(e).__name__}: {e}")
            backend.drain(server.drain_s)
        raise
    say(backend.reason or "stopped")
    return 0


def say(text: str) -> None:
    print(f"mlx-kvshard: {text}", file=sys.stderr, flush=True)
