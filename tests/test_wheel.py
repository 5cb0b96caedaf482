"""The wheel `pip install .` would install: the profiles and example hostfiles ship inside
the package, and nothing but `mlx_kvshard` lands at the top of site-packages."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _can_build_without_isolation() -> bool:
    """setuptools builds wheels itself from 70.1 on; before that it needs `wheel`."""
    if importlib.util.find_spec("setuptools") is None:  # a uv environment has none: build isolated
        return False
    return (importlib.util.find_spec("wheel") is not None
            or importlib.util.find_spec("setuptools.command.bdist_wheel") is not None)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    # Build from a clean copy: setuptools' build/ folder in a checkout can carry stale modules.
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "mlx_kvshard", src / "mlx_kvshard", ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    isolation = ["--no-build-isolation"] if _can_build_without_isolation() else []
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q", "-w", str(out),
                           str(src)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    (path,) = out.glob("mlx_kvshard-*.whl")
    return zipfile.ZipFile(path)


def test_the_wheel_ships_profiles_and_example_hostfiles(wheel):
    names = set(wheel.namelist())
    configs = REPO / "mlx_kvshard" / "configs"
    shipped = {f"mlx_kvshard/configs/{p.relative_to(configs).as_posix()}" for p in configs.rglob("*.json")}
    assert {"mlx_kvshard/configs/links/tb5-ring.json", "mlx_kvshard/configs/chips/m4pro.json",
            "mlx_kvshard/configs/hostfiles/2-minis-thunderbolt-ring.json"} <= shipped
    assert shipped <= names, sorted(shipped - names)
    assert "mlx_kvshard/launch/hostfile.py" in names and "mlx_kvshard/cli/__init__.py" in names


def test_the_wheel_installs_one_top_level_package(wheel):
    names = wheel.namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"mlx_kvshard"}, top
    (top_level,) = [n for n in names if n.endswith(".dist-info/top_level.txt")]
    assert wheel.read(top_level).decode().split() == ["mlx_kvshard"]
