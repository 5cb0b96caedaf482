"""A GGUF file as a model directory: config.json, tokenizer files and generation_config.json
derived from its metadata, kept in the cache beside a link to the file, so every command
that takes a model directory takes a .gguf (the weights stay in the GGUF, read in slices)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ...errors import UserError
from ...paths import cache_root

POINTER = "gguf.json"  # in a derived directory: which GGUF file holds the weights
LINK = "model.gguf"
FORMAT = 2  # bump when what _build writes changes: older derived directories are rebuilt


def gguf_model_dir(path: str | Path) -> Path:
    """The derived directory of `path` (built once per file version, shared by concurrent ranks)."""
    from ..synth import write_atomically

    path = Path(path).expanduser().resolve()
    st = path.stat()
    key = hashlib.sha256(f"{FORMAT}\0{path}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return write_atomically(cache_root() / "gguf" / f"{path.stem}-{key}", lambda tmp: _build(path, tmp))


def _build(path: Path, out: Path) -> None:
    from .checkpoint import GGUFCheckpoint, tensor_table
    from .metadata import GGUFModel

    model = GGUFModel(path)
    table = tensor_table(model)
    ckpt = GGUFCheckpoint(path, table=table)
    config = model.config()
    quantization = model.quantization(ckpt.module_quantizations())
    if quantization:
        config["quantization"] = quantization
    eog = model.write_tokenizer(out)
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": eog}))
    (out / POINTER).write_text(json.dumps({"path": str(path), "size": path.stat().st_size,
                                           "ggml_types": ckpt.ggml_types(), "table": table}))
    (out / LINK).symlink_to(path)
    (out / "config.json").write_text(json.dumps(config, indent=1))


def gguf_source(model_dir: Path) -> tuple[Path, dict] | None:
    """The GGUF file behind a derived directory and its tensor table; None for an ordinary
    model directory."""
    pointer = Path(model_dir) / POINTER
    if not pointer.exists():
        return None
    meta = json.loads(pointer.read_text())
    path = Path(meta["path"])
    if not path.exists() or path.stat().st_size != meta["size"]:
        raise UserError(f"{path}: the GGUF file changed or disappeared since {model_dir} was derived from it; "
                        f"pass the .gguf file again as --model")
    return path, meta["table"]


def open_checkpoint(model_dir: Path):
    """The weights of a model directory: safetensors files, or the GGUF file it was derived from."""
    source = gguf_source(model_dir)
    if source is None:
        from ...engine.safetensors_reader import Checkpoint

        return Checkpoint(model_dir)
    from .checkpoint import GGUFCheckpoint

    path, table = source
    return GGUFCheckpoint(path, table=table)
