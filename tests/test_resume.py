"""Generation checkpoints: written atomically, read back exactly, and a corrupt or
mismatched one (other model, other tokenizer, conflicting flags) is a clear error
before any rank starts. Resume equivalence with real ranks is in test_liveness.py."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict

import pytest

from checkpoints import checkpoint
from mlx_kvshard.liveness import checkpoint as gencheckpoint
from mlx_kvshard.cli import main
from mlx_kvshard.liveness.checkpoint import GenCheckpoint, model_identity
from mlx_kvshard.engine.generate import SamplingParams
from mlx_kvshard.models.tiny import tiny_model_dir
from mlx_kvshard.settings import CheckpointSettings


def make(tmp_path, model_dir=None, tokens=(5, 6, 7), name="ck.json", **sampling) -> tuple:
    model_dir = model_dir or tiny_model_dir()
    params = SamplingParams(max_tokens=8, **sampling)
    ck = GenCheckpoint(model_identity(model_dir), [1, 2, 3], list(tokens), {**asdict(params), "stop": []},
                       4096, "float32", 3)
    path = tmp_path / name
    gencheckpoint.write(path, ck)
    return path, ck


def resume(args, capsys) -> tuple[int, str]:
    code = main(["generate", *args])
    return code, capsys.readouterr().err


def test_written_atomically_and_read_back(tmp_path):
    path, ck = make(tmp_path, temp=0.7, seed=3)
    assert [p.name for p in tmp_path.iterdir()] == ["ck.json"]  # the temp file was renamed over
    back = gencheckpoint.read(path)
    assert back == ck and back.params() == ck.params()
    header, tokens = path.read_text().splitlines()
    assert json.loads(header)["format"] == gencheckpoint.FORMAT
    assert json.loads(tokens)["n"] == 3 and json.loads(tokens)["t"] == [5, 6, 7]


def test_tokens_are_appended_and_a_torn_append_is_dropped(tmp_path):
    """The prompt is written once; each later write appends one line. A crash cut at any
    byte of the file leaves a checkpoint that reads back as the last whole state."""
    params = SamplingParams(max_tokens=64)
    ck = gencheckpoint.Writer.for_rank(CheckpointSettings(path=str(tmp_path / "ck.json"), every=4), 0,
                                       tiny_model_dir(), [1, 2, 3], params, 4096, "float32", 2)
    tokens = []
    sizes = []
    for t in range(10, 22):
        tokens.append(t)
        ck.step(tokens)
        sizes.append(ck.path.stat().st_size if ck.path.exists() else 0)
    ck.finish(tokens, "length")
    text = ck.path.read_text()
    assert text.count("\n") == 5 and text.count('"prompt"') == 1  # header + 3 appends + finish
    assert sizes[3] < sizes[7] < sizes[11] and sizes[7] - sizes[3] < 100  # appends, not rewrites
    whole = gencheckpoint.read(ck.path)
    assert whole.tokens == tokens and whole.finish_reason == "length" and whole.prompt == [1, 2, 3]
    header_end = text.index("\n") + 1
    for cut in range(header_end, len(text)):
        (tmp_path / "torn.json").write_text(text[:cut])
        back = gencheckpoint.read(tmp_path / "torn.json")
        line_ends = [i + 1 for i, c in enumerate(text[:cut]) if c == "\n"]
        saved = {header_end: 0, **{end: n for end, n in zip(line_ends[1:], (4, 8, 12, 12))}}
        assert back.tokens == tokens[:saved[line_ends[-1]]], cut


@pytest.mark.parametrize("damage, message", [
    (lambda t: t[: len(t) // 2], "corrupt generation checkpoint (not valid JSON"),
    (lambda t: t.replace('"t":[5,6,7]', '"t":[5,6,8]'), "its checksum does not match"),
    (lambda t: t.replace('"prompt":[1,2,3]', '"prompt":[1,2,4]'), "its checksum does not match"),
    (lambda t: json.dumps({"hello": 1}), "not an mlx-kvshard generation checkpoint"),
    (lambda t: t.replace('"version":2', '"version":99'), "checkpoint format version 99"),
])
def test_corrupt_checkpoint_is_a_clear_error(tmp_path, capsys, damage, message):
    path, _ = make(tmp_path)
    path.write_text(damage(path.read_text()))
    code, err = resume(["--simulate", "2", "--resume", str(path)], capsys)
    assert code == 2 and message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_missing_checkpoint(tmp_path, capsys):
    code, err = resume(["--simulate", "2", "--resume", str(tmp_path / "nope.json")], capsys)
    assert code == 2 and "no such file" in err


def test_other_model_is_refused(tmp_path, capsys, ckpt_root):
    path, _ = make(tmp_path)
    other = checkpoint(ckpt_root, "llama_g2")
    code, err = resume(["--simulate", "2", "--resume", str(path), "--model", str(other)], capsys)
    assert code == 2 and "written for another model" in err and "config.json differs" in err, err


def test_other_tokenizer_is_refused(tmp_path, capsys):
    path, _ = make(tmp_path)
    other = tmp_path / "tiny-retokenized"
    shutil.copytree(tiny_model_dir(), other)
    cfg = json.loads((other / "tokenizer_config.json").read_text())
    (other / "tokenizer_config.json").write_text(json.dumps({**cfg, "eos_token": "<|user|>"}))
    code, err = resume(["--simulate", "2", "--resume", str(path), "--model", str(other)], capsys)
    assert code == 2 and "written with another tokenizer" in err, err


def test_rank_side_checks_too(tmp_path, capsys, ckpt_root):
    """Without --simulate (a rank under a launcher, here a world of one) the same check holds."""
    path, _ = make(tmp_path)
    code, err = resume(["--resume", str(path), "--model", str(checkpoint(ckpt_root, "llama_g2"))], capsys)
    assert code == 2 and "written for another model" in err, err


def test_conflicting_sampling_flag(tmp_path, capsys):
    path, _ = make(tmp_path, temp=0.8, seed=4)
    code, err = resume(["--simulate", "2", "--resume", str(path), "--temp", "0.5"], capsys)
    assert code == 2 and "--temp 0.5: --resume continues a run that used --temp 0.8" in err, err


def test_resume_of_a_finished_generation_generates_nothing(tmp_path, capsys):
    """A checkpoint whose tokens end in EOS is complete: resuming reports those tokens."""
    from mlx_lm.tokenizer_utils import load

    eos = load(tiny_model_dir()).eos_token_id
    path, _ = make(tmp_path, tokens=(40, 41, eos))
    code = main(["generate", "--resume", str(path), "--json"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and out["tokens"] == [40, 41, eos] and out["finish_reason"] == "stop"
    assert out["resumed_tokens"] == 3
