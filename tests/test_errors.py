"""Bad input gets one clear line naming the problem, exit code 2, and no traceback."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from checkpoints import checkpoint


def run_cli(*argv, timeout=120):
    return subprocess.run([sys.executable, "-m", "mlx_kvshard", *argv], capture_output=True, text=True,
                          timeout=timeout)


def assert_user_error(proc, *fragments):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    line = [l for l in proc.stderr.splitlines() if "error:" in l]
    assert line, proc.stderr
    for f in fragments:
        assert f in line[-1], (f, line[-1])


@pytest.fixture
def model_copy(ckpt_root, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(checkpoint(ckpt_root, "llama_g2"), dst)
    return dst


def test_missing_model_dir(tmp_path):
    assert_user_error(run_cli("generate", "--model", str(tmp_path / "nope")), "no such directory")


def test_dir_without_config(tmp_path):
    assert_user_error(run_cli("generate", "--model", str(tmp_path)), "no config.json")


def test_unsupported_model_type(model_copy):
    cfg = json.loads((model_copy / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (model_copy / "config.json").write_text(json.dumps(cfg))
    assert_user_error(run_cli("generate", "--model", str(model_copy)), "model_type 'gpt2' is not supported")


def test_corrupt_safetensors(model_copy):
    f = sorted(model_copy.glob("*.safetensors"))[0]
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])  # a download cut short
    assert_user_error(run_cli("generate", "--model", str(model_copy)), "truncated or corrupt", f.name)


def test_garbage_safetensors_header(model_copy):
    f = sorted(model_copy.glob("*.safetensors"))[0]
    f.write_bytes(b"\xff" * 64)
    assert_user_error(run_cli("generate", "--model", str(model_copy)), "not a valid safetensors file")


def test_missing_weight_file(model_copy):
    sorted(model_copy.glob("*.safetensors"))[-1].unlink()
    assert_user_error(run_cli("generate", "--model", str(model_copy)), "missing", "download the complete model")


def test_shape_disagrees_with_config(model_copy):
    cfg = json.loads((model_copy / "config.json").read_text())
    cfg["intermediate_size"] = 192
    (model_copy / "config.json").write_text(json.dumps(cfg))
    assert_user_error(run_cli("generate", "--model", str(model_copy)), "has shape", "config.json")


def test_prompt_longer_than_context(model_copy):
    proc = run_cli("generate", "--model", str(model_copy), "--prompt", "hello world " * 50, "--max-context", "16")
    assert_user_error(proc, "max context is 16", "--max-context")


@pytest.mark.parametrize("flag,value,fragment", [
    ("--temp", "-1", "--temp -1.0"),
    ("--top-p", "1.5", "--top-p 1.5"),
    ("--top-k", "-3", "--top-k -3"),
    ("--min-p", "2", "--min-p 2.0"),
    ("--max-tokens", "0", "--max-tokens 0"),
    ("--repetition-penalty", "0", "--repetition-penalty 0.0"),
    ("--seed", "-5", "--seed -5"),
])
def test_invalid_sampling_parameters(flag, value, fragment):
    # rejected before any model is loaded or rank started
    assert_user_error(run_cli("generate", "--model", "tiny", flag, value, "--simulate", "2"), fragment)


def test_plan_infeasible_world(ckpt_root):
    proc = run_cli("plan", "--model", str(checkpoint(ckpt_root, "q4")), "--world", "5")
    assert_user_error(proc, "world 5", "at most 4 ranks")
