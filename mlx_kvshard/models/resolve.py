"""Find a model on disk: the embedded `tiny`, a local HF-format directory, or a hub id."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import UserError

WEIGHT_PATTERNS = ["config.json", "*.safetensors", "*.safetensors.index.json", "tokenizer*",
                   "special_tokens_map.json", "generation_config.json", "*.jinja", "*.model"]


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def resolve_model_dir(name: str, config_only: bool = False) -> Path:
    """Return a local directory holding the model (downloading from the hub when allowed)."""
    if name == "tiny":
        from .tiny import tiny_model_dir

        return tiny_model_dir()
    p = Path(name).expanduser()
    if p.exists():
        if p.is_file() and p.suffix == ".gguf":
            from .gguf.modeldir import gguf_model_dir

            return gguf_model_dir(p)
        if not p.is_dir():
            raise UserError(f"--model {name}: is a file; give a .gguf file or the directory holding config.json")
        if not (p / "config.json").exists():
            raise UserError(f"--model {name}: no config.json in this directory; is it a HF-format model?")
        return p
    if not _looks_like_hub_id(name):
        raise UserError(f"--model {name}: no such directory, and not a hub id of the form owner/name")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError as e:  # pragma: no cover - dependency is declared
        raise UserError(f"huggingface_hub is needed to resolve hub ids ({e})") from None
    patterns = ["config.json"] if config_only else WEIGHT_PATTERNS
    try:
        return Path(snapshot_download(name, allow_patterns=patterns))
    except LocalEntryNotFoundError:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        hint = ("HF_HUB_OFFLINE is set and it is not in the local cache; download it first"
                if offline else "check the id and your network")
        raise UserError(f"--model {name}: not found on the hub or in the cache ({hint})") from None
    except Exception as e:  # network, auth, missing repo: all user-actionable
        raise UserError(f"--model {name}: could not fetch from the hub: {type(e).__name__}: {e}") from None


def resolve_config_path(name: str) -> Path:
    return resolve_model_dir(name, config_only=True) / "config.json"
