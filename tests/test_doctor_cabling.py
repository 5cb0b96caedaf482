"""The doctor's cabling check: a ring address on Wi-Fi is found from the probe's interfaces
and hardware ports, and the doctor says when that hop changes the planner's choice between
head sharding and pipeline stages."""

from __future__ import annotations

from types import SimpleNamespace

from mlx_kvshard.config import ModelConfig
from mlx_kvshard.launch.cabling import cabling, medium
from mlx_kvshard.launch.fit import ModelRequest

# few, wide layers in bf16: weight reads dominate, so head sharding wins over Thunderbolt
WIDE = dict(model_type="llama", hidden_size=8192, num_hidden_layers=8, intermediate_size=28672,
            num_attention_heads=64, num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False,
            torch_dtype="bfloat16", max_position_embeddings=8192)

PORTS = """Hardware Port: Wi-Fi
Device: en1
Ethernet Address: 1c:1d:d3:00:00:02

Hardware Port: Thunderbolt 1
Device: en2
Ethernet Address: 36:9a:12:0c:8e:40
"""


def probe(rank, tb_ip, wifi_ip):
    result = {"interfaces": {"addresses": {tb_ip: "en2", wifi_ip: "en1"}, "default": ["en1"]},
              "bridge0": {"ifconfig": "", "ports": PORTS}}
    return SimpleNamespace(ranks=[SimpleNamespace(rank=rank)], result=result, label=f"m{rank}")


def spec(ring_ips, chip):
    class Spec:
        backend, world = "ring", len(ring_ips)
        ranks = [SimpleNamespace(host=SimpleNamespace(label=f"m{r}", chip=chip, memory_gb=64)) for r in range(len(ring_ips))]

        def listen_targets(self):
            return {r: [[ip, 5000 + r]] for r, ip in enumerate(ring_ips)}
    return Spec()


def test_medium_of_an_address():
    p = probe(0, "10.0.0.1", "192.168.1.10")
    assert medium(p.result, "10.0.0.1") == "thunderbolt" and medium(p.result, "192.168.1.10") == "wifi"
    assert medium({"interfaces": None}, "10.0.0.1") is None  # not macOS: unknown, no verdict


def test_a_mac_on_wifi_changes_the_recommendation(tmp_path):
    import json

    (tmp_path / "config.json").write_text(json.dumps(WIDE))
    cfg = ModelConfig.from_file(tmp_path)
    request = ModelRequest(str(tmp_path), None, None, 4096)
    tb = [f"10.0.0.{r}" for r in range(4)]
    probes = [probe(r, tb[r], f"192.168.1.{r}") for r in range(4)]
    [ok] = cabling(spec(tb, "m4pro"), probes, cfg, request, None)  # every hop on Thunderbolt 5: head sharding
    assert ok.status == "PASS" and "head sharding" in ok.detail and "tb5-ring" in ok.detail
    on_wifi = tb[:2] + ["192.168.1.2"] + tb[3:]  # rank 2's ring address is its Wi-Fi one
    [warn] = cabling(spec(on_wifi, "m4pro"), probes, cfg, request, None)
    assert warn.status == "WARN" and "rank 2 (m2) on Wi-Fi changes the recommendation" in warn.detail, warn.detail
    assert "--pp 4" in warn.detail and "--pp 4" in warn.fix
    no_chips = spec(tb, None)
    assert cabling(no_chips, probes, cfg, request, None) == []  # the hostfile names no chips: no verdict


def test_launch_memory_rule_follows_the_stages(tmp_path):
    """Under `launch -- generate --pp S` the doctor and the launcher's refusal count each
    stage's layers, not a head-sharded slice of every layer."""
    import json

    import pytest

    from mlx_kvshard.errors import UserError
    from mlx_kvshard.launch.fit import check_enough_hosts, rank_needs
    from mlx_kvshard.pipeline.stages import StagePlan

    (tmp_path / "config.json").write_text(json.dumps(WIDE))
    cfg = ModelConfig.from_file(tmp_path)
    request = ModelRequest(str(tmp_path), [3, 1], None, 4096, pp=2)
    needs = rank_needs(cfg, 2, request, 4096)
    stages = StagePlan.build(cfg, 2, [3, 1], context=4096)
    assert [n.weight_bytes for n in needs] == [stages.weight_bytes(0), stages.weight_bytes(1)]
    assert needs[0].weight_bytes > 2 * needs[1].weight_bytes  # 6 layers and the embedding vs 2 and the head
    with pytest.raises(UserError, match=r"--pp 2: stage 0 \(a\) needs"):
        check_enough_hosts(["a", "b"], [16, 64], cfg, request, 4096)
    with pytest.raises(UserError, match="--pp 2 on a world of 3"):
        rank_needs(cfg, 3, request, 4096)
