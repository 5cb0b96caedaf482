"""The doctor's cabling check: which medium each ring address runs on (Thunderbolt, Wi-Fi,
other), and whether a slow hop changes what the planner recommends, head sharding (TP) or
pipeline stages (`--pp N`, planner/parallelism.py). A ring all_sum crosses every hop, so
one Mac on Wi-Fi paces all of TP's 2·L all_sums per token, while a pipeline crosses each
hop once. Needs every host's chip and memory_gb in the hostfile; silent otherwise."""

from __future__ import annotations

from ..config import ModelConfig
from .checks import Check, Probe
from .fit import ModelRequest, context_for
from .spec import LaunchSpec


def hardware_ports(text: str) -> dict[str, str]:
    """macOS `networksetup -listallhardwareports`: device -> port name ("Wi-Fi", "Thunderbolt 1")."""
    ports, port = {}, None
    for line in text.splitlines():
        if line.startswith("Hardware Port:"):
            port = line.split(":", 1)[1].strip()
        elif line.startswith("Device:") and port:
            ports[line.split(":", 1)[1].strip()] = port
    return ports


def medium(result: dict, ip: str) -> str | None:
    """'thunderbolt', 'wifi' or 'other' for the interface holding `ip` on a probed host; None: unknown."""
    iface = ((result.get("interfaces") or {}).get("addresses") or {}).get(ip)
    ports = hardware_ports((result.get("bridge0") or {}).get("ports", ""))
    if iface is None or not ports:
        return None
    if iface == "bridge0" or "Thunderbolt" in ports.get(iface, ""):
        return "thunderbolt"
    return "wifi" if ports.get(iface) == "Wi-Fi" else "other"


def cabling(spec: LaunchSpec, probes: list[Probe], cfg: ModelConfig | None, request: ModelRequest,
            context: int | None) -> list[Check]:
    from ..hardware.profiles import load_chip, load_link
    from ..planner.capacity import Host, Options
    from ..planner.parallelism import compare

    if cfg is None or spec.backend != "ring" or spec.world < 2:
        return []
    hosts = [r.host for r in spec.ranks]
    if any(h.chip is None or h.memory_gb is None for h in hosts):
        return []
    probe_of = {r.rank: p for p in probes for r in p.ranks}
    wifi = []
    for rank, addrs in spec.listen_targets().items():
        p = probe_of.get(rank)
        if p is None or p.result is None:
            continue
        if any(medium(p.result, ip) == "wifi" for ip, _ in addrs):
            wifi.append(f"rank {rank} ({spec.ranks[rank].host.label})")
    chips = {name: load_chip(name) for name in {h.chip for h in hosts}}
    planned = [Host(h.label, h.memory_gb, chips[h.chip]) for h in hosts]
    cabled = load_link("tb5-ring" if all(c.thunderbolt >= 5 for c in chips.values()) else "tb4-ring")
    opts = Options(context=context_for(cfg, request, context), vocab_parallel=request.vocab_parallel)
    want = compare(cfg, planned, cabled, opts, request.shares, request.dtype)
    if want is None or want["recommend"] is None:
        return []
    name = {"tp": "head sharding", "pp": f"--pp {spec.world}"}
    if not wifi:
        return [Check("cluster", "parallelism", "PASS", f"on {cabled.name}: {name[want['recommend']]} "
                      f"({want['reason']})")]
    got = compare(cfg, planned, load_link("wifi"), opts, request.shares, request.dtype)
    m = got["recommend"]
    if m == want["recommend"]:
        return [Check("cluster", "parallelism", "WARN", f"{', '.join(wifi)} on Wi-Fi: {name[m]} stays the choice, "
                      f"at {got[m]['one_stream_tok_s']:.1f} tok/s one stream instead of "
                      f"{want[m]['one_stream_tok_s']:.1f} on {cabled.name}",
                      "cable every Mac with Thunderbolt (the ring's addresses on its Thunderbolt ports)")]
    return [Check("cluster", "parallelism", "WARN",
                  f"{', '.join(wifi)} on Wi-Fi changes the recommendation: {name[want['recommend']]} on "
                  f"{cabled.name}, but {name[m]} on this cabling ({got['reason']})",
                  f"cable every Mac with Thunderbolt, or run the rank command with "
                  f"{'--pp ' + str(spec.world) if m == 'pp' else 'no --pp'} while one is on Wi-Fi")]
