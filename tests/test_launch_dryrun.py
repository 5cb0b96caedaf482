"""`launch --dry-run` on the example hostfiles: the generated MLX hostfile and the exact
command for every Mac, and nothing is run."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from mlx_kvshard.cli import main

EXAMPLES = Path(__file__).resolve().parent.parent / "mlx_kvshard" / "configs" / "hostfiles"
PY = "/Users/me/mlx-venv/bin/python"
# A hub id that is not on this machine: the dry run must not need the model.
RANK_CMD = ["generate", "--model", "mlx-community/Some-Model-4bit", "--prompt", "hi"]
SSH = ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-tt", "-o", "LogLevel=ERROR"]


def dry_run(capsys, hostfile: str, *extra: str, json_out: bool = True):
    argv = ["launch", "--hostfile", str(EXAMPLES / hostfile), "--dry-run", *extra]
    assert main(argv + (["--json"] if json_out else []) + ["--", *RANK_CMD]) == 0
    out = capsys.readouterr().out
    return json.loads(out) if json_out else out


def test_two_minis_ring(capsys):
    d = dry_run(capsys, "2-minis-thunderbolt-ring.json")
    assert d["mlx_hostfile"] == {"backend": "ring", "envs": [], "hosts": [
        {"ssh": "mini1.local", "ips": ["192.168.0.1"], "rdma": []},
        {"ssh": "mini2.local", "ips": ["192.168.0.2"], "rdma": []}]}
    assert d["addresses"] == [["192.168.0.1:32323"], ["192.168.0.2:32324"]]  # mlx.launch's numbering
    r1 = d["ranks"][1]
    assert r1["command"] == [PY, "-m", "mlx_kvshard", *RANK_CMD]
    assert r1["env"] == ["MLX_RANK=1"]
    assert r1["files"] == {"MLX_HOSTFILE": '[["192.168.0.1:32323"], ["192.168.0.2:32324"]]'}
    assert r1["exec"] == [*SSH, "mini2.local", (
        "stty -echo; pidfile=$(mktemp); echo $$ > $pidfile; printf \"%s\\n\" $pidfile; "
        "if [[ -d /Users/me/mlx-kvshard ]]; then   cd /Users/me/mlx-kvshard; else  echo 'Failed to change "
        "directory to' /Users/me/mlx-kvshard >&2; fi; fname=$(mktemp); echo '[[\"192.168.0.1:32323\"], "
        "[\"192.168.0.2:32324\"]]' >$fname; export MLX_HOSTFILE=$fname; export MLX_RANK=1; "
        f"cmd=({PY} -m mlx_kvshard generate --model mlx-community/Some-Model-4bit --prompt hi); "
        "exec \"${cmd[@]}\"")]


def test_two_minis_text_shows_each_mac(capsys):
    out = dry_run(capsys, "2-minis-thunderbolt-ring.json", json_out=False)
    assert '"ssh": "mini2.local"' in out
    for rank, host in ((0, "mini1"), (1, "mini2")):
        assert f"rank {rank} on {host} (ssh {host}.local)" in out
    assert f"  command: {shlex.join([PY, '-m', 'mlx_kvshard', *RANK_CMD])}" in out
    assert "  exact:   ssh -o BatchMode=yes -o ConnectTimeout=10 -tt -o LogLevel=ERROR mini2.local 'stty -echo;" in out


@pytest.mark.parametrize("hostfile, ring", [("4-minis-tb5-jaccl.json", False), ("4-minis-tb5-jaccl-ring.json", True)])
def test_four_minis_jaccl(capsys, hostfile, ring):
    d = dry_run(capsys, hostfile)
    source = json.loads((EXAMPLES / hostfile).read_text())
    matrix = [h["rdma"] for h in source["hosts"]]
    assert d["mlx_hostfile"] == {"backend": source["backend"], "envs": [], "hosts": [
        {"ssh": h["ssh"], "ips": h["ips"], "rdma": h["rdma"]} for h in source["hosts"]]}
    assert d["addresses"] is None
    for r, rank in enumerate(d["ranks"]):
        assert rank["ssh"] == f"mini{r + 1}.local"
        assert rank["env"] == ["MLX_JACCL_COORDINATOR=10.0.0.11:32323", *(["MLX_JACCL_RING=1"] if ring else []),
                               f"MLX_RANK={r}"]
        assert rank["files"] == {"MLX_IBV_DEVICES": json.dumps(matrix)}
        assert rank["exec"][:len(SSH) + 1] == [*SSH, f"mini{r + 1}.local"]
        assert "export MLX_JACCL_COORDINATOR=10.0.0.11:32323;" in rank["exec"][-1]
        assert ("export MLX_JACCL_RING=1;" in rank["exec"][-1]) == ring


def test_four_minis_cabled_ring_is_reordered(capsys):
    d = dry_run(capsys, "4-minis-thunderbolt-ring-cables.json")
    assert [h["ssh"] for h in d["mlx_hostfile"]["hosts"]] == ["mini1.local", "mini3.local", "mini2.local", "mini4.local"]
    assert d["addresses"] == [["192.168.0.14:32323"], ["192.168.0.2:32324"], ["192.168.0.6:32325"],
                              ["192.168.0.10:32326"]]
    assert "reordered from the hostfile" in d["notes"][0]


def test_options_reach_every_command_and_nothing_runs(capsys, tmp_path):
    ran = tmp_path / "ran"
    shim = tmp_path / "ssh-shim"
    shim.write_text(f"#!/bin/sh\ntouch {ran}\n")
    shim.chmod(0o755)
    d = dry_run(capsys, "2-minis-thunderbolt-ring.json", "--ssh-command", f"{shim} -p 2222", "--starting-port",
                "40000", "--env", "MLX_METAL_FAST_SYNCH=1", "--python", "/opt/py/bin/python3", "--cwd", "/srv/run",
                "--env", "MLX_KVSHARD_API_KEY=k3y-not-on-any-command-line")
    r0 = d["ranks"][0]
    assert r0["exec"][:4] == [str(shim), "-p", "2222", "mini1.local"]  # no -tt: only real ssh gets a pty
    # a secret goes to the rank's stdin (launch/secrets.py): not in ssh's arguments, the script or the hostfile
    assert r0["env"] == ["MLX_METAL_FAST_SYNCH=1", "MLX_KVSHARD_SECRETS=stdin", "MLX_RANK=0"]
    assert r0["secrets on stdin"] == ["MLX_KVSHARD_API_KEY"] and "k3y" not in json.dumps(d)
    assert r0["command"][0] == "/opt/py/bin/python3" and r0["cwd"] == "/srv/run"
    assert d["addresses"] == [["192.168.0.1:40000"], ["192.168.0.2:40001"]]
    assert d["mlx_hostfile"]["envs"] == ["MLX_METAL_FAST_SYNCH=1"]
    assert not ran.exists()


def test_a_custom_ssh_keeps_batch_mode_and_a_timeout(capsys):
    d = dry_run(capsys, "2-minis-thunderbolt-ring.json", "--ssh-command", "ssh -i /keys/cluster -o ConnectTimeout=3")
    assert d["ranks"][1]["exec"][:9] == ["ssh", "-i", "/keys/cluster", "-o", "ConnectTimeout=3", "-o", "BatchMode=yes",
                                         "-tt", "-o"]  # a password prompt must fail, not hang the launch


def test_usage_mistakes_are_refused(capsys):
    with pytest.raises(SystemExit):
        main(["launch", "--dry-run", "--", *RANK_CMD])  # neither --hostfile nor --simulate
    with pytest.raises(SystemExit):
        main(["launch", "--simulate", "2", "--dry-run"])  # no rank command
    assert "give the subcommand every rank runs after --" in capsys.readouterr().err
    code = main(["launch", "--simulate", "2", "--dry-run", "--", "generate", "--no-such-flag"])
    assert code == 2
    assert "does not parse" in capsys.readouterr().err


def test_a_shipped_example_by_name(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # found in the package, not relative to the checkout
    assert main(["launch", "--hostfile", "2-minis-thunderbolt-ring", "--dry-run", "--json", "--", *RANK_CMD]) == 0
    by_name = json.loads(capsys.readouterr().out)
    assert by_name == dry_run(capsys, "2-minis-thunderbolt-ring.json")
