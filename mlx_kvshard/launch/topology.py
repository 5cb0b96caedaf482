"""Order ranks so that ring neighbours are hosts that are really cabled together.

MLX's ring has rank r accept on its own `ips` (from rank r-1) and connect to rank
r+1's, so on point-to-point Thunderbolt links rank r's IP must be the one on the
cable to rank r-1. Cables come from the hostfile's `cables`, from a `--topology`
file (our JSON, or the `mlx.distributed_config --dot` graph), or for jaccl-ring
from the RDMA matrix itself.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError

from .hostfile import Cable, ClusterFile, HostfileError, HostSpec, parse_cables

_SEARCH_BUDGET = 200_000  # DFS steps; desks of Macs are small, this bounds a pathological input


@dataclass
class Wiring:
    hosts: list[HostSpec]  # rank order; ips (ring) and rdma (jaccl) rewritten for that order
    order: list[int]  # hostfile index of each rank
    notes: list[str] = field(default_factory=list)


def load_topology(path: str | Path, cluster: ClusterFile) -> list[Cable]:
    """Cables from our JSON (`[["a","b"], ...]` or `{"cables": [...]}`) or MLX's DOT graph."""
    text = Path(path).read_text() if Path(path).is_file() else None
    if text is None:
        raise UserError(f"--topology {path}: no such file")
    problems: list[str] = []
    if text.lstrip().startswith("graph"):
        nodes = dict(re.findall(r'^\s*(\w+)\s*\[label="([^"]+)"\]', text, re.M))
        pairs = [[nodes.get(a, a), nodes.get(b, b)] for a, b in re.findall(r"^\s*(\w+)\s*--\s*(\w+)", text, re.M)]
        cables = parse_cables(pairs, cluster.hosts, problems)
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"--topology {path}: neither JSON nor a DOT graph ({e})") from None
        cables = parse_cables(data.get("cables", []) if isinstance(data, dict) else data, cluster.hosts, problems)
    if problems:
        raise HostfileError(str(path), problems)
    return cables


def wire(cluster: ClusterFile, cables: list[Cable] | None = None) -> Wiring:
    cables = cluster.cables if cables is None else cables
    hosts, n = cluster.hosts, cluster.world
    if cluster.backend == "jaccl":
        return Wiring(list(hosts), list(range(n)), ["jaccl mesh: every pair has an RDMA link, ranks follow the hostfile"])
    if cluster.backend == "jaccl-ring":
        adj = [[int(i != j and hosts[i].rdma[j] is not None and hosts[j].rdma[i] is not None) for j in range(n)]
               for i in range(n)]
        order = _ring_or_explain(adj, hosts, "RDMA links (the rdma matrix)")
        return Wiring(_permute_rdma(hosts, order), order, _order_note(order, hosts, "RDMA links"))
    if not cables:
        note = "no cables declared: ranks follow the hostfile order; `--check` tests each rank reaches its neighbour"
        return Wiring(list(hosts), list(range(n)), [note] if n > 2 else [])
    adj = [[0] * n for _ in range(n)]
    for c in cables:
        adj[c.a][c.b] += 1
        adj[c.b][c.a] += 1
    order = _ring_or_explain(adj, hosts, "cables")
    return Wiring(_ring_hosts(hosts, order, cables), order, _order_note(order, hosts, "cables"))


def _order_note(order: list[int], hosts: list[HostSpec], what: str) -> list[str]:
    loop = " -> ".join(hosts[i].label for i in order + order[:1])
    note = f"ring follows the {what}: {loop}"
    if order != sorted(order):
        note += " (reordered from the hostfile)"
    return [note]


def _ring_hosts(hosts: list[HostSpec], order: list[int], cables: list[Cable]) -> list[HostSpec]:
    """Rank r's IPs become its end of the cables to rank r-1, when every cable names them."""
    n = len(order)
    between = {}
    for r, h in enumerate(order):
        left = order[r - 1]
        between[r] = [c for c in cables if {c.a, c.b} == {h, left}]
    count = min(len(v) for v in between.values()) if n > 1 else 0
    use_cable_ips = n > 1 and all(c.ip_of(order[r]) for r in range(n) for c in between[r][:count])
    out = []
    for r, h in enumerate(order):
        spec = copy.deepcopy(hosts[h])
        if use_cable_ips:
            spec.ips = [c.ip_of(h) for c in between[r][:count]]
        out.append(spec)
    return out


def _permute_rdma(hosts: list[HostSpec], order: list[int]) -> list[HostSpec]:
    out = []
    for h in order:
        spec = copy.deepcopy(hosts[h])
        spec.rdma = [hosts[h].rdma[j] for j in order]
        out.append(spec)
    return out


def _ring_or_explain(adj: list[list[int]], hosts: list[HostSpec], what: str) -> list[int]:
    order = find_ring(adj)
    if order is None:
        raise UserError(f"the {what} cannot form a ring: {explain_no_ring(adj, [h.label for h in hosts])}")
    return order


def find_ring(adj: list[list[int]]) -> list[int] | None:
    """A cycle through every node starting at 0, or None. Neighbours are tried in
    index order, so a hostfile already listed in ring order keeps its order."""
    n = len(adj)
    if n <= 1:
        return list(range(n))
    if n == 2:
        return [0, 1] if adj[0][1] else None
    path, seen, steps = [0], {0}, 0

    def dfs() -> bool:
        nonlocal steps
        steps += 1
        if steps > _SEARCH_BUDGET:
            return False
        if len(path) == n:
            return adj[path[-1]][0] > 0
        for j in range(n):
            if adj[path[-1]][j] and j not in seen:
                path.append(j)
                seen.add(j)
                if dfs():
                    return True
                path.pop()
                seen.discard(j)
        return False

    return list(path) if dfs() else None


def explain_no_ring(adj: list[list[int]], names: list[str]) -> str:
    n = len(adj)
    deg = [sum(1 for j in range(n) if adj[i][j]) for i in range(n)]
    lonely = [names[i] for i in range(n) if deg[i] == 0]
    if lonely:
        return f"{', '.join(lonely)} {'is' if len(lonely) == 1 else 'are'} not cabled to any other host"
    groups = _components(adj)
    if len(groups) > 1:
        parts = " and ".join("{" + ", ".join(names[i] for i in g) + "}" for g in groups)
        return f"{parts} are not cabled to each other; add a cable between the groups"
    if n == 2:
        return f"{names[0]} and {names[1]} are not cabled to each other"
    ends = [i for i in range(n) if deg[i] == 1]
    if ends:
        desc = "; ".join(f"{names[i]} has only one cable (to {names[next(j for j in range(n) if adj[i][j])]})"
                         for i in ends)
        return f"{desc}; in a ring of {n} every Mac needs cables to two others"
    loop = " -> ".join(names + names[:1])
    return (f"the cables form no single loop through all {n} hosts (e.g. a star or two loops joined at one Mac); "
            f"cable them in a loop such as {loop}")


def _components(adj: list[list[int]]) -> list[list[int]]:
    n, seen, groups = len(adj), set(), []
    for s in range(n):
        if s in seen:
            continue
        stack, group = [s], []
        seen.add(s)
        while stack:
            i = stack.pop()
            group.append(i)
            for j in range(n):
                if adj[i][j] and j not in seen:
                    seen.add(j)
                    stack.append(j)
        groups.append(sorted(group))
    return groups
