"""The shared cache of MLX's compiled CPU kernels (mlx_kvshard/launch/kernels.py): whole
libraries travel between run directories, truncated ones never do."""

from __future__ import annotations

import struct

from mlx_kvshard.launch import kernels


def _elf(sections: int = 3) -> bytes:
    """A minimal ELF64 image: header, then the section header table, last, as a linker writes
    it (all `_whole` reads), so the test runs on any OS."""
    head = bytearray(64)
    head[:7] = b"\x7fELF\x02\x01\x01"  # 64-bit, little-endian, version 1
    struct.pack_into("<Q", head, 0x28, 64)  # e_shoff: the table right after the header
    struct.pack_into("<HH", head, 0x3A, 64, sections)  # e_shentsize, e_shnum
    return bytes(head) + bytes(64 * sections)


def test_kept_kernels_seed_the_next_run(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_KVSHARD_KERNELS", str(tmp_path / "shared"))
    data = _elf()
    run1 = tmp_path / "run1" / "tmp" / "mlx" / "9.9" / "cpu"
    run1.mkdir(parents=True)
    (run1 / "libwhole.so").write_bytes(data)
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
    (run / "lib.so").write_bytes(_elf())
    assert kernels.seed(tmp_path / "run" / "tmp") == 0
    assert kernels.keep(tmp_path / "run" / "tmp") in (0, 1)  # root may write anyway; it must not raise
