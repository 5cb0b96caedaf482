"""Ring wiring: ranks follow the cables, each rank gets its IP on the cable to its left
neighbour, and a topology that cannot form a ring is explained."""

from __future__ import annotations

import pytest

from mlx_kvshard.launch.hostfile import parse_hostfile
from mlx_kvshard.launch.topology import load_topology, wire
from mlx_kvshard.errors import UserError


def cluster(n: int, cables=None, **top):
    hosts = [{"ssh": f"m{i}.local", "label": f"m{i}", "ips": [f"10.0.0.{i}"]} for i in range(n)]
    data = {"backend": "ring", "hosts": hosts, "cables": cables or [], **top}
    return parse_hostfile(data)


def cabled(*pairs, ips=False):
    """Cables as [["m0","m1"], ...], or with MLX-style /30 IPs per cable."""
    out = []
    for k, (a, b) in enumerate(pairs):
        if ips:
            out.append({"hosts": [f"m{a}", f"m{b}"], "ips": [f"192.168.0.{4 * k + 1}", f"192.168.0.{4 * k + 2}"]})
        else:
            out.append([f"m{a}", f"m{b}"])
    return out


def test_hostfile_already_in_ring_order_is_kept():
    w = wire(cluster(4, cabled((0, 1), (1, 2), (2, 3), (3, 0), ips=True)))
    assert w.order == [0, 1, 2, 3]
    assert "reordered" not in w.notes[0]


def test_ranks_are_reordered_along_the_cables_with_each_ranks_left_cable_ip():
    # Cable IPs take over from the hosts' own "ips", which cannot say which cable they are on.
    # Listed m0..m3, cabled m0-m2, m2-m1, m1-m3, m3-m0.
    w = wire(cluster(4, cabled((0, 2), (2, 1), (1, 3), (3, 0), ips=True)))
    assert w.order == [0, 2, 1, 3]
    assert w.notes == ["ring follows the cables: m0 -> m2 -> m1 -> m3 -> m0 (reordered from the hostfile)"]
    # Rank r listens on its end of the cable to rank r-1 (MLX's ring: r-1 connects to r).
    assert [h.ips for h in w.hosts] == [["192.168.0.14"], ["192.168.0.2"], ["192.168.0.6"], ["192.168.0.10"]]


def test_two_hosts_need_one_cable():
    w = wire(cluster(2, cabled((1, 0), ips=True)))
    assert w.order == [0, 1]
    assert [h.ips for h in w.hosts] == [["192.168.0.2"], ["192.168.0.1"]]


@pytest.mark.parametrize("n, pairs, expected", [
    (3, [(0, 1)], "m2 is not cabled to any other host"),
    (4, [(0, 1), (2, 3)], "{m0, m1} and {m2, m3} are not cabled to each other"),
    (4, [(0, 1), (1, 2), (2, 3)], "m0 has only one cable (to m1); m3 has only one cable (to m2); in a ring of 4"),
    (5, [(0, 1), (1, 2), (2, 0), (2, 3), (3, 4), (4, 2)], "the cables form no single loop through all 5 hosts"),
])
def test_a_topology_that_cannot_form_a_ring_is_explained(n, pairs, expected):
    # Two loops joined at one Mac (the last case) has no dead end, yet no ring either.
    with pytest.raises(UserError) as e:
        wire(cluster(n, cabled(*pairs)))
    assert str(e.value).startswith("the cables cannot form a ring: ")
    assert expected in str(e.value)


def test_topology_from_mlx_distributed_config_dot(tmp_path):
    dot = tmp_path / "tb.dot"
    dot.write_text('graph G {\n  node [shape=rectangle];\n  a [label="m0.local"];\n  b [label="m1.local"];\n'
                   '  c [label="m2.local"];\n  a -- c [label="en2/en3"]\n  c -- b [label="en2/en3"]\n'
                   '  b -- a [label="en3/en2"]\n}\n')
    c = cluster(3)
    w = wire(c, load_topology(dot, c))
    assert w.order == [0, 1, 2]  # a triangle: the hostfile order is already a ring
    assert [h.ips for h in w.hosts] == [["10.0.0.0"], ["10.0.0.1"], ["10.0.0.2"]]  # no cable IPs: hosts' own


def test_jaccl_ring_orders_by_rdma_links_and_permutes_the_matrix():
    # RDMA links m0-m2, m2-m1, m1-m3, m3-m0 (hostfile order is not the ring).
    links = {(0, 2), (2, 1), (1, 3), (3, 0)}
    hosts = []
    for i in range(4):
        row = [f"rdma_en{j}" if (i, j) in links or (j, i) in links else None for j in range(4)]
        hosts.append({"ssh": f"m{i}.local", "label": f"m{i}", "ips": [f"10.0.0.{i + 1}"], "rdma": row})
    w = wire(parse_hostfile({"backend": "jaccl-ring", "hosts": hosts}))
    assert w.order == [0, 2, 1, 3]
    assert w.hosts[1].rdma == ["rdma_en0", None, "rdma_en1", None]  # m2: to m0 (left), m1 (right)
    assert all(h.rdma[r] is None for r, h in enumerate(w.hosts))


def test_jaccl_ring_without_a_ring_of_links_is_explained():
    hosts = [{"ssh": f"m{i}.local", "label": f"m{i}", "ips": [f"10.0.0.{i + 1}"],
              "rdma": [None if i == j or {i, j} != {0, 1} else "rdma_en2" for j in range(3)]} for i in range(3)]
    with pytest.raises(UserError, match=r"the RDMA links \(the rdma matrix\) cannot form a ring: m2 is not cabled"):
        wire(parse_hostfile({"backend": "jaccl-ring", "hosts": hosts}))
