"""Secrets reach a rank on its stdin, never on a command line.

A rank's environment is exported by the launch script, which is `bash -c SCRIPT` here and
ssh's last argument for a remote Mac: `ps` on either machine shows it for the whole run.
So the launch's tokens (the liveness coordinator's, the front's) and the API key are
taken out of that environment: the script exports MLX_KVSHARD_SECRETS=stdin instead, the
launcher writes them as one JSON line to the rank's stdin once the launch script has
printed its pidfile (after MLX's `stty -echo`, so a remote pty does not echo them back),
and the rank reads that line before anything else and puts them in its own environment.
"""

from __future__ import annotations

import json
import os
import select
import time

ENV_SECRETS = "MLX_KVSHARD_SECRETS"  # "stdin": one JSON line of secrets comes first on stdin
# Variables that never go on a command line: the liveness token (liveness.client.ENV_TOKEN),
# the front's token (front.messages.ENV_FRONT_TOKEN), the API key (cli.serve.ENV_API_KEY).
SECRET_KEYS = frozenset({"MLX_KVSHARD_TOKEN", "MLX_KVSHARD_FRONT_TOKEN", "MLX_KVSHARD_API_KEY"})
MAX_LINE = 1000  # bytes; a macOS pty's canonical line holds 1024
READ_TIMEOUT_S = 60.0


def split(envs: list[str]) -> tuple[list[str], dict[str, str]]:
    """KEY=VALUE entries -> (those that may be exported, the secrets among them)."""
    keep, secret = [], {}
    for e in envs:
        key, _, value = e.partition("=")
        if key in SECRET_KEYS:
            secret[key] = value
        else:
            keep.append(e)
    return keep, secret


def line(secrets: dict[str, str]) -> bytes:
    """The line a rank reads (JSON escapes every control and non-ASCII character: a pty
    passes it unchanged). Checked when the launch is built, before any rank starts."""
    data = json.dumps(secrets, separators=(",", ":")).encode() + b"\n"
    if len(data) > MAX_LINE:
        from ..errors import UserError

        raise UserError(f"{', '.join(sorted(secrets))}: {len(data)} bytes together, at most {MAX_LINE} "
                        f"(one line through a pty); use a shorter API key")
    return data


def take_from_stdin() -> None:
    """In a rank: if the launcher said secrets come on stdin, read that line (bounded in
    size and time) into os.environ. A rank without the line cannot prove who it is: fail."""
    if os.environ.pop(ENV_SECRETS, None) != "stdin":
        return
    buf, deadline = b"", time.monotonic() + READ_TIMEOUT_S
    while not buf.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([0], [], [], left)[0]:
            raise SystemExit(f"mlx-kvshard: error: the launcher's secrets did not arrive on stdin within "
                             f"{READ_TIMEOUT_S:g} s")
        chunk = os.read(0, MAX_LINE + 1 - len(buf))  # the launcher writes nothing else to stdin
        if not chunk or len(buf) + len(chunk) > MAX_LINE:
            raise SystemExit("mlx-kvshard: error: stdin ended (or overflowed) before the launcher's secrets line")
        buf += chunk
    for key, value in json.loads(buf.strip(b"\r\n")).items():
        if key in SECRET_KEYS:
            os.environ[key] = str(value)
