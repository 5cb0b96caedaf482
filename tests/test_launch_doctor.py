"""The preflight doctor against a localhost cluster reached through an ssh shim (the
real code path: ssh argv, remote shell, the host's Python fed the probe on stdin).
Each broken host fails exactly its own check, with a fix."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from mlx_kvshard.launch.checks import Check, Report
from mlx_kvshard.launch.judge import bridges, rdma
from mlx_kvshard.launch.probe import parse_bridge0
from mlx_kvshard.cli import main

REPO = Path(__file__).resolve().parent.parent
SHIM = """#!/bin/bash
# Stands in for ssh: drop ssh's options, then run the remote command here with bash.
while [[ $# -gt 0 && $1 == -* ]]; do
  case $1 in -o|-p|-i|-l|-F) shift 2;; *) shift;; esac
done
host=$1; shift
echo "$host" >> "$SHIM_LOG"
if [[ $host == down-* ]]; then echo "ssh: connect to host $host port 22: Connection refused" >&2; exit 255; fi
exec bash -c "$*"
"""
CONFIG = {"model_type": "llama", "hidden_size": 256, "num_hidden_layers": 4, "intermediate_size": 512,
          "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 512, "torch_dtype": "float32"}


@pytest.fixture
def shim(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "ssh"
    path.write_text(SHIM)
    path.chmod(0o755)
    monkeypatch.setenv("SHIM_LOG", str(tmp_path / "ssh.log"))
    return path


def host_dir(tmp_path: Path, name: str) -> Path:
    """A host's working directory holding its copy of the model at models/m."""
    d = tmp_path / name / "models" / "m"
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(CONFIG))
    (d / "model.safetensors").write_bytes(b"\0" * 4096)
    (d / "tokenizer.json").write_text("{}")
    return tmp_path / name


def python_with_old_mlx_lm(tmp_path: Path) -> Path:
    """A host whose Python reports mlx-lm 0.0.1 (a stale install on one Mac)."""
    fake = tmp_path / "stale-site"
    meta = fake / "mlx_lm-0.0.1.dist-info"
    meta.mkdir(parents=True)
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: mlx-lm\nVersion: 0.0.1\n")
    py = tmp_path / "stale-python"
    py.write_text(f'#!/bin/sh\nPYTHONPATH={fake}:$PYTHONPATH exec {sys.executable} "$@"\n')
    py.chmod(0o755)
    return py


def write_hostfile(tmp_path: Path, hosts: list[dict]) -> Path:
    hf = tmp_path / "hosts.json"
    hf.write_text(json.dumps({"backend": "ring", "envs": [f"PYTHONPATH={REPO}"], "hosts": hosts}))
    return hf


def check(capsys, hostfile: Path, shim: Path, *extra: str) -> tuple[int, dict, str]:
    code = main(["launch", "--hostfile", str(hostfile), "--check", "--ssh-command", str(shim), *extra])
    out = capsys.readouterr().out
    rows = {}
    for m in re.finditer(r"^(PASS|FAIL|WARN|SKIP)\s+(\S+)\s+(ring link|\S+)\s+(.*)\n(?:\s+fix:\s+(.*))?", out, re.M):
        rows.setdefault(m[2], {})[m[3]] = (m[1], m[4], m[5])
    return code, rows, out


def test_version_mismatch_missing_file_and_memory_misfit_each_fail_with_a_fix(tmp_path, shim, capsys):
    dirs = {n: host_dir(tmp_path, n) for n in ("mini-a", "mini-b", "mini-c", "mini-d")}
    (dirs["mini-c"] / "models" / "m" / "model.safetensors").unlink()
    hosts = [{"ssh": n, "ips": ["127.0.0.1"], "cwd": str(d), "python": sys.executable} for n, d in dirs.items()]
    hosts[1]["python"] = str(python_with_old_mlx_lm(tmp_path))
    hosts[3]["memory_gb"] = 0.25  # less than one rank's runtime allowance
    code, rows, out = check(capsys, write_hostfile(tmp_path, hosts), shim, "--model", "models/m")

    assert code == 1, out
    failed = {(h, name) for h, checks in rows.items() for name, (s, _, _) in checks.items() if s == "FAIL"}
    assert failed == {("mini-b", "versions"), ("mini-c", "model"), ("mini-d", "memory")}, out

    status, detail, fix = rows["mini-b"]["versions"]
    assert "mlx-lm 0.0.1 (others " in detail
    assert fix.startswith("on mini-b: ") and "-m pip install mlx-lm==" in fix

    status, detail, fix = rows["mini-c"]["model"]
    assert "differs from mini-a's: missing model.safetensors" in detail
    assert fix == f"on mini-c: rsync -a --delete mini-a:{dirs['mini-a']}/models/m/ {dirs['mini-c']}/models/m/"

    status, detail, fix = rows["mini-d"]["memory"]
    assert re.match(r"needs 1\.0\d GiB of 170\.67 MiB usable \(67% of memory_gb 0\.25\)", detail), detail
    assert "lower --max-context" in fix

    for name in ("ssh", "versions", "model", "memory", "ring link"):
        assert rows["mini-a"][name][0] == "PASS", out
    assert "doctor: 3 FAIL, 0 WARN" in out
    # Every probe went through the shim, once per host.
    assert sorted((tmp_path / "ssh.log").read_text().split()) == ["mini-a", "mini-b", "mini-c", "mini-d"]


def test_unreachable_host_fails_ssh_and_its_links_are_skipped(tmp_path, shim, capsys):
    hosts = [{"ssh": n, "ips": ["127.0.0.1"], "cwd": str(tmp_path), "python": sys.executable}
             for n in ("mini-a", "down-b")]
    code, rows, out = check(capsys, write_hostfile(tmp_path, hosts), shim)
    assert code == 1
    status, detail, fix = rows["down-b"]["ssh"]
    assert status == "FAIL" and "cannot ssh to down-b in BatchMode: ssh: connect to host down-b" in detail
    assert "ssh-copy-id down-b" in fix
    assert {s for s, _, _ in rows["mini-a"].values()} >= {"PASS"}
    assert rows["mini-a"]["ring link"][0] == "SKIP"  # rank 0 listens for down-b, which never answered


def test_a_port_in_use_fails_the_ring_link(tmp_path, shim, capsys):
    import socket

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        hosts = [{"ssh": n, "ips": ["127.0.0.1"], "cwd": str(tmp_path), "python": sys.executable}
                 for n in ("mini-a", "mini-b")]
        code, rows, out = check(capsys, write_hostfile(tmp_path, hosts), shim, "--starting-port", str(port))
    finally:
        busy.close()
    assert code == 1
    status, detail, fix = rows["mini-a"]["ring link"]
    assert status == "FAIL" and f"port {port} is in use on mini-a" in detail
    assert f"lsof -i :{port}" in fix


IFCONFIG_BRIDGE_UP = """bridge0: flags=8863<UP,BROADCAST,SMART,RUNNING,SIMPLEX,MULTICAST> mtu 1500
\toptions=63<RXCSUM,TXCSUM,TSO4,TSO6>
\tether 36:9a:12:0c:8e:40
\tConfiguration:
\tmember: en2 flags=3<LEARNING,DISCOVER>
\tmember: en3 flags=3<LEARNING,DISCOVER>
\tstatus: active
"""
HARDWARE_PORTS = """Hardware Port: Ethernet
Device: en0
Ethernet Address: 1c:1d:d3:00:00:01

Hardware Port: Thunderbolt 1
Device: en2
Ethernet Address: 36:9a:12:0c:8e:40

Hardware Port: Thunderbolt 2
Device: en3
Ethernet Address: 36:9a:12:0c:8e:44
"""


class _P:  # the parts of a doctor Probe the judges read
    def __init__(self, label, result, rdma_row=()):
        self.label, self.result = label, result
        self.ranks = [type("R", (), {"host": type("H", (), {"rdma": list(rdma_row)})()})()]


def test_bridge0_holding_thunderbolt_ports_warns_on_macos():
    assert parse_bridge0(IFCONFIG_BRIDGE_UP, HARDWARE_PORTS) == (True, ["en2", "en3"])
    assert parse_bridge0(IFCONFIG_BRIDGE_UP.replace("<UP,", "<"), HARDWARE_PORTS) == (False, ["en2", "en3"])
    [c] = bridges([_P("mini1", {"bridge0": {"ifconfig": IFCONFIG_BRIDGE_UP, "ports": HARDWARE_PORTS}})])
    assert (c.status, c.fix.split(" (")[0]) == ("WARN", "sudo ifconfig bridge0 down")
    assert bridges([_P("linux", {"bridge0": None})]) == []  # not macOS: no check at all


def test_rdma_devices_for_jaccl():
    row = [None, "rdma_en3", ["rdma_en4", "rdma_en5"]]
    checks = rdma([_P("a", {"rdma": ["rdma_en3", "rdma_en4", "rdma_en5"]}, row), _P("b", {"rdma": None}, row),
                   _P("c", {"rdma": []}, row), _P("d", {"rdma": ["rdma_en3"]}, row)])
    assert [c.status for c in checks] == ["PASS", "FAIL", "FAIL", "FAIL"]
    assert "rdma_ctl enable" in checks[1].fix and "no rdma_*" in checks[2].detail
    assert checks[3].detail == "hostfile names rdma_en4, rdma_en5 but ibv_devices lists rdma_en3"


def test_report_format_puts_the_fix_under_its_failure():
    text = Report([Check("m1", "ssh", "PASS", "ok"), Check("m2", "model", "FAIL", "missing x", "copy x")],
                  "doctor: 2 host(s)").format()
    assert text.splitlines() == ["doctor: 2 host(s)", "PASS  m1  ssh    ok", "FAIL  m2  model  missing x",
                                 "          fix:   copy x",
                                 "doctor: 1 FAIL, 0 WARN - fix the FAILs above and run `mlx-kvshard launch --check` again"]


def test_plan_and_the_doctor_agree_on_the_same_cluster(tmp_path, shim, capsys):
    """One memory rule: `plan --hostfile` and the doctor judge the same two hosts alike, at
    the largest context that fits and one token past it, with --vocab-parallel honoured."""
    big_vocab = {**CONFIG, "vocab_size": 65536, "tie_word_embeddings": False}  # lm_head 64 MiB in fp32: vocab-parallel matters
    dirs = {n: host_dir(tmp_path, n) for n in ("mini-a", "mini-b")}
    for d in dirs.values():
        (d / "models" / "m" / "config.json").write_text(json.dumps(big_vocab))
    hosts = [{"ssh": n, "ips": ["127.0.0.1"], "cwd": str(d), "python": sys.executable, "memory_gb": 1.75}
             for n, d in dirs.items()]
    hostfile = write_hostfile(tmp_path, hosts)
    model = dirs["mini-a"] / "models" / "m"

    def plan(context: int, *flags: str) -> dict:
        assert main(["plan", "--model", str(model), "--hostfile", str(hostfile), "--context", str(context),
                     "--json", *flags]) == 0
        return json.loads(capsys.readouterr().out)

    def doctor_fits(context: int, *flags: str) -> bool:
        code, rows, out = check(capsys, hostfile, shim, "--", "generate", "--model", "models/m",
                                "--max-context", str(context), *flags)
        statuses = {rows[h]["memory"][0] for h in dirs}
        assert len(statuses) == 1 and code == (0 if statuses == {"PASS"} else 1), out
        return statuses == {"PASS"}

    largest = plan(1, "--vocab-parallel")["max_context"]["tokens"]
    replicated = plan(1)["max_context"]["tokens"]
    assert 0 < replicated < largest  # splitting lm_head leaves room for more context
    for context in (largest, largest + 1):
        fits = plan(context, "--vocab-parallel")["fits"]
        assert fits == (context == largest)
        assert doctor_fits(context, "--vocab-parallel") == fits
    assert plan(largest)["fits"] is False and doctor_fits(largest) is False


IFCONFIG_MAC = """lo0: flags=8049<UP,LOOPBACK,RUNNING,MULTICAST> mtu 16384
\tinet 127.0.0.1 netmask 0xff000000
en0: flags=8863<UP,BROADCAST,SMART,RUNNING,SIMPLEX,MULTICAST> mtu 1500
\tinet6 fe80::1c:aa%en0 prefixlen 64 secured scopeid 0xe
\tinet 192.168.1.20 netmask 0xffffff00 broadcast 192.168.1.255
en2: flags=8863<UP,BROADCAST,SMART,RUNNING,SIMPLEX,MULTICAST> mtu 1500
\tinet 10.0.1.1 netmask 0xffffff00 broadcast 10.0.1.255
"""
ROUTE_DEFAULT_MAC = """   route to: default
destination: default
       mask: default
    gateway: 192.168.1.1
  interface: en0
"""


def test_a_ring_address_on_the_default_route_interface_warns():
    from mlx_kvshard.launch.judge import exposure
    from mlx_kvshard.launch.probe import parse_interfaces_linux, parse_interfaces_macos

    mac = parse_interfaces_macos(IFCONFIG_MAC, ROUTE_DEFAULT_MAC)
    assert mac == {"addresses": {"127.0.0.1": "lo0", "fe80::1c:aa": "en0", "192.168.1.20": "en0", "10.0.1.1": "en2"},
                   "default": ["en0"]}
    linux = parse_interfaces_linux("1: lo    inet 127.0.0.1/8 scope host lo\n2: eth0    inet 192.0.2.2/24 brd x\n",
                                   "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\n"
                                   "eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\n")
    assert linux == {"addresses": {"127.0.0.1": "lo", "192.0.2.2": "eth0"}, "default": ["eth0"]}

    class Spec:  # rank 0 listens on its Thunderbolt address, rank 1 on its Wi-Fi/Ethernet one
        def listen_targets(self):
            return {0: [["10.0.1.1", 5000]], 1: [["192.168.1.20", 5000]]}

    def probe(label, rank):
        p = _P(label, {"interfaces": mac})
        p.ranks[0].rank = rank
        return p

    ok, exposed = exposure(Spec(), [probe("mini1", 0), probe("mini2", 1)])
    assert (ok.status, ok.name) == ("PASS", "network")
    assert exposed.status == "WARN" and "192.168.1.20 on en0, which also carries the default route" in exposed.detail
    assert "private network" in exposed.fix
    assert exposure(Spec(), [_P("linux", {"interfaces": None})]) == []  # the host could not tell: no check


def test_what_setup_mac_sets_is_checked_sleep_and_the_wired_limit():
    from mlx_kvshard.launch.judge import sleep
    from mlx_kvshard.launch.probe import parse_pmset_sleep

    assert parse_pmset_sleep("System-wide power settings:\n sleep                10 (sleep prevented by x)\n"
                             " displaysleep         10\n") == 10
    assert parse_pmset_sleep(" displaysleep 10\n") is None
    warn, ok = sleep([_P("mini1", {"mac": {"sleep": 10}}), _P("mini2", {"mac": {"sleep": 0}})])
    assert warn.status == "WARN" and "sudo pmset -a sleep 0" in warn.fix and ok.status == "PASS"
    assert sleep([_P("linux", {"mac": None})]) == []


def test_the_memory_check_uses_a_raised_gpu_wired_limit(tmp_path):
    """A 16 GB Mac wires ~2/3 by default; with iogpu.wired_limit_mb raised the doctor uses the raised limit."""
    from mlx_kvshard.config import ModelConfig
    from mlx_kvshard.launch.fit import ModelRequest
    from mlx_kvshard.launch.judge import memory
    from mlx_kvshard.launch.simulate import localhost_cluster
    from mlx_kvshard.launch.spec import build_spec
    from mlx_kvshard.launch.topology import wire

    spec = build_spec(wire(localhost_cluster(1)), "ring", ["generate"])
    cfg = ModelConfig.from_dict(CONFIG, source="test")
    probe = _P("mac", {"memory_bytes": 16 << 30, "mac": {"wired_limit_mb": 14 << 10, "sleep": 0}})
    probe.ranks = spec.ranks
    context = 2_700_000  # 4 KiB of KV per token: ~11.3 GiB in all, over the default 2/3 of 16 GiB
    [c] = memory(spec, [probe], cfg, ModelRequest("m", None, None, None), context)
    assert c.status == "PASS" and "of 14.00 GiB usable (iogpu.wired_limit_mb 14336 of 16.00 GiB RAM)" in c.detail, c
    probe.result["mac"]["wired_limit_mb"] = 0  # macOS's default
    [c] = memory(spec, [probe], cfg, ModelRequest("m", None, None, None), context)
    assert c.status == "FAIL" and "iogpu" not in c.detail and "(67% of 16.00 GiB RAM)" in c.detail, c
