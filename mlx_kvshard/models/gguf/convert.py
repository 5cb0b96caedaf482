"""`mlx-kvshard convert FILE.gguf OUT_DIR`: the same weights as an mlx-lm checkpoint, so
mlx-lm and mlx-kvshard can be compared on identical weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

from ...errors import UserError

SHARD_BYTES = 2 << 30  # safetensors files of at most ~2 GiB, with an index beyond one


def convert(path: str | Path, out: str | Path, dtype: str = "float16",
            progress: Callable[[str], None] = print) -> Path:
    """Write OUT_DIR: config.json, model*.safetensors (quantized tensors as MLX affine group 32;
    float tensors and every scale/bias in `dtype`), tokenizer and generation config."""
    import mlx.core as mx

    from .checkpoint import GGUFCheckpoint
    from .modeldir import LINK, POINTER, gguf_model_dir

    path, out = Path(path).expanduser(), Path(out).expanduser()
    if not path.is_file() or path.suffix != ".gguf":
        raise UserError(f"convert: {path} is not a .gguf file")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"convert: {out} exists and is not empty; give a new directory")
    derived = gguf_model_dir(path)
    ckpt = GGUFCheckpoint(path)
    target = getattr(mx, dtype)
    out.mkdir(parents=True, exist_ok=True)
    files: list[dict] = [{}]
    size = 0
    for name in ckpt.names():
        arr = ckpt.read(name)
        if mx.issubdtype(arr.dtype, mx.floating):
            arr = arr.astype(target)
        mx.eval(arr)
        if size + arr.nbytes > SHARD_BYTES and files[-1]:
            files.append({})
            size = 0
        files[-1][name] = arr
        size += arr.nbytes
    index = {}
    for i, part in enumerate(files):
        fname = "model.safetensors" if len(files) == 1 else f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        mx.save_safetensors(str(out / fname), part, metadata={"format": "mlx"})
        index.update({n: fname for n in part})
    if len(files) > 1:
        (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}, indent=1))
    for f in derived.iterdir():
        if f.name not in (POINTER, LINK, "config.json"):
            shutil.copy(f, out / f.name)
    config = json.loads((derived / "config.json").read_text())
    config["torch_dtype"] = dtype
    if "quantization" in config:
        config["quantization_config"] = config["quantization"]
    (out / "config.json").write_text(json.dumps(config, indent=1))
    if (line := ckpt.summary()):
        progress(line)
    progress(f"wrote {out} ({len(index)} tensors, {dtype}) from {path.name}")
    return out
