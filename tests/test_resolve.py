"""Model resolution: hub ids go through huggingface_hub's cache (offline here), local
directories are used as they are."""

from __future__ import annotations

import shutil

import pytest

from checkpoints import checkpoint
from mlx_kvshard.errors import UserError
from mlx_kvshard.models.resolve import resolve_model_dir


@pytest.fixture
def offline_hub(tmp_path, monkeypatch, ckpt_root):
    """A hub cache holding `test-org/tiny-llama`, laid out as huggingface_hub writes it."""
    hub = tmp_path / "hub"
    repo = hub / "models--test-org--tiny-llama"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = repo / "snapshots" / commit
    shutil.copytree(checkpoint(ckpt_root, "llama_g2"), snap)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads its settings at import: reload them for this test
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    return snap


def test_hub_id_resolves_from_cache_offline(offline_hub):
    path = resolve_model_dir("test-org/tiny-llama")
    assert path.resolve() == offline_hub.resolve()
    assert (path / "config.json").exists() and list(path.glob("*.safetensors"))


def test_hub_id_missing_offline_says_so(offline_hub):
    with pytest.raises(UserError, match="HF_HUB_OFFLINE is set and it is not in the local cache"):
        resolve_model_dir("test-org/not-there")


def test_local_dir_and_tiny(ckpt_root):
    d = checkpoint(ckpt_root, "llama_g2")
    assert resolve_model_dir(str(d)) == d
    tiny = resolve_model_dir("tiny")
    assert (tiny / "config.json").exists() and (tiny / "tokenizer.json").exists()


def test_not_a_dir_nor_hub_id(tmp_path):
    with pytest.raises(UserError, match="no such directory, and not a hub id"):
        resolve_model_dir(str(tmp_path / "a" / "b" / "c"))
