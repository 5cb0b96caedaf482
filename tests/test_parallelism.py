"""`plan`'s TP vs PP comparison: predicted one-stream and 8-concurrent decode for head
sharding and pipeline stages on the hostfile's Macs and link, and the recommendation
(the slow TB4 ring favours stages, RDMA keeps head sharding)."""

from __future__ import annotations

import json

import pytest

from mlx_kvshard.config import ModelConfig
from mlx_kvshard.hardware.links import allreduce_seconds, send_seconds
from mlx_kvshard.hardware.profiles import load_chip, load_link
from mlx_kvshard.pipeline.stages import StagePlan
from mlx_kvshard.planner import parallelism
from mlx_kvshard.planner.capacity import Host, Options
from test_plan_cli import hostfile, minis, plan

LLAMA3_8B_4BIT = dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, intermediate_size=14336,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
                      torch_dtype="bfloat16", max_position_embeddings=131072,
                      quantization={"group_size": 64, "bits": 4})


@pytest.fixture
def llama8b(tmp_path):
    d = tmp_path / "llama3-8b-4bit"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(LLAMA3_8B_4BIT))
    return d


@pytest.mark.parametrize("link,choice", [("tb4-ring", "pp"), ("tb5-rdma", "tp")])
def test_the_link_decides_between_head_sharding_and_stages(llama8b, tmp_path, capsys, link, choice):
    plan("--model", str(llama8b), "--hostfile", hostfile(tmp_path, minis(4, memory=16, chip="m4"), "ring"),
         "--link", link, "--context", "4096", "--json")
    c = json.loads(capsys.readouterr().out)["parallelism"]
    assert c["recommend"] == choice, c
    assert c["pp"]["layers"] == [[0, 8], [8, 16], [16, 24], [24, 32]]
    assert c["hybrid"]["runs"] is False and "Group split not supported" in c["hybrid"]["why"]
    assert c["pp"]["concurrent_implemented"] is True
    # what serve --pp runs (the stages in turn) is predicted beside it; micro-batches read the KV concurrently
    assert 0 < c["pp"]["concurrent_in_turn_tok_s"] < c["pp"]["concurrent_tok_s"]
    for m in ("tp", "pp"):
        assert c[m]["concurrent_tok_s"] > c[m]["one_stream_tok_s"] > 0


def test_one_stream_pipeline_is_the_stages_in_turn_plus_the_hops(llama8b):
    cfg = ModelConfig.from_file(llama8b)
    link, chip = load_link("tb4-ring"), load_chip("m4")
    stages = StagePlan.build(cfg, 4, compute_dtype="bfloat16")
    p = parallelism.predict_pipeline(stages, 4096, 1, link, [chip] * 4, 0.7, 1e-3)
    memory = sum((stages.decode_read_bytes(s) + stages.kv_bytes(s, 4096)) / (0.7 * chip.mem_bandwidth_Bps)
                 for s in range(4))
    hops = 3 * send_seconds(link, 4096 * 2) + allreduce_seconds(link, 4, 4)
    assert p["seconds_per_token"] == pytest.approx(memory + hops + 1e-3)
    # every stage reads its layers; together they read what one Mac reads for the whole model
    whole = StagePlan.build(cfg, 2, compute_dtype="bfloat16")
    assert sum(stages.decode_read_bytes(s) for s in range(4)) == sum(whole.decode_read_bytes(s) for s in range(2))


def test_a_stage_that_does_not_fit_is_not_recommended(llama8b):
    cfg = ModelConfig.from_file(llama8b)
    chip = load_chip("m4")
    small = [Host(f"m{i}", 16 if i else 8, chip) for i in range(4)]  # an 8 GB Mac holds too little for a whole quarter
    c = parallelism.compare(cfg, small, load_link("tb4-ring"), Options(context=131072), shares=[1, 1, 1, 1])
    assert c["pp"]["fits"] is False and c["recommend"] != "pp"


def test_plan_pp_refuses_what_generate_would(llama8b, tmp_path):
    from mlx_kvshard.errors import UserError

    with pytest.raises(UserError, match="--pp 2 on a world of 4"):
        plan("--model", str(llama8b), "--world", "4", "--pp", "2")
