"""`mlx-kvshard plan` end to end on config.json files and hostfiles written to tmp dirs."""

from __future__ import annotations

import argparse
import json

import pytest

from mlx_kvshard.cli import plan as cmd_plan
from mlx_kvshard.errors import UserError

LLAMA3_70B = dict(model_type="llama", hidden_size=8192, num_hidden_layers=80, intermediate_size=28672,
                  num_attention_heads=64, num_key_value_heads=8, vocab_size=128256,
                  tie_word_embeddings=False, torch_dtype="bfloat16", max_position_embeddings=8192)


def plan(*argv: str) -> None:
    parser = argparse.ArgumentParser(prog="mlx-kvshard")
    cmd_plan.register(parser.add_subparsers())
    args = parser.parse_args(["plan", *argv])
    args.func(args, parser)


@pytest.fixture
def model(tmp_path):
    d = tmp_path / "llama3-70b"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(LLAMA3_70B))
    return d


def hostfile(tmp_path, hosts, backend="jaccl", bare=False):
    path = tmp_path / "hosts.json"
    path.write_text(json.dumps(hosts if bare else {"backend": backend, "envs": [], "hosts": hosts}))
    return str(path)


def minis(n, memory=64, chip="m4pro"):
    return [{"ssh": f"mini-{i}", "ips": [f"10.0.0.{i}"], "memory_gb": memory, "chip": chip} for i in range(n)]


def test_old_usage_still_prints_the_shard_table(model, capsys):
    plan("--model", str(model), "--world", "2")
    out = capsys.readouterr().out
    assert out.startswith("llama: 80 layers, hidden 8192, 64 query / 8 KV heads")
    assert "0-3" in out and "4-7" in out
    assert "160 all_sum" in out
    assert "single Mac or cluster? unknown" in out


def test_old_json_keys_stay_at_the_top(model, capsys):
    plan("--model", str(model), "--world", "2", "--weights", "2,1", "--json")
    d = json.loads(capsys.readouterr().out)
    assert d["world"] == 2 and d["n_kv_heads"] == 8
    assert d["ranks"][0]["weight"] == 2.0 and d["ranks"][0]["weight_bytes"] > d["ranks"][1]["weight_bytes"]
    assert d["communication"]["head_sharded"]["collectives_per_token"] == 160


def test_hostfile_of_three_m4_pro_over_tb5(model, tmp_path, capsys):
    plan("--model", str(model), "--hostfile", hostfile(tmp_path, minis(3)), "--context", "4096")
    out = capsys.readouterr().out
    assert "tb5-rdma (hostfile backend jaccl)" in out
    assert "mini-0" in out and "m4pro" in out and "48.00 GiB" in out
    # the MLP split reserves KV at the context: rank 2 (2 KV heads) takes more columns, and the
    # cluster's context rises from 4,757 (balanced by weights alone, rank 0 first) to 5,599
    assert "largest context that fits: 5,599 tokens (rank 2 (mini-2) runs out first)" in out
    assert "predicted decode on tb5-rdma" in out
    assert "single Mac or cluster? cluster:" in out and "3 Macs like mini-0" in out


def test_json_has_everything(model, tmp_path, capsys):
    plan("--model", str(model), "--hostfile", hostfile(tmp_path, minis(3)), "--json")
    d = json.loads(capsys.readouterr().out)
    assert d["inputs"]["context"] == 8192 and d["fits"] is False
    assert d["ranks"][0]["host"] == "mini-0" and d["ranks"][0]["fits"] is False
    assert d["ranks"][0]["kv_bytes"] == 8192 * 2 * 80 * 3 * 128 * 2
    assert d["max_context"] == {"tokens": 5599, "limiting_rank": 2, "max_position_embeddings": 8192}
    assert d["prediction"]["link"] == "tb5-rdma"
    assert d["assumptions"]["link"]["sources"]["alpha_us"]
    assert d["decision"]["choice"] == "neither" and d["decision"]["macs_needed"] == 4


def test_model_that_cannot_fit_prints_the_numbers(model, tmp_path, capsys):
    plan("--model", str(model), "--world", "2", "--memory", "24", "--chip", "m4pro", "--link", "tb4-ring")
    out = capsys.readouterr().out
    assert "NO" in out
    assert "largest context that fits: none; rank 0 cannot hold its weights" in out
    assert "single Mac or cluster? neither: the model needs 134.9 GiB" in out


def test_bare_list_hostfile_and_flag_overrides(model, tmp_path, capsys):
    hosts = [{"ssh": "studio"}, {"ssh": "mini"}]
    plan("--model", str(model), "--hostfile", hostfile(tmp_path, hosts, bare=True),
         "--memory", "192,64", "--chip", "m3ultra,m4pro", "--json")
    d = json.loads(capsys.readouterr().out)
    assert [r["memory_gb"] for r in d["ranks"]] == [192, 64]
    assert [r["chip"] for r in d["ranks"]] == ["m3ultra", "m4pro"]
    assert d["ranks"][0]["local_kv_heads"] > d["ranks"][1]["local_kv_heads"]  # split by memory
    assert d["assumptions"]["link"]["name"] == "tb5-ring"  # TB5 chips, ring backend: no RDMA


def test_checkpoint_size_is_checked_against_the_config(model, capsys):
    (model / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 141_107_412_992}, "weight_map": {}}))
    plan("--model", str(model), "--world", "1")
    assert "the checkpoint (model.safetensors.index.json) holds 131.42 GiB" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--world", "2", "--memory", "64,x"], "--memory '64,x': expected comma-separated numbers"),
    (["--world", "3", "--memory", "64,24"], "--memory: got 2 values for a world of 3"),
    (["--world", "2", "--chip", "m9"], "unknown chip profile 'm9'; available: m3ultra, m4, m4max"),
    (["--world", "2", "--link", "carrier-pigeon"], "unknown link profile 'carrier-pigeon'; available: 10gbe"),
    (["--world", "2", "--context", "0"], "--context and --batch must be at least 1"),
    ([], "give --world N or --hostfile FILE"),
])
def test_bad_arguments_are_user_errors(model, argv, message):
    with pytest.raises(UserError, match=message):
        plan("--model", str(model), *argv)


def test_bad_hostfiles(model, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    with pytest.raises(UserError, match="not valid JSON"):
        plan("--model", str(model), "--hostfile", str(bad))
    with pytest.raises(UserError, match=r"hosts\[1\]: memory_gb must be a positive number"):
        plan("--model", str(model), "--hostfile", hostfile(tmp_path, [{"ssh": "a"}, {"ssh": "b", "memory_gb": "lots"}]))
    with pytest.raises(UserError, match="--world 4 but --hostfile .* lists 3 hosts"):
        plan("--model", str(model), "--world", "4", "--hostfile", hostfile(tmp_path, minis(3)))


def test_malformed_config_is_a_user_error(tmp_path):
    d = tmp_path / "broken"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({k: v for k, v in LLAMA3_70B.items() if k != "hidden_size"}))
    with pytest.raises(UserError, match="missing required field.*hidden_size"):
        plan("--model", str(d), "--world", "2")
    (d / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        plan("--model", str(d), "--world", "2")


def test_plan_reads_hostfiles_with_the_launchers_strict_reader(model, tmp_path, capsys):
    # Planning precedes cabling: no IPs, no RDMA matrix, yet a typo is still caught.
    with pytest.raises(UserError, match=r"hosts\[1\]: unknown field 'memroy_gb' \(did you mean 'memory_gb'\?\)"):
        plan("--model", str(model), "--hostfile",
             hostfile(tmp_path, [{"ssh": "a", "memory_gb": 64}, {"ssh": "b", "memroy_gb": 64}], backend="ring"))
    with pytest.raises(UserError, match=r"duplicate host 'a'"):
        plan("--model", str(model), "--hostfile", hostfile(tmp_path, [{"ssh": "a"}, {"ssh": "a"}], backend="ring"))


def test_hostfile_by_the_name_of_a_shipped_example(model, capsys):
    plan("--model", str(model), "--hostfile", "4-minis-tb5-jaccl", "--json")
    d = json.loads(capsys.readouterr().out)
    assert d["world"] == 4 and d["assumptions"]["link"]["why"] == "hostfile backend jaccl"
    with pytest.raises(UserError, match=r"no such file; write one, name a shipped example \(2-minis-thunderbolt"):
        plan("--model", str(model), "--hostfile", "5-minis")


def test_kv_shard_modes_side_by_side_and_auto_choice(model, capsys):
    plan("--model", str(model), "--world", "16", "--memory", "64", "--context", "131072",
         "--kv-shard", "auto", "--kv-bits", "8")
    out = capsys.readouterr().out
    assert "--kv-shard auto uses sequence" in out and "pos 1 mod 2" in out
    assert "replicate: fullest rank KV" in out and "sequence: fullest rank KV" in out
    plan("--model", str(model), "--world", "16", "--memory", "64", "--context", "131072",
         "--kv-shard", "auto", "--kv-bits", "8", "--json")
    d = json.loads(capsys.readouterr().out)
    rep, seq = d["kv_modes"]["replicate"], d["kv_modes"]["sequence"]
    assert seq["kv_bytes_max_rank"] * 2 == rep["kv_bytes_max_rank"]
    assert seq["max_context"] > rep["max_context"] and d["kv"]["shard"] == "sequence"
    # 8-bit, group 64, bf16 scales: per position (1 KV head, 80 layers) 2*80*128 values + their groups
    assert d["ranks"][0]["kv_bytes_per_position"] == 2 * 80 * 128 + 2 * 80 * 128 // 64 * 2 * 2
    assert d["ranks"][0]["kv_bytes"] == 65536 * d["ranks"][0]["kv_bytes_per_position"]


def test_users_times_context_per_kv_mode_and_recommendation(model, capsys):
    """16 Macs of 64 GB on 8 KV heads: every precision in both shard modes; sequence halves the
    fullest rank's KV per user (2 sharers; replicated 4-bit adds its full-precision window),
    8 and 4 bits shrink it; the most precise mode that
    holds --batch users is recommended."""
    args = ("--model", str(model), "--world", "16", "--memory", "64", "--context", "32768")
    plan(*args, "--batch", "8", "--json")
    d = json.loads(capsys.readouterr().out)["kv_capacity"]
    modes = {(m["kv_bits"], m["kv_shard"]): m for m in d["modes"]}
    assert sorted(modes) == [(b, s) for b in (4, 8, 16) for s in ("replicate", "sequence")]
    elements = 80 * 128 * 2  # one KV head's K and V per position, all layers
    for bits in (16, 8, 4):
        rep, seq = modes[bits, "replicate"], modes[bits, "sequence"]
        # replicated 4-bit keeps its last 16 positions in bf16 (--kv-fp-window's default); sequence none
        window = 16 * (elements * 2 - elements * 9 // 16) if bits == 4 else 0
        assert rep["kv_bytes_per_user"] == 2 * seq["kv_bytes_per_user"] + window
        assert seq["users"] > rep["users"] and seq["max_context"] > rep["max_context"]
    assert modes[16, "replicate"]["kv_bytes_per_user"] == 32768 * 80 * 2 * 128 * 2  # one KV head, bf16
    assert modes[4, "sequence"]["users"] > modes[8, "sequence"]["users"] > modes[16, "sequence"]["users"]
    assert d["recommended"] == {"kv_bits": 16, "kv_shard": "replicate"}
    want = modes[16, "replicate"]["users"] + 1  # more users than fp replicated holds: fp sequence
    plan(*args, "--batch", str(want))
    out = capsys.readouterr().out
    assert "users x context per KV mode" in out and "recommended KV mode: fp, sequence" in out
    plan(*args, "--batch", "100000")  # none holds them: the one that holds the most
    assert "recommended KV mode: 4-bit, sequence: holds the most users" in capsys.readouterr().out
    plan("--model", str(model), "--world", "2", "--context", "4096")  # memory unknown: no users, no choice
    out = capsys.readouterr().out
    assert "fp, sequence" not in out and "recommended KV mode: none (give --memory" in out
