"""Test-only: with MLX_KVSHARD_TEST_SECRETS_TO=DIR on PYTHONPATH's front, every rank writes
the secrets it read on stdin to DIR/rank<N>.json (tests/test_control_plane.py needs the
launch's real token to knock with it). The package itself never writes them anywhere."""

import os

if os.environ.get("MLX_KVSHARD_TEST_SECRETS_TO"):
    import json

    from mlx_kvshard.launch import secrets

    _take = secrets.take_from_stdin

    def _take_and_keep() -> None:
        _take()
        found = {k: os.environ[k] for k in secrets.SECRET_KEYS if k in os.environ}
        if found and "MLX_RANK" in os.environ:
            path = os.path.join(os.environ["MLX_KVSHARD_TEST_SECRETS_TO"], f"rank{os.environ['MLX_RANK']}.json")
            with open(path, "w") as f:
                json.dump(found, f)

    secrets.take_from_stdin = _take_and_keep
