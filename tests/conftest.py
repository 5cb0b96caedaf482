import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="session")
def ckpt_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """`tiny` is built into a per-session cache, never the user's."""
    import os

    os.environ.setdefault("MLX_KVSHARD_CACHE", str(tmp_path_factory.mktemp("cache")))
