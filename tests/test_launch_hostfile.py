"""Hostfile validation: every bad hostfile gets its own specific error, all problems
of one file are reported together, and the example hostfiles are valid."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from mlx_kvshard.launch.fit import ModelRequest, check_enough_hosts
from mlx_kvshard.launch.hostfile import HostfileError, load_hostfile, parse_hostfile
from mlx_kvshard.config import ModelConfig
from mlx_kvshard.errors import UserError

EXAMPLES = Path(__file__).resolve().parent.parent / "configs" / "hostfiles"


def ring(*hosts: dict, **top) -> dict:
    return {"backend": "ring", "hosts": list(hosts), **top}


def mini(i: int, **extra) -> dict:
    return {"ssh": f"mini{i}.local", "label": f"mini{i}", "ips": [f"192.168.0.{i}"], **extra}


def mesh(n: int) -> dict:
    hosts = [{"ssh": f"mini{i}.local", "label": f"mini{i}", "ips": [f"10.0.0.{i}"],
              "rdma": [None if j == i else f"rdma_en{j + 2}" for j in range(n)]} for i in range(n)]
    return {"backend": "jaccl", "hosts": hosts}


def edited(base: dict, fn) -> dict:
    data = copy.deepcopy(base)
    fn(data)
    return data


BAD = {
    "no hosts": ({"backend": "ring"}, '"hosts" must be a non-empty list'),
    "not an object": ("mini1", 'expected a JSON object with "hosts"'),
    "missing ssh": (ring(mini(1), {"ips": ["192.168.0.2"]}), 'hosts[1]: missing "ssh"'),
    "shell metacharacters": (ring(mini(1), {"ssh": "mini2; rm -rf ~", "ips": ["192.168.0.2"]}),
                             "hosts[1]: ssh name 'mini2; rm -rf ~' contains ' ;~'"),
    "ssh option injection": (ring(mini(1), {"ssh": "-oProxyCommand=touch_x", "ips": ["192.168.0.2"]}),
                             "leading '-' are refused"),
    "duplicate host": (ring(mini(1), {"ssh": "mini1.local", "ips": ["192.168.0.2"]}),
                       "hosts[1]: duplicate host 'mini1.local' (also hosts[0])"),
    "duplicate ip": (ring(mini(1), {"ssh": "mini2.local", "ips": ["192.168.0.1"]}),
                     "hosts[1]: duplicate IP 192.168.0.1 (also on hosts[0])"),
    "invalid ip": (ring(mini(1), mini(2, ips=["192.168.0.300"])), "hosts[1].ips[0]: '192.168.0.300' is not an IP"),
    "host name as ip": (ring(mini(1), mini(2, ips=["mini2.local"])), "hosts[1].ips[0]: 'mini2.local' is not an IP"),
    "typo in field": (ring(mini(1), {"ssh": "mini2.local", "ip": ["192.168.0.2"]}),
                      "hosts[1]: unknown field 'ip' (did you mean 'ips'?)"),
    "ring without ips": (ring(mini(1), {"ssh": "mini2.local"}), 'hosts[1] (mini2.local): the ring backend needs "ips"'),
    "uneven ip counts": (ring(mini(1), mini(2, ips=["192.168.0.2", "192.168.1.2"])), "different numbers of ips ([1, 2])"),
    "ipv6 ring": (ring(mini(1, ips=["fe80::1"]), mini(2, ips=["fe80::2"])), "it needs IPv4 addresses"),
    "unknown backend": (ring(mini(1), mini(2), backend="mpi"), "backend 'mpi' is not supported"),
    "bad env": (ring(mini(1), mini(2), envs=["1BAD=x"]), "envs: '1BAD=x' is not KEY=VALUE"),
    "negative memory": (ring(mini(1, memory_gb=-16), mini(2)), "hosts[0]: memory_gb must be a positive number"),
    "tilde cwd": (ring(mini(1, cwd="~/mlx-kvshard"), mini(2)), "hosts[0]: cwd '~/mlx-kvshard': write the absolute path"),
    "rdma wrong shape": (edited(mesh(4), lambda d: d["hosts"][2]["rdma"].pop()),
                         'hosts[2] (mini2): "rdma" has 3 entries, need 4'),
    "rdma diagonal": (edited(mesh(3), lambda d: d["hosts"][1]["rdma"].__setitem__(1, "rdma_en9")),
                      "hosts[1] (mini1): rdma[1] must be null"),
    "rdma mesh gap": (edited(mesh(3), lambda d: d["hosts"][0]["rdma"].__setitem__(2, None)),
                      "hosts[0] (mini0): no RDMA device to mini2; a jaccl mesh needs every pair cabled"),
    "rdma device name": (edited(mesh(2), lambda d: d["hosts"][0]["rdma"].__setitem__(1, "en3")),
                         "rdma[1] = 'en3'; expected a device name like \"rdma_en3\""),
    "jaccl without coordinator ip": (edited(mesh(2), lambda d: d["hosts"][0].pop("ips")),
                                     "hosts[0] (mini0): jaccl needs an IP on rank 0 for the coordinator"),
    "cable to unknown host": (ring(mini(1), mini(2), cables=[["mini1", "mini9"]]),
                              "cables[0]: 'mini9' is not a host in this file"),
    "cable to itself": (ring(mini(1), mini(2), cables=[["mini1", "mini1"]]), "cables[0]: a cable from 'mini1' to itself"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_hostfile_names_the_problem(case):
    data, expected = BAD[case]
    with pytest.raises(HostfileError) as e:
        parse_hostfile(data, "h.json")
    assert any(expected in p for p in e.value.problems), f"{case}: {e.value.problems}"
    assert str(e.value).startswith("hostfile h.json: ")


def test_every_problem_is_reported_at_once():
    data = ring({"ssh": "mini1.local", "ips": ["1.2.3.999"]}, {"ips": ["192.168.0.2"]}, backend="nccl")
    with pytest.raises(HostfileError) as e:
        parse_hostfile(data, "h.json")
    assert len(e.value.problems) == 3, e.value.problems
    assert "3 problems:" in str(e.value)


def test_invalid_json_and_missing_file(tmp_path):
    bad = tmp_path / "h.json"
    bad.write_text('{"hosts": [')
    with pytest.raises(HostfileError, match="not valid JSON"):
        load_hostfile(bad)
    with pytest.raises(UserError, match="no such file"):
        load_hostfile(tmp_path / "nope.json")


def test_bare_host_list_and_loopback_repeats_are_accepted():
    # MLX's bare list form; several ranks on 127.0.0.1 is how simulation works.
    c = parse_hostfile([{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}] * 3)
    assert (c.backend, c.world, [h.index for h in c.hosts]) == ("ring", 3, [0, 1, 2])


def test_cli_backend_overrides_the_file():
    with pytest.raises(HostfileError, match="jaccl needs an IP on rank 0"):
        parse_hostfile(ring({"ssh": "mini1.local"}, {"ssh": "mini2.local", "ips": ["10.0.0.2"]}), backend="jaccl")


def test_too_few_hosts_for_the_model_says_how_many():
    # 32 layers, hidden 4096, fp16: 13.5 GiB of weights; an 8 GB Mac offers 5.33 GiB (2/3) to the GPU.
    cfg = ModelConfig.from_dict({"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32,
                                 "intermediate_size": 14336, "num_attention_heads": 32,
                                 "num_key_value_heads": 8, "vocab_size": 32000, "torch_dtype": "float16"})
    req = ModelRequest("m", None, None, None)
    with pytest.raises(UserError) as e:
        check_enough_hosts(["mini1", "mini2"], [8, 8], cfg, req, context=4096)
    msg = str(e.value)
    assert msg.startswith("too few hosts for the model: rank 0 (mini1) needs")
    assert "5.33 GiB usable (67% of 8 GB)" in msg
    assert "with hosts like these it needs at least 4" in msg
    check_enough_hosts(["a", "b", "c", "d"], [8, 8, 8, 8], cfg, req, context=4096)  # and 4 do fit
    check_enough_hosts(["mini1", "mini2"], [8, None], cfg, req, context=4096)  # unknown memory: the doctor decides


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.json")))
def test_example_hostfiles_are_valid(name):
    c = load_hostfile(EXAMPLES / name)
    assert c.world in (2, 4)
    assert json.loads((EXAMPLES / name).read_text())["backend"] == c.backend
