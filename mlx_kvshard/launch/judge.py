"""Turn probe results into PASS / WARN / FAIL checks, each failure with a one-line fix.

Hosts are compared with each other, not with this machine: the majority value is
the reference, so one odd Mac is named as the odd one.
"""

from __future__ import annotations

import json
from collections import Counter
from ..config import ModelConfig
from ..errors import UserError
from ..plan import human_bytes
from ..planner.capacity import GIB

from .fit import ModelRequest, context_for, rank_needs, usable
from .cabling import cabling
from .checks import Check, Probe, Report
from .probe import parse_bridge0
from .spec import LaunchSpec


COMPONENTS = ("python", "mlx", "mlx-lm", "mlx-kvshard")
MEMORY_FIX = ("lower --max-context, use a quantized or smaller model, add Macs, or give this host a "
              "smaller share with --weights (e.g. each rank's memory in GB)")


def judge(spec: LaunchSpec, probes: list[Probe], request: ModelRequest, context: int | None) -> Report:
    ok = [p for p in probes if p.result is not None]
    checks = []
    for p in probes:
        if p.failure:
            checks.append(p.failure)
        elif not p.first.host.is_local:
            checks.append(Check(p.label, "ssh", "PASS", f"{p.first.host.ssh} answered in BatchMode in {p.seconds:.1f}s"))
    checks += versions(ok)
    cfg, model_checks = model(ok, request.model)
    checks += model_checks
    checks += memory(spec, ok, cfg, request, context)
    checks += links(spec, probes)
    checks += bridges(ok)
    checks += exposure(spec, ok)
    checks += cabling(spec, ok, cfg, request, context)
    checks += sleep(ok)
    if spec.backend != "ring":
        checks += rdma(ok)
    header = (f"doctor: {len(probes)} host(s) for {spec.world} rank(s), backend {spec.backend}"
              + (f", model {request.model}" if request.model else ""))
    return Report(checks, header)


def _majority(values: list) -> object:
    present = [v for v in values if v is not None]
    return Counter(present).most_common(1)[0][0] if present else None


def versions(probes: list[Probe]) -> list[Check]:
    def key(component: str, v: str | None) -> str | None:
        # Ranks exchange raw bytes: Python patch releases don't matter, minor versions might.
        return ".".join(v.split(".")[:2]) if component == "python" and v else v

    ref, full = {}, {}
    for c in COMPONENTS:
        ref[c] = _majority([key(c, p.result["versions"].get(c)) for p in probes])
        full[c] = next((p.result["versions"][c] for p in probes if key(c, p.result["versions"].get(c)) == ref[c]), None)
    checks = []
    for p in probes:
        v, py = p.result["versions"], p.first.python
        bad, pins = [], []
        for c in COMPONENTS:
            mine = key(c, v.get(c))
            if mine is not None and mine == ref[c]:
                continue
            bad.append(f"{c} missing" if mine is None else f"{c} {v[c]} (others {full[c]})")
            if c != "python":
                pins.append(f"{c}=={full[c]}" if full[c] else c)
        if not bad:
            checks.append(Check(p.label, "versions", "PASS", ", ".join(f"{c} {v[c]}" for c in COMPONENTS)))
            continue
        fixes = []
        if pins:
            fixes.append(f"on {p.label}: {py} -m pip install {' '.join(pins)}")
        if "python" in [b.split()[0] for b in bad]:
            fixes.append(f"use Python {full['python']} on every host (set \"python\" for {p.label} in the hostfile)")
        checks.append(Check(p.label, "versions", "FAIL", f"{'; '.join(bad)} for {p.result['executable']}",
                            "; ".join(fixes)))
    return checks


def model(probes: list[Probe], name: str | None) -> tuple[ModelConfig | None, list[Check]]:
    if not name:
        return None, []
    found = [p for p in probes if "digest" in p.result.get("model", {})]
    ref_digest = _majority([p.result["model"]["digest"] for p in found])
    ref = next((p for p in found if p.result["model"]["digest"] == ref_digest), None)
    checks = []
    for p in probes:
        m = p.result.get("model", {})
        copy = _copy_fix(ref, p, m.get("path"))
        if "digest" not in m:
            fix = copy or f"download or copy {name} to the same path on every host (it is on none of them)"
            checks.append(Check(p.label, "model", "FAIL", f"{name}: {m.get('error', 'not found')}", fix))
        elif m["digest"] != ref_digest:
            checks.append(Check(p.label, "model", "FAIL", f"{m['path']} differs from {ref.label}'s: "
                                f"{_diff(ref.result['model'], m)}", copy))
        else:
            size = human_bytes(sum(s for _, s in m["files"]))
            checks.append(Check(p.label, "model", "PASS", f"{m['path']}: {len(m['files'])} files, {size}, "
                                f"manifest {m['digest']}"))
    cfg = None
    if ref is not None:
        try:
            cfg = ModelConfig.from_dict(json.loads(ref.result["model"]["config"]), source=f"{name}/config.json")
        except (UserError, json.JSONDecodeError) as e:
            checks.append(Check(ref.label, "model", "FAIL", str(e), "re-download the model"))
    return cfg, checks


def _copy_fix(ref: Probe | None, p: Probe, path: str | None) -> str | None:
    if ref is None or ref is p:
        return None
    src = ref.result["model"]["path"]
    return f"on {p.label}: rsync -a --delete {ref.first.host.ssh}:{src}/ {path or src}/"


def _diff(ref: dict, mine: dict) -> str:
    want, have = dict(ref["files"]), dict(mine["files"])
    parts = []
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    sizes = sorted(f for f in set(want) & set(have) if want[f] != have[f])
    if missing:
        parts.append("missing " + ", ".join(missing))
    if extra:
        parts.append("extra " + ", ".join(extra))
    if sizes:
        parts.append("different size " + ", ".join(f"{f} ({have[f]} vs {want[f]} bytes)" for f in sizes))
    if ref.get("config") != mine.get("config") and "config.json" not in sizes:
        parts.append("config.json differs")
    return "; ".join(parts) or "manifest differs"


def memory(spec: LaunchSpec, probes: list[Probe], cfg: ModelConfig | None, request: ModelRequest,
           context: int | None) -> list[Check]:
    if cfg is None:
        return []
    ctx = context_for(cfg, request, context)
    try:
        needs = rank_needs(cfg, spec.world, request, ctx)
    except UserError as e:
        return [Check("cluster", "plan", "FAIL", str(e), "see `mlx-kvshard plan --world N` for a size that splits")]
    measured = {r.host.ssh: p.result.get("memory_bytes") for p in probes for r in p.ranks}
    wired_mb = {r.host.ssh: (p.result.get("mac") or {}).get("wired_limit_mb") for p in probes for r in p.ranks}
    by_host: dict[str, list] = {}
    for r in spec.ranks:  # ranks on one machine share its memory
        by_host.setdefault(r.host.ssh, []).append(r)
    checks = []
    for ssh, ranks in by_host.items():
        label, declared = ranks[0].host.label, ranks[0].host.memory_gb
        mem = declared * GIB if declared else measured.get(ssh)
        if mem is None:
            checks.append(Check(label, "memory", "SKIP", "memory unknown (no probe answer)"))
            continue
        (limit, share), need = usable(mem), sum(needs[r.rank].total for r in ranks)
        source = f"memory_gb {declared:g}" if declared else f"{human_bytes(mem)} RAM"
        if wired_mb.get(ssh):  # raised (or lowered) with sysctl, e.g. by launch/setup-mac.sh: that is the limit
            limit, share = min(int(mem), wired_mb[ssh] << 20), f"iogpu.wired_limit_mb {wired_mb[ssh]}"
        per_rank = "; ".join(f"rank {r.rank} {needs[r.rank].describe()}" for r in ranks)
        status = "PASS" if need <= limit else "FAIL"
        checks.append(Check(label, "memory", status, f"needs {human_bytes(need)} of {human_bytes(limit)} usable "
                            f"({share} of {source}): {per_rank}", MEMORY_FIX))
    return checks


def links(spec: LaunchSpec, probes: list[Probe]) -> list[Check]:
    probe_of = {r.rank: p for p in probes for r in p.ranks}
    checks = []
    for target, addrs in spec.listen_targets().items():
        host = spec.ranks[target].host
        if spec.backend == "ring":
            sources, name = [(target - 1) % spec.world], "ring link"
        else:
            sources, name = list(range(1, spec.world)), "coordinator"
        involved = [probe_of[target]] + [probe_of[s] for s in sources]
        if any(p.result is None for p in involved):
            checks.append(Check(host.label, name, "SKIP", "a host on this link did not answer the probe"))
            continue
        problems, fixes = [], set()
        for ip, port in addrs:
            address = f"{ip}:{port}"
            why = probe_of[target].result["bind"].get(address)
            if why and "in use" in why:
                problems.append(f"port {port} is in use on {host.label}")
                fixes.add(f"stop what holds it (`lsof -i :{port}` on {host.label}; an earlier rank?) or pass --starting-port")
            elif why:
                problems.append(f"{ip} is not an address of {host.label} ({why})")
                fixes.add(f"set {host.label}'s ips to the IP `ifconfig` shows on its Thunderbolt port; if bridge0 "
                          f"holds it: `sudo ifconfig bridge0 down`")
            for s in sources:
                why = probe_of[s].result["reach"].get(address)
                if why:
                    problems.append(f"{spec.ranks[s].host.label} cannot reach {address} ({why})")
                    fixes.add(f"check the cable between {spec.ranks[s].host.label} and {host.label} and that "
                              f"both ends have IPs on it (`mlx.distributed_config --auto-setup` sets them)")
        peers = ", ".join(f"rank {s} ({spec.ranks[s].host.label})" for s in sources)
        where = ", ".join(f"{ip}:{port}" for ip, port in addrs)
        if problems:
            checks.append(Check(host.label, name, "FAIL", f"rank {target}: " + "; ".join(problems), "; ".join(sorted(fixes))))
        else:
            checks.append(Check(host.label, name, "PASS", f"{peers} -> rank {target} at {where}: address local, "
                                f"port free, reachable"))
    return checks


def bridges(probes: list[Probe]) -> list[Check]:
    checks = []
    for p in probes:
        b = p.result.get("bridge0")
        if b is None:
            continue  # not macOS
        up, thunderbolt = parse_bridge0(b["ifconfig"], b["ports"])
        if up and thunderbolt:
            checks.append(Check(p.label, "bridge0", "WARN", f"bridge0 is up and holds Thunderbolt {', '.join(thunderbolt)}: "
                                f"Thunderbolt IPs can end up on bridge0 instead of the port",
                                "sudo ifconfig bridge0 down (lasts until reboot; mlx.distributed_config --auto-setup does it)"))
        else:
            checks.append(Check(p.label, "bridge0", "PASS", "bridge0 holds no Thunderbolt port"))
    return checks


def sleep(probes: list[Probe]) -> list[Check]:
    """macOS: a Mac that sleeps when idle is a lost rank (and a dead server) overnight."""
    checks = []
    for p in probes:
        minutes = (p.result.get("mac") or {}).get("sleep")
        if minutes is None:
            continue  # not macOS, or pmset did not say
        if minutes:
            checks.append(Check(p.label, "sleep", "WARN", f"the Mac sleeps after {minutes} min idle: its rank is "
                                f"lost then", "sudo pmset -a sleep 0 (launch/setup-mac.sh offers it)"))
        else:
            checks.append(Check(p.label, "sleep", "PASS", "system sleep is off"))
    return checks


EXPOSED_FIX = ("keep the ring on a private network: give each Thunderbolt port its own subnet with no router "
               "(the ring's addresses in the hostfile), or block the ring ports from other machines in the firewall; "
               "see launch/README.md")


def exposure(spec: LaunchSpec, probes: list[Probe]) -> list[Check]:
    """MLX's ring and jaccl ports, and our liveness coordinator's, accept whoever connects
    (the coordinator checks a token; MLX checks nothing): WARN when a host's ring address is
    on an interface that also carries its default route, i.e. reaches other networks."""
    checks = []
    for p in probes:
        found = p.result.get("interfaces")
        if found is None:
            continue  # this host's tools did not tell
        ips = sorted({ip for r in p.ranks for ip, _ in spec.listen_targets().get(r.rank, [])})
        if not ips:
            continue
        default = set(found.get("default", []))
        exposed = [f"{ip} on {found['addresses'][ip]}" for ip in ips
                   if found.get("addresses", {}).get(ip) in default]
        if exposed:
            checks.append(Check(p.label, "network", "WARN",
                                f"ring address {', '.join(exposed)}, which also carries the default route "
                                f"(reaches other networks): MLX's ring ports take no password", EXPOSED_FIX))
        else:
            checks.append(Check(p.label, "network", "PASS",
                                f"ring address {', '.join(ips)} on no default-route interface"))
    return checks


def rdma(probes: list[Probe]) -> list[Check]:
    fix = ("enable RDMA over Thunderbolt 5: boot into macOS Recovery, run `rdma_ctl enable` in Terminal, reboot "
           "(macOS 26.2 or later)")
    checks = []
    for p in probes:
        found = p.result.get("rdma")
        wanted = sorted({d for r in p.ranks for e in r.host.rdma if e
                         for d in (e if isinstance(e, list) else [e])})
        missing = [d for d in wanted if d not in (found or [])]
        if found is None:
            checks.append(Check(p.label, "rdma", "FAIL", "ibv_devices not found: no RDMA support here", fix))
        elif not found:
            checks.append(Check(p.label, "rdma", "FAIL", "ibv_devices lists no rdma_* device", fix))
        elif missing:
            checks.append(Check(p.label, "rdma", "FAIL", f"hostfile names {', '.join(missing)} but ibv_devices lists "
                                f"{', '.join(found)}", "fix the \"rdma\" row for this host (or rerun mlx.distributed_config)"))
        else:
            checks.append(Check(p.label, "rdma", "PASS", f"ibv_devices lists {', '.join(found)}"))
    return checks
