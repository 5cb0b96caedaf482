"""The front in the launcher process: the HTTP port (bound once, for every group), the
socket rank 0 connects to, and the RemoteEngine behind the app.

Rank 0 on this machine: a Unix socket in a fresh 0700 directory (the socket itself 0600).
Rank 0 on another Mac (`launch --hostfile` with a remote host; after --exclude rank 0 may
be any host): TCP on every interface, as the liveness coordinator listens, because the
address rank 0 reaches us at depends on which host it is (each attempt is told its own).
Either way the first line must be a bounded hello that carries this front's token
(compared in constant time) within HELLO_TIMEOUT_S, and at most MAX_PENDING connections
wait to say it; the token reaches rank 0 on its stdin (launch/secrets.py)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import tempfile
import threading

from ..liveness.client import is_hello
from .messages import ENV_FRONT, ENV_FRONT_TOKEN, MAX_HELLO, MAX_LINE, TCP_PREFIX, Lines
from .remote import RemoteEngine

HELLO_TIMEOUT_S = 10.0
MAX_PENDING = 8  # connections not yet past the hello; more are closed at once


class FrontServer:
    def __init__(self, server_settings, migration_limit: int, migration_timeout: float, tcp: bool = False):
        from ..server.run import HttpThread, listen
        from ..server.state import Backend

        self.token = secrets.token_urlsafe(24)
        self.dir = self.path = self.port = None
        if tcp:
            self._listen = socket.create_server(("0.0.0.0", 0))
            self.port = self._listen.getsockname()[1]
        else:
            self.dir = tempfile.mkdtemp(prefix="mlx-kvshard-front-")  # 0700: only this user reaches the socket
            self.path = os.path.join(self.dir, "engine.sock")
            self._listen = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._listen.bind(self.path)
            os.chmod(self.path, 0o600)
            self._listen.listen(4)
        self._pending = threading.BoundedSemaphore(MAX_PENDING)
        self.backend = Backend()
        self.remote = RemoteEngine(self.backend, migration_limit, migration_timeout)
        self.http = HttpThread(self.backend, server_settings, listen(server_settings))
        self.http.start()
        self._accepting = threading.Thread(target=self._accept, name="mlx-kvshard-front-accept", daemon=True)
        self._accepting.start()

    def env(self, advertise: str = "127.0.0.1") -> dict[str, str]:
        """For the ranks: where rank 0 finds the front (over TCP: at `advertise`, this
        machine's address on the route to rank 0's host) and the token its hello must carry."""
        where = self.path if self.port is None else f"{TCP_PREFIX}{advertise}:{self.port}"
        return {ENV_FRONT: where, ENV_FRONT_TOKEN: self.token}

    def group_ended(self) -> None:
        """The launcher saw this group's ranks end: let its rank 0's connection go now (a Mac
        that vanished never closes its TCP connection) so its requests wait for the next one."""
        self.remote.detach()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listen.accept()
            except OSError:
                return
            if not self._pending.acquire(blocking=False):
                conn.close()
                continue
            threading.Thread(target=self._hello, args=(conn,), daemon=True).start()

    def _hello(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(HELLO_TIMEOUT_S)
            lines = Lines(conn, MAX_HELLO)
            msg = lines.next()
        finally:
            self._pending.release()
        if not is_hello(msg, self.token):
            conn.close()
            return
        conn.settimeout(None)
        if conn.family != socket.AF_UNIX:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # one small line per token
        lines.limit = MAX_LINE
        self.remote.connected(conn, json.loads(json.dumps(msg.get("info") or {})), lines)

    def close(self, why: str, lost: bool) -> None:
        """End every open request with `why`, then stop serving HTTP."""
        if lost:
            self.backend.lost(why)
        else:
            self.backend.stopping(why)
        self.remote.close(why)
        self.backend.drain(5.0)
        self.http.stop()
        self._listen.close()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)


def ending(code: int) -> tuple[str, bool]:
    """What the front tells the requests still open when the launcher is done with exit
    `code`, and whether that is a loss (503 "lost") rather than a stop."""
    from ..liveness.client import EXIT_PEER_LOST

    stops = {0: "the server stopped", 130: "the server stopped on request (SIGINT)",
             143: "the server stopped on request (SIGTERM)"}
    if code in stops:
        return stops[code], False
    if code == EXIT_PEER_LOST:
        return "the group was lost and --restart is used up", True
    return f"the ranks failed (exit {code})", True
