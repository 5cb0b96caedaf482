"""The README's Quick start, as a new user runs it: `uv run` on a fresh copy of the
repository builds its own environment from uv.lock and runs the main job. Skipped with the
reason where uv or the package index is missing, except in CI (CI=true), where it must run."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"


def quick_start_commands() -> list[str]:
    """The commands in the README's Quick start code block, comments stripped."""
    text = README.read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.split("#", 1)[0].strip()]


def _unavailable(reason: str):
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (required in CI)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def fresh_copy(tmp_path_factory) -> Path:
    """What a clone holds: the tracked files and the untracked ones git does not ignore."""
    if shutil.which("uv") is None:
        _unavailable("uv is not installed (pip install uv)")
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO, capture_output=True, check=True).stdout.decode()
    dest = tmp_path_factory.mktemp("clone")
    for name in filter(None, listed.split("\0")):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name, follow_symlinks=False)
        elif src.is_symlink():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(os.readlink(src), dest / name)
    return dest


def _uv_env(tmp: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "UV_PROJECT_ENVIRONMENT")}
    env["MLX_KVSHARD_CACHE"] = str(tmp / "cache")  # `tiny` built from nothing, as on a new machine
    return env


def _run(cmd: list[str], cwd: Path, env: dict, timeout: int) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0 and re.search(r"(?i)failed to fetch|dns error|connect error|network", done.stderr):
        _unavailable(f"the package index cannot be reached: {done.stderr.strip().splitlines()[-1]}")
    return done


def test_the_readme_quick_start_is_two_uv_run_commands():
    commands = quick_start_commands()
    assert len(commands) == 2, commands
    assert commands[0].startswith("uv run mlx-kvshard generate --simulate 2")
    assert commands[1] == "uv run pytest"


def test_uv_run_frozen_version_on_a_fresh_copy(fresh_copy, tmp_path):
    done = _run(["uv", "run", "--frozen", "mlx-kvshard", "--version"], fresh_copy, _uv_env(tmp_path), 600)
    assert done.returncode == 0, done.stderr[-2000:]
    from mlx_kvshard import __version__

    assert re.fullmatch(rf"mlx-kvshard {re.escape(__version__)}; mlx \S+ \((CPU|Metal), .*\); mlx-lm \S+\n",
                        done.stdout), done.stdout
    assert (fresh_copy / ".venv").is_dir()  # uv made the project's own environment


def test_the_quick_start_main_job_on_a_fresh_copy(fresh_copy, tmp_path):
    main_job = quick_start_commands()[0].split()
    assert main_job[:2] == ["uv", "run"]
    cmd = ["uv", "run", "--frozen", *main_job[2:], "--max-tokens", "8", "--json"]
    done = _run(cmd, fresh_copy, _uv_env(tmp_path), 600)
    assert done.returncode == 0, done.stderr[-2000:]
    import json

    result = json.loads(done.stdout)
    assert len(result["tokens"]) == 8 and result["world"] == 2, result
