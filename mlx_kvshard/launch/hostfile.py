"""Read an MLX hostfile (plus our optional fields) and report every problem at once.

MLX's format is `{"backend", "envs", "hosts": [{"ssh", "ips", "rdma"}]}` or a bare
host list. We add, per host, `label`, `memory_gb`, `python`, `cwd`, and at the top a
`cables` list naming which hosts are cabled together (see topology.py).
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..paths import CONFIGS_DIR
from ..hardware.profiles import available

BACKENDS = ("ring", "jaccl", "jaccl-ring")
HOST_FIELDS = ("ssh", "ips", "rdma", "label", "memory_gb", "chip", "python", "cwd")
TOP_FIELDS = ("backend", "envs", "hosts", "cables")
# Hosts the launcher runs without ssh, as mlx.launch does for 127.0.0.1.
LOCAL_NAMES = ("127.0.0.1", "localhost", "::1")

# What an ssh destination may contain: user@host, dotted names, IPv6 literals.
# Anything else could be read by a shell, and a leading '-' by ssh as an option.
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.@%:\[\]-]*$")
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class HostfileError(UserError):
    """All the problems found in one hostfile, one line each."""

    def __init__(self, source: str, problems: list[str]):
        self.problems = problems
        head = f"hostfile {source}: " + (
            problems[0] if len(problems) == 1 else f"{len(problems)} problems:"
        )
        body = "" if len(problems) == 1 else "".join(f"\n  - {p}" for p in problems)
        super().__init__(head + body)


@dataclass
class HostSpec:
    index: int  # position in the hostfile (ranks may be reordered along the cables)
    ssh: str
    ips: list[str]
    rdma: list[Any]  # row of the RDMA matrix: per peer None, "rdma_enX" or a list of them
    label: str
    memory_gb: float | None = None
    python: str | None = None
    cwd: str | None = None
    chip: str | None = None  # a chip profile name (configs/chips), for the planner

    @property
    def is_local(self) -> bool:
        return self.ssh in LOCAL_NAMES


@dataclass(frozen=True)
class Cable:
    a: int  # host indexes
    b: int
    a_ip: str | None = None  # the IP each end has on this cable, when declared
    b_ip: str | None = None

    def ip_of(self, host: int) -> str | None:
        return self.a_ip if host == self.a else self.b_ip


@dataclass
class ClusterFile:
    hosts: list[HostSpec]
    backend: str = "ring"
    envs: list[str] = field(default_factory=list)
    cables: list[Cable] = field(default_factory=list)
    source: str = "<hostfile>"

    @property
    def world(self) -> int:
        return len(self.hosts)

    def host_named(self, name: str) -> HostSpec | None:
        for h in self.hosts:
            if name in (h.label, h.ssh):
                return h
        return None


def find_hostfile(name: str | Path, instead: str = "--simulate N") -> Path:
    """A hostfile by path, else one of the examples shipped in the package by name
    (`2-minis-thunderbolt-ring`, with or without .json)."""
    p = Path(name).expanduser()
    if p.is_file():
        return p
    if os.sep not in str(name):
        shipped = CONFIGS_DIR / "hostfiles" / (p.name if p.suffix == ".json" else f"{p.name}.json")
        if shipped.is_file():
            return shipped
    examples = ", ".join(available("hostfiles")) or "none shipped"
    raise UserError(f"hostfile {p}: no such file; write one, name a shipped example ({examples}), "
                    f"or use {instead}")


def load_hostfile(path: str | Path, backend: str | None = None, planning: bool = False) -> ClusterFile:
    """`planning`: a hostfile for `plan`, written before the cabling, may lack the ring's
    IPs and the RDMA matrix; everything else is checked as for a launch."""
    p = find_hostfile(path, "--world N" if planning else "--simulate N")
    try:
        data = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HostfileError(str(p), [f"not valid JSON ({e})"]) from None
    return parse_hostfile(data, str(p), backend=backend, planning=planning)


def parse_hostfile(data: Any, source: str = "<hostfile>", backend: str | None = None,
                   planning: bool = False) -> ClusterFile:
    """`backend`, when given, overrides the file's (the CLI's --backend); `planning`: see
    load_hostfile."""
    problems: list[str] = []
    if isinstance(data, list):
        data = {"hosts": data}
    if not isinstance(data, dict):
        raise HostfileError(source, ["expected a JSON object with \"hosts\", or a list of hosts"])
    problems += _unknown_fields(data, TOP_FIELDS, "top level")
    raw_hosts = data.get("hosts")
    if not isinstance(raw_hosts, list) or not raw_hosts:
        raise HostfileError(source, problems + ["\"hosts\" must be a non-empty list of {\"ssh\": ...} objects"])

    hosts = [_parse_host(i, h, problems) for i, h in enumerate(raw_hosts)]
    hosts = [h for h in hosts if h is not None]
    backend = backend or data.get("backend") or "ring"
    if backend not in BACKENDS:
        problems.append(f"backend {backend!r} is not supported; use one of {', '.join(BACKENDS)}")
    envs = _parse_envs(data.get("envs", []), problems)
    if len(hosts) == len(raw_hosts):  # indexes below are only meaningful with every host parsed
        _check_duplicates(hosts, problems)
        cables = parse_cables(data.get("cables", []), hosts, problems)
        # A plan comes before the cabling: IPs and RDMA devices are checked at launch.
        if backend == "ring" and not planning:
            _check_ring_ips(hosts, cables, problems)
        elif backend in ("jaccl", "jaccl-ring") and not planning:
            _check_rdma(hosts, backend, problems)
    else:
        cables = []
    if problems:
        raise HostfileError(source, problems)
    return ClusterFile(hosts, backend, envs, cables, source)


def _unknown_fields(obj: dict, known: tuple[str, ...], where: str) -> list[str]:
    out = []
    for k in obj:
        if k not in known:
            close = difflib.get_close_matches(k, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f"; known fields: {', '.join(known)}"
            out.append(f"{where}: unknown field {k!r}{hint}")
    return out


def _parse_host(i: int, h: Any, problems: list[str]) -> HostSpec | None:
    where = f"hosts[{i}]"
    if not isinstance(h, dict):
        problems.append(f"{where}: expected an object like {{\"ssh\": \"mini1.local\", \"ips\": [...]}}, got {h!r}")
        return None
    problems += _unknown_fields(h, HOST_FIELDS, where)
    ssh = h.get("ssh")
    if not isinstance(ssh, str) or not ssh:
        problems.append(f"{where}: missing \"ssh\" (the name to ssh into, e.g. \"mini1.local\")")
        return None
    if not _SAFE_NAME.match(ssh):
        bad = "".join(sorted({c for c in ssh if not re.match(r"[A-Za-z0-9_.@%:\[\]-]", c)})) or ssh[0]
        problems.append(f"{where}: ssh name {ssh!r} contains {bad!r}; use a plain host name or user@host "
                        f"(shell metacharacters, spaces and a leading '-' are refused)")
    label = h.get("label", ssh)
    if not isinstance(label, str) or not _SAFE_NAME.match(label):
        problems.append(f"{where}: label {label!r} must be a plain name (letters, digits, . _ -)")
        label = ssh
    ips = h.get("ips", [])
    if not isinstance(ips, list) or not all(isinstance(x, str) for x in ips):
        problems.append(f"{where}: \"ips\" must be a list of IP address strings, got {ips!r}")
        ips = []
    for j, ip in enumerate(ips):
        if not _is_ip(ip):
            problems.append(f"{where}.ips[{j}]: {ip!r} is not an IP address (the ring backend needs "
                            f"numeric IPs, e.g. 192.168.0.1)")
    rdma = h.get("rdma", [])
    if not isinstance(rdma, list):
        problems.append(f"{where}: \"rdma\" must be a list with one entry per host, got {rdma!r}")
        rdma = []
    mem = h.get("memory_gb")
    if mem is not None and (isinstance(mem, bool) or not isinstance(mem, (int, float)) or mem <= 0):
        problems.append(f"{where}: memory_gb must be a positive number of GB, got {mem!r}")
        mem = None
    chip = h.get("chip")
    if chip is not None and (not isinstance(chip, str) or not chip):
        problems.append(f"{where}: chip must be a chip profile name like \"m4pro\", got {chip!r}")
        chip = None
    python, cwd = h.get("python"), h.get("cwd")
    for name, v in (("python", python), ("cwd", cwd)):
        if v is not None and (not isinstance(v, str) or not v or "\n" in v):
            problems.append(f"{where}: {name} must be a non-empty path, got {v!r}")
        elif isinstance(v, str) and v.startswith("~"):
            # MLX's launch script quotes paths, so the remote shell never expands ~.
            problems.append(f"{where}: {name} {v!r}: write the absolute path (e.g. /Users/me/...); ~ is not "
                            f"expanded on the host")
    return HostSpec(i, ssh, list(ips), list(rdma), label, mem, python, cwd, chip)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def _is_loopback(ip: str) -> bool:
    return _is_ip(ip) and ipaddress.ip_address(ip).is_loopback


def _parse_envs(envs: Any, problems: list[str]) -> list[str]:
    if not isinstance(envs, list) or not all(isinstance(e, str) for e in envs):
        problems.append(f"\"envs\" must be a list of \"KEY=VALUE\" strings, got {envs!r}")
        return []
    for e in envs:
        key = e.split("=", 1)[0]
        if "=" not in e or not _ENV_KEY.match(key):
            problems.append(f"envs: {e!r} is not KEY=VALUE with KEY made of letters, digits and _")
    return list(envs)


def _check_duplicates(hosts: list[HostSpec], problems: list[str]) -> None:
    seen_ssh: dict[str, int] = {}
    seen_label: dict[str, int] = {}
    seen_ip: dict[str, int] = {}
    for h in hosts:
        # Several ranks on this machine are how simulation works; on a real host
        # a repeat is a typo that would load the model twice into one Mac.
        if not h.is_local:
            if h.ssh in seen_ssh:
                problems.append(f"hosts[{h.index}]: duplicate host {h.ssh!r} (also hosts[{seen_ssh[h.ssh]}]); "
                                f"list each Mac once")
            seen_ssh.setdefault(h.ssh, h.index)
            if h.label in seen_label and h.label != h.ssh:
                problems.append(f"hosts[{h.index}]: duplicate label {h.label!r} (also hosts[{seen_label[h.label]}])")
            seen_label.setdefault(h.label, h.index)
        for ip in h.ips:
            if _is_loopback(ip):
                continue
            if ip in seen_ip and seen_ip[ip] != h.index:
                problems.append(f"hosts[{h.index}]: duplicate IP {ip} (also on hosts[{seen_ip[ip]}]); "
                                f"each Mac needs its own address")
            seen_ip.setdefault(ip, h.index)


def parse_cables(raw: Any, hosts: list[HostSpec], problems: list[str]) -> list[Cable]:
    if not isinstance(raw, list):
        problems.append("\"cables\" must be a list of [\"hostA\", \"hostB\"] pairs")
        return []
    by_name = {}
    for h in hosts:
        by_name.setdefault(h.ssh, h.index)
        by_name[h.label] = h.index
    cables = []
    for i, c in enumerate(raw):
        where = f"cables[{i}]"
        ips: list[Any] = [None, None]
        if isinstance(c, dict):
            problems += _unknown_fields(c, ("hosts", "ips"), where)
            ends, ips = c.get("hosts"), c.get("ips", [None, None])
        else:
            ends = c
        if not (isinstance(ends, list) and len(ends) == 2 and all(isinstance(e, str) for e in ends)):
            problems.append(f"{where}: expected two host names, e.g. [\"mini1\", \"mini2\"], got {c!r}")
            continue
        if not (isinstance(ips, list) and len(ips) == 2):
            problems.append(f"{where}: \"ips\" must give the IP of each end, e.g. [\"192.168.0.1\", \"192.168.0.2\"]")
            continue
        idx = []
        for e in ends:
            if e not in by_name:
                problems.append(f"{where}: {e!r} is not a host in this file (names: "
                                f"{', '.join(h.label for h in hosts)})")
            idx.append(by_name.get(e))
        for ip in ips:
            if ip is not None and not (isinstance(ip, str) and _is_ip(ip)):
                problems.append(f"{where}: {ip!r} is not an IP address")
        if None in idx:
            continue
        if idx[0] == idx[1]:
            problems.append(f"{where}: a cable from {ends[0]!r} to itself")
            continue
        cables.append(Cable(idx[0], idx[1], ips[0], ips[1]))
    return cables


def _check_ring_ips(hosts: list[HostSpec], cables: list[Cable], problems: list[str]) -> None:
    if len(hosts) < 2:
        return
    # A cable that names its IPs gives both ends an address (topology.py picks them).
    cabled = {c.a for c in cables if c.a_ip} | {c.b for c in cables if c.b_ip}
    no_ips = [h for h in hosts if not h.ips and h.index not in cabled]
    if no_ips:
        names = ", ".join(f"hosts[{h.index}] ({h.label})" for h in no_ips)
        problems.append(f"{names}: the ring backend needs \"ips\" on every host (the address its left "
                        f"neighbour connects to; mlx.distributed_config --backend ring writes them)")
    v6 = [f"{ip} (hosts[{h.index}])" for h in hosts for ip in h.ips if ":" in ip]
    if v6:
        problems.append(f"{', '.join(v6)}: MLX's ring reads ip:port up to the first ':', so it needs IPv4 addresses")
    counts = {len(h.ips) for h in hosts if h.ips}
    if len(counts) > 1:
        problems.append(f"hosts list different numbers of ips ({sorted(counts)}); MLX's ring needs as many "
                        f"connections on every host, so give each host the same number")


def _check_rdma(hosts: list[HostSpec], backend: str, problems: list[str]) -> None:
    n = len(hosts)
    if not hosts[0].ips:
        problems.append(f"hosts[0] ({hosts[0].label}): {backend} needs an IP on rank 0 for the coordinator "
                        f"(one all hosts reach, e.g. its Ethernet/Wi-Fi address)")
    shape_ok = True
    for h in hosts:
        if len(h.rdma) != n:
            problems.append(f"hosts[{h.index}] ({h.label}): \"rdma\" has {len(h.rdma)} entries, need {n} "
                            f"(one per host, null for itself)")
            shape_ok = False
            continue
        if h.rdma[h.index] is not None:
            problems.append(f"hosts[{h.index}] ({h.label}): rdma[{h.index}] must be null (a host has no RDMA "
                            f"link to itself), got {h.rdma[h.index]!r}")
        for j, d in enumerate(h.rdma):
            if d is None:
                continue
            devs = d if isinstance(d, list) else [d]
            if not devs or not all(isinstance(x, str) and x.startswith("rdma_") for x in devs):
                problems.append(f"hosts[{h.index}] ({h.label}): rdma[{j}] = {d!r}; expected a device name "
                                f"like \"rdma_en3\" (see `ibv_devices`) or null")
    if not shape_ok or backend != "jaccl":
        return  # jaccl-ring only needs links to neighbours, checked once ranks are ordered
    missing = [(h, j) for h in hosts for j in range(n) if j != h.index and h.rdma[j] is None]
    for h, j in missing:
        problems.append(f"hosts[{h.index}] ({h.label}): no RDMA device to {hosts[j].label}; a jaccl mesh "
                        f"needs every pair cabled (or use backend jaccl-ring)")
