"""The shared cache of MLX's compiled CPU kernels (mlx_kvshard/launch/kernels.py): whole
libraries travel between run directories, truncated ones never do."""

from __future__ import annotations

import ctypes.util
import shutil
from pathlib import Path

import pytest

from mlx_kvshard.launch import kernels


def _a_library() -> Path:
    name = ctypes.util.find_library("m") or ctypes.util.find_library("c")
    for d in ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib", "/lib"):
        if name and (Path(d) / name).is_file():
            return (Path(d) / name).resolve()
    pytest.skip("no ELF shared library found to stand in for a compiled kernel")


def test_kept_kernels_seed_the_next_run(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_KVSHARD_KERNELS", str(tmp_path / "shared"))
    lib = _a_library()
    run1 = tmp_path / "run1" / "tmp" / "mlx" / "9.9" / "cpu"
    run1.mkdir(parents=True)
    shutil.copy(lib, run1 / "libwhole.so")
    data = lib.read_bytes()
    (run1 / "libcut.so").write_bytes(data[: len(data) // 2])  # a compiler killed mid-write
    (run1 / "kernel.cpp").write_text("// sources are not shared")

    assert kernels.keep(tmp_path / "run1" / "tmp") == 1
    shared = sorted(p.name for p in (tmp_path / "shared").rglob("*") if p.is_file())
    assert shared == ["libwhole.so"]

    run2 = tmp_path / "run2" / "tmp"
    run2.mkdir(parents=True)
    assert kernels.seed(run2) == 1
    seeded = run2 / "mlx" / "9.9" / "cpu" / "libwhole.so"
    assert seeded.read_bytes() == data
    assert kernels.seed(run2) == 0  # already there: nothing linked twice
    assert kernels.keep(run2) == 0  # nothing new to publish


def test_missing_or_unwritable_cache_never_fails_a_run(tmp_path, monkeypatch):
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o500)
    monkeypatch.setenv("MLX_KVSHARD_KERNELS", str(tmp_path / "ro" / "sub"))
    run = tmp_path / "run" / "tmp" / "mlx" / "cpu"
    run.mkdir(parents=True)
    shutil.copy(_a_library(), run / "lib.so")
    assert kernels.seed(tmp_path / "run" / "tmp") == 0
    assert kernels.keep(tmp_path / "run" / "tmp") in (0, 1)  # root may write anyway; it must not raise
