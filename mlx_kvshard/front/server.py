"""The front in the launcher process: the HTTP port (bound once, for every group), the
Unix socket rank 0 connects to (in a fresh 0700 directory, the socket itself 0600, and
a hello that must carry this front's token), and the RemoteEngine behind the app."""

from __future__ import annotations

import hmac
import json
import os
import secrets
import shutil
import socket
import tempfile
import threading
from pathlib import Path

from .messages import ENV_FRONT, ENV_FRONT_TOKEN, Lines
from .remote import RemoteEngine

HELLO_TIMEOUT_S = 10.0


class FrontServer:
    def __init__(self, server_settings, model_dir: Path, migration_limit: int, migration_timeout: float):
        from ..config import ModelConfig
        from ..engine.startup import load_tokenizer
        from ..server.run import HttpThread, listen
        from ..server.state import Backend

        self.token = secrets.token_urlsafe(24)
        self.dir = tempfile.mkdtemp(prefix="mlx-kvshard-front-")  # 0700: only this user reaches the socket
        self.path = os.path.join(self.dir, "engine.sock")
        self._listen = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listen.bind(self.path)
        os.chmod(self.path, 0o600)
        self._listen.listen(4)
        self.backend = Backend()
        tokenizer = load_tokenizer(model_dir, ModelConfig.from_file(model_dir))
        self.remote = RemoteEngine(self.backend, tokenizer, migration_limit, migration_timeout)
        self.http = HttpThread(self.backend, server_settings, listen(server_settings))
        self.http.start()
        self._accepting = threading.Thread(target=self._accept, name="mlx-kvshard-front-accept", daemon=True)
        self._accepting.start()

    def env(self) -> dict[str, str]:
        """For the ranks: where rank 0 finds the front, and the token its hello must carry."""
        return {ENV_FRONT: self.path, ENV_FRONT_TOKEN: self.token}

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listen.accept()
            except OSError:
                return
            threading.Thread(target=self._hello, args=(conn,), daemon=True).start()

    def _hello(self, conn: socket.socket) -> None:
        conn.settimeout(HELLO_TIMEOUT_S)
        msg = Lines(conn).next()
        token = msg.get("token") if msg else None
        if (msg is None or msg.get("t") != "hello" or not isinstance(token, str)
                or not hmac.compare_digest(token.encode(), self.token.encode())):
            conn.close()
            return
        conn.settimeout(None)
        self.remote.connected(conn, json.loads(json.dumps(msg.get("info") or {})))

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
