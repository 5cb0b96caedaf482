"""The top-level launch/ kit: not a Python package; its hostfiles are the package's and
load; setup-mac.sh is valid bash (shellcheck-clean where shellcheck is installed) and,
run against stand-ins for macOS's tools, reports every step and changes nothing unless
asked; the launchd template is a well-formed plist that runs `launch ... -- serve`."""

from __future__ import annotations

import plistlib
import shutil
import subprocess
from pathlib import Path

import pytest

from mlx_kvshard.launch.hostfile import load_hostfile

REPO = Path(__file__).resolve().parent.parent
KIT = REPO / "launch"
SCRIPT = KIT / "setup-mac.sh"

# Stand-ins for the macOS tools the script reads; `sudo` records that it was called.
FAKE_TOOLS = {
    "uname": 'case $1 in -s) echo Darwin;; -m) echo arm64;; *) echo Darwin;; esac',
    "sw_vers": "echo 15.5",
    "hostname": "echo mini1",
    "sysctl": 'case $2 in hw.memsize) echo 68719476736;; iogpu.wired_limit_mb) echo 0;; esac',
    "ifconfig": ('[ "$1" = bridge0 ] && printf "bridge0: flags=8863<UP,BROADCAST,RUNNING> mtu 1500\\n'
                 '\\tmember: en2 flags=3<LEARNING,DISCOVER>\\n"'),
    "networksetup": 'echo "Thunderbolt Bridge"',
    "pmset": 'printf "System-wide power settings:\\n sleep                10\\n autorestart          0\\n"',
    "nc": "exit 1",
    "sudo": 'echo "$@" >> "$SUDO_LOG"; exit 0',
}


def fake_macos(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in FAKE_TOOLS.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    for tool in ("bash", "sed", "awk", "grep", "head", "tr", "cat", "env"):  # the real ones the script needs
        (bin_dir / tool).symlink_to(shutil.which(tool))
    return {"PATH": str(bin_dir), "SUDO_LOG": str(tmp_path / "sudo.log"), "HOME": str(tmp_path)}


def test_the_kit_is_not_a_python_package_and_its_hostfiles_load():
    assert not list(KIT.rglob("*.py"))
    names = sorted(p.name for p in (KIT / "hostfiles").glob("*.json"))
    assert names == sorted(p.name for p in (REPO / "mlx_kvshard/configs/hostfiles").glob("*.json")) and names
    for name in names:
        assert load_hostfile(str(KIT / "hostfiles" / name)).hosts


def test_setup_mac_is_valid_bash():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0
    if shutil.which("shellcheck"):
        done = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True)
        assert done.returncode == 0, done.stdout


@pytest.mark.parametrize("flags", [["--check"], []], ids=["check", "no-terminal"])
def test_setup_mac_reports_each_step_and_changes_nothing_unasked(tmp_path, flags):
    env = fake_macos(tmp_path)
    python = shutil.which("python3")
    done = subprocess.run(["bash", str(SCRIPT), "--python", python, *flags], capture_output=True, text=True,
                          env=env, stdin=subprocess.DEVNULL, timeout=60)
    out = done.stdout
    for step in ("This Mac", "Python, mlx", "Thunderbolt Bridge", "RDMA", "GPU wired memory", "Sleep",
                 "Remote Login", "Keep the cluster network private"):
        assert f"== {step}" in out, out
    assert "WARN: bridge0 is up and holds en2" in out and "to fix: sudo ifconfig bridge0 down" in out
    assert "iogpu.wired_limit_mb = 0: the macOS default" in out
    assert "to fix: sudo sysctl iogpu.wired_limit_mb=57344" in out  # 64 GB less 8 GB for macOS
    assert "WARN: the Mac sleeps after 10 minute(s) idle" in out and "to fix: sudo pmset -a sleep 0" in out
    assert "rdma_ctl enable" in out and "(check only: nothing was changed)" in out
    assert done.returncode == 1  # warnings
    assert not (tmp_path / "sudo.log").exists()  # nothing ran as root


def test_setup_mac_refuses_other_systems_and_bad_options():
    assert subprocess.run(["bash", str(SCRIPT), "--check"], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL).returncode == (0 if shutil.which("sw_vers") else 2)
    done = subprocess.run(["bash", str(SCRIPT), "--wired-mb", "lots"], capture_output=True, text=True)
    assert done.returncode == 2 and "--wired-mb lots: give a whole number of MB" in done.stderr


def test_the_launchd_template_runs_launch_serve_and_keeps_it_alive():
    text = (KIT / "com.mlx-kvshard.serve.plist").read_text()
    filled = text
    for name, value in (("__USER__", "me"), ("__HOME__", "/Users/me"), ("__VENV__", "/Users/me/mlx-venv"),
                        ("__HOSTFILE__", "/Users/me/hosts.json"), ("__MODEL__", "/Users/me/models/m"),
                        ("__API_KEY__", "k")):
        assert name in text
        filled = filled.replace(name, value)
    job = plistlib.loads(filled.encode())
    argv = job["ProgramArguments"]
    assert argv[0] == "/Users/me/mlx-venv/bin/mlx-kvshard" and argv[1:4] == ["launch", "--hostfile",
                                                                            "/Users/me/hosts.json"]
    assert argv[argv.index("--") + 1] == "serve"
    assert job["RunAtLoad"] is True and job["KeepAlive"] is True and job["UserName"] == "me"
    assert job["ExitTimeOut"] > 20  # room for the launcher's orderly stop (runner.STOP_GRACE_S)

    from mlx_kvshard.cli import build_parser
    from mlx_kvshard.launch.runner import STOP_GRACE_S

    assert job["ExitTimeOut"] > STOP_GRACE_S
    ns = build_parser().parse_args(argv[1:])  # the launcher's own parser accepts the command line
    assert ns.restart == 3 and ns.rank_command[1:3] == ["serve", "--model"]
