"""The exact command each rank runs: MLX's own launch script (env, MLX_RANK, the
MLX_HOSTFILE temp file, cwd, pidfile, exec) wrapped in ssh for remote hosts.

Ring addresses and jaccl variables are laid out as `mlx.launch` lays them out, so the
MLX hostfile we print can be handed to `mlx.launch --hostfile` and wire the same ring.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shlex
import socket
import sys
from dataclasses import dataclass, field
from typing import Sequence

from mlx._distributed_utils.common import Host, Hostfile
from mlx._distributed_utils.launch import RemoteProcess

from ..liveness.client import ENV_TOKEN

from . import secrets
from .hostfile import HostSpec
from .topology import Wiring

DEFAULT_SSH = ("ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10")
DEFAULT_PORT = 32323  # mlx.launch's default, so hand-made firewall rules still apply
_PIDFILE = re.compile(r"^[A-Za-z0-9_./-]+$")


@dataclass
class RankLaunch:
    rank: int
    host: HostSpec
    python: str
    cwd: str | None
    env: list[str]  # KEY=VALUE exported by the launch script, in order
    files: dict[str, str]  # env var -> contents of the temp file it points to
    argv: list[str]  # what the rank runs on its host
    script: str  # MLX's launch script
    launch_argv: list[str]  # what the launcher executes here: bash, or ssh to the host
    tty: bool
    secrets: dict[str, str] = field(default_factory=dict)  # written to its stdin, never on a command line

    @property
    def name(self) -> str:
        return f"rank {self.rank} {self.host.label}"


@dataclass
class LaunchSpec:
    backend: str
    ranks: list[RankLaunch]
    mlx_hostfile: dict
    addresses: list[list[str]] | None  # ring: the MLX_HOSTFILE contents, by rank
    ssh_command: list[str]
    notes: list[str] = field(default_factory=list)

    @property
    def world(self) -> int:
        return len(self.ranks)

    def listen_targets(self) -> dict[int, list[list]]:
        """Rank -> [[ip, port], ...] it listens on that peers must reach: under the ring
        every rank's own addresses (its left neighbour connects), under jaccl the coordinator."""
        if self.world < 2:
            return {}
        if self.backend == "ring":
            return {r: [_split(a) for a in addrs] for r, addrs in enumerate(self.addresses or [])}
        coord = next(e.split("=", 1)[1] for e in self.ranks[0].env if e.startswith("MLX_JACCL_COORDINATOR="))
        return {0: [_split(coord)]}

    def kill_argv(self, rank: RankLaunch, pidfile: str) -> list[str] | None:
        """ssh command that kills a remote rank by the pid its launch script recorded."""
        if rank.host.is_local or not _PIDFILE.match(pidfile):
            return None  # the path came back over the wire: never put an odd one in a shell
        return [*self.ssh_command, rank.host.ssh, RemoteProcess.make_kill_script(pidfile)]

    def to_dict(self) -> dict:
        """Everything about the launch, the liveness token masked (it lands in launch.json)."""
        return _redacted({
            "backend": self.backend,
            "world": self.world,
            "notes": self.notes,
            "mlx_hostfile": self.mlx_hostfile,
            "addresses": self.addresses,
            "ranks": [
                {"rank": r.rank, "label": r.host.label, "ssh": r.host.ssh, "local": r.host.is_local,
                 "python": r.python, "cwd": r.cwd, "env": r.env, "files": r.files, "command": r.argv,
                 "exec": r.launch_argv, "secrets on stdin": sorted(r.secrets)}
                for r in self.ranks
            ],
        })


def _redacted(d: dict) -> dict:
    text = re.sub(rf"({ENV_TOKEN}=)[^\s;'\"\\]+", r"\1<redacted>", json.dumps(d))
    return json.loads(text)


def build_spec(
    wiring: Wiring,
    backend: str,
    rank_args: Sequence[str],
    *,
    envs: Sequence[str] = (),
    ssh_command: Sequence[str] = DEFAULT_SSH,
    python: str | None = None,
    cwd: str | None = None,
    starting_port: int | None = None,
    connections_per_ip: int = 1,
    command: Sequence[str] | None = None,
    module: str = "mlx_kvshard",
) -> LaunchSpec:
    """`command`, when given, replaces `<python> -m <module> <rank_args>` verbatim."""
    hosts = wiring.hosts
    world = len(hosts)
    envs, hidden = secrets.split(list(envs))
    env = list(envs)
    if hidden:
        secrets.line(hidden)  # too long for a pty's line: refused now
        env.append(f"{secrets.ENV_SECRETS}=stdin")
    files: dict[str, str] = {}
    addresses = None
    if world > 1 and backend == "ring":
        addresses = ring_addresses(hosts, starting_port, connections_per_ip)
        files["MLX_HOSTFILE"] = json.dumps(addresses)
    elif world > 1:
        coordinator = hosts[0].ips[0]
        port = starting_port or (_free_ports(1)[0] if _is_loopback(coordinator) else DEFAULT_PORT)
        env.append(f"MLX_JACCL_COORDINATOR={coordinator}:{port}")
        if backend == "jaccl-ring":
            env.append("MLX_JACCL_RING=1")
        files["MLX_IBV_DEVICES"] = json.dumps([h.rdma for h in hosts])

    ranks = []
    for rank, h in enumerate(hosts):
        py = python or h.python or (sys.executable if h.is_local else "python3")
        argv = list(command) if command is not None else [py, "-m", module, *rank_args]
        if world == 1:
            # MLX's ring with a single node connects to itself and fails; one rank runs alone.
            argv = ["env", "-u", "MLX_RANK", *argv]
        tty = not h.is_local and os.path.basename(ssh_command[0]) == "ssh"
        rank_cwd = cwd or h.cwd
        # is_local only switches off `stty -echo`, which needs the pty real ssh gives us.
        script = RemoteProcess.make_launch_script(rank, None, rank_cwd, files, env, argv, not tty)
        if h.is_local:
            launch_argv = ["/bin/bash", "-c", script]
        else:
            # -tt: a remote rank gets a pty, so it is hung up on when the connection drops.
            tty_opts = ["-tt", "-o", "LogLevel=ERROR"] if tty else []
            launch_argv = [*ssh_command, *tty_opts, h.ssh, script]
        ranks.append(RankLaunch(rank, h, py, rank_cwd, [*env, f"MLX_RANK={rank}"], dict(files), argv,
                                script, launch_argv, tty, dict(hidden)))
    return LaunchSpec(backend, ranks, mlx_hostfile(hosts, backend, envs), addresses, list(ssh_command),
                      list(wiring.notes))


def ssh_command(text: str | None) -> list[str]:
    """The user's ssh command, with BatchMode and a connect timeout unless they chose
    otherwise: a password prompt or a dead host must fail, not hang the launch."""
    if not text:
        return list(DEFAULT_SSH)
    argv = shlex.split(text)
    if os.path.basename(argv[0]) == "ssh":
        for option, default in (("BatchMode", "yes"), ("ConnectTimeout", "10")):
            if not any(a.startswith(option) or a.startswith(f"-o{option}") for a in argv):
                argv += ["-o", f"{option}={default}"]
    return argv


def mlx_hostfile(hosts: list[HostSpec], backend: str, envs: Sequence[str]) -> dict:
    """The hostfile in MLX's own format (our extra fields dropped), ranks in wired order."""
    return Hostfile([Host(r, h.ssh, list(h.ips), list(h.rdma)) for r, h in enumerate(hosts)],
                    backend, list(envs)).to_json()


def ring_addresses(hosts: list[HostSpec], starting_port: int | None, connections_per_ip: int = 1) -> list[list[str]]:
    """ip:port per rank as mlx.launch's launch_ring numbers them (one port per rank, IP
    and connection, counting up). On loopback, where tests and simulations run side
    by side, every address gets a free port instead."""
    n_addr = sum(len(h.ips) for h in hosts) * connections_per_ip
    loopback = all(_is_loopback(ip) for h in hosts for ip in h.ips)
    ports = iter(_free_ports(n_addr) if loopback and starting_port is None
                 else range(starting_port or DEFAULT_PORT, (starting_port or DEFAULT_PORT) + n_addr))
    return [[f"{ip}:{next(ports)}" for ip in h.ips for _ in range(connections_per_ip)] for h in hosts]


def format_dry_run(spec: LaunchSpec) -> str:
    out = [f"backend {spec.backend}, {spec.world} rank(s)"]
    out += [f"note: {n}" for n in spec.notes]
    out += ["", "MLX hostfile (ranks in wired order; `mlx.launch --hostfile` accepts it):",
            json.dumps(spec.mlx_hostfile, indent=2)]
    for r in spec.ranks:
        where = "this machine" if r.host.is_local else f"ssh {r.host.ssh}"
        out += ["", f"rank {r.rank} on {r.host.label} ({where})",
                f"  cwd:     {r.cwd or '(the launcher cwd if it exists there)'}",
                f"  env:     {' '.join(r.env)}"]
        out += [f"  file:    {k} = {v}" for k, v in r.files.items()]
        out += [f"  command: {shlex.join(r.argv)}", f"  exact:   {shlex.join(r.launch_argv)}"]
    return "\n".join(out)


def _split(address: str) -> list:
    ip, port = address.rsplit(":", 1)
    return [ip, int(port)]


def _is_loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False


def _free_ports(n: int) -> list[int]:
    # Hold every socket until all are chosen, so the n ports differ from each other.
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()
