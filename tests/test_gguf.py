"""--model FILE.gguf: GGML types mapped onto MLX quantization (exactly where the format allows,
checked against the `gguf` package's own dequantization, tensor by tensor and slice by slice),
q/k permutation undone, `convert` to an mlx-lm checkpoint, and sharded runs at world 1 and 3
equal to mlx-lm on the converted weights (real rank processes)."""

from __future__ import annotations

import json
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import quants as gguf_quants

from gguf_files import SPECS, _permute, gguf_file, rope_freqs, write_gguf
from mlx_kvshard.errors import UserError
from mlx_kvshard.models.gguf import quants
from mlx_kvshard.models.gguf.checkpoint import GGUFCheckpoint
from mlx_kvshard.models.gguf.convert import convert
from mlx_kvshard.models.gguf.modeldir import gguf_model_dir
from ranks import mlx_launch
from test_equivalence import oracle


@pytest.fixture(scope="module")
def files(ckpt_root):
    """name -> (GGUF file, its derived model directory, its float32 mlx-lm conversion)."""
    out = {}
    for name in SPECS:
        path = gguf_file(ckpt_root, name)
        converted = path.parent / "converted"
        if not (converted / "config.json").exists():
            convert(path, converted, "float32", progress=lambda line: None)
        out[name] = (path, gguf_model_dir(path), converted)
    return out


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _dequantized(ckpt: GGUFCheckpoint, module: str, **slice_) -> np.ndarray:
    w, s, b = (ckpt.read(f"{module}.{p}", **slice_) for p in ("weight", "scales", "biases"))
    return np.array(mx.dequantize(w, s, b, group_size=quants.GROUP, bits=w.shape[1] // s.shape[1]))


@pytest.mark.parametrize("name", sorted(SPECS))
def test_every_tensor_equals_gguf_dequantization(name, files):
    """Exact types dequantize to exactly gguf's values; requantized ones within the error the
    summary line reports; float tensors are themselves; q/k rows come back in HF order; a
    column slice of a row-parallel tensor (off the 256-value K blocks) is the same columns of
    the whole; the converted checkpoint holds the same arrays."""
    path, _, converted = files[name]
    ckpt = GGUFCheckpoint(path)
    cfg = json.loads((converted / "config.json").read_text())
    saved = mx.load(str(converted / "model.safetensors"))
    from gguf import GGUFReader

    reader = GGUFReader(path)
    seen = set()
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":  # config.json's rope_scaling, not a weight (test_llama3_rope_*)
            continue
        qtype = T(t.tensor_type)
        module = [m for m, tensor in ckpt._modules.items() if tensor.gguf_name == t.name][0]
        want = gguf_quants.dequantize(np.asarray(t.data), qtype).astype(np.float32)
        if cfg["model_type"] == "llama" and module.removesuffix(".weight").endswith(("q_proj", "k_proj")):
            heads = cfg["num_attention_heads"] if "q_proj" in module else cfg["num_key_value_heads"]
            want = _unpermute(want, heads)
        if qtype in quants.FLOAT:
            got = np.array(ckpt.read(module).astype(mx.float32))
            assert np.array_equal(got, want), t.name
            assert np.array_equal(np.array(saved[module]), got), t.name
            continue
        seen.add(qtype)
        got = _dequantized(ckpt, module)
        err = float(np.max(np.abs(got - want)))
        if qtype in quants.EXACT:
            assert err == 0.0, f"{t.name} ({qtype.name}): max |error| {err}"
        else:
            assert err <= ckpt.requantized[qtype.name] and err < 0.05, (t.name, qtype.name, err)
        for p in ("weight", "scales", "biases"):
            assert np.array_equal(np.array(saved[f"{module}.{p}"]), np.array(ckpt.read(f"{module}.{p}"))), module
        # columns 96..224 (groups 3..7): inside the first 256-value block of a K type
        bits = quants.bits_of(qtype)
        part = [ckpt.read(f"{module}.weight", 1, 96 * bits // 32, 224 * bits // 32),
                ckpt.read(f"{module}.scales", 1, 3, 7), ckpt.read(f"{module}.biases", 1, 3, 7)]
        part = np.array(mx.dequantize(*part, group_size=quants.GROUP, bits=bits))
        assert np.array_equal(part, got[:, 96:224]), f"{t.name}: column slice differs from the whole"
    if name == "gguf_llama_all":
        assert seen == set(quants.EXACT) | set(quants.REQUANTIZED)
        line = ckpt.summary()
        assert "Q6_K -> 8-bit group 32" in line and "Q3_K" in line and "Q2_K" in line, line


def test_q_k_permutation_undone_on_float_weights(files, ckpt_root):
    """An F32 q_proj in a llama file reads back as the HF checkpoint's own rows."""
    path, _, _ = files["gguf_llama_all"]
    hf = mx.load(str(path.parent / "hf" / "model.safetensors"))
    out = ckpt_root / "f32_llama.gguf"
    types = {m: T.F32 for m in ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj")}
    write_gguf(out, path.parent / "hf", types, T.Q8_0)
    ckpt = GGUFCheckpoint(out)
    for m in types:
        assert np.array_equal(np.array(ckpt.read(f"{m}.weight")), np.array(hf[f"{m}.weight"])), m
        # a rank's heads: rows 64..128 (heads 2-3 of hd 32)
        assert np.array_equal(np.array(ckpt.read(f"{m}.weight", 0, 64, 128)), np.array(hf[f"{m}.weight"])[64:128])
    assert np.array_equal(_permute(_unpermute(np.arange(64 * 3).reshape(64, 3), 2), 2), np.arange(64 * 3).reshape(64, 3))


@pytest.mark.parametrize("world,vocab_parallel", [(1, False), (3, False), (3, True)])
def test_gguf_sharded_equals_mlx_lm_on_converted(world, vocab_parallel, files, tmp_path):
    dirs = [files[n][1] for n in sorted(SPECS)]
    flags = ["--vocab-parallel"] if vocab_parallel else []
    mlx_launch(world, [str(__import__("equiv_rank").__file__), str(tmp_path), *map(str, dirs), *flags])
    for name in sorted(SPECS):
        _, derived, converted = files[name]
        got = np.load(tmp_path / f"{derived.name}.npz")
        want_logits, want_tokens = oracle(converted)
        err = float(np.max(np.abs(got["logits"] - want_logits)))
        assert err < 1e-3, f"{name} world {world}: max |logit diff| {err}"
        assert got["tokens"].tolist() == want_tokens, f"{name} world {world}: greedy tokens differ"
        if name == "gguf_llama3_rope":  # float32 weights: mlx-lm on the HF checkpoint, its own rope_scaling
            hf_logits, hf_tokens = oracle(files[name][0].parent / "hf")
            err = float(np.max(np.abs(got["logits"] - hf_logits)))
            assert err < 1e-4 and got["tokens"].tolist() == hf_tokens, f"{name} world {world}: {err}"
        for r in range(world):
            facts = json.loads((tmp_path / f"{derived.name}.rank{r}.json").read_text())
            assert facts["k_proj_is_own_heads"], facts


def test_derived_directory_has_tokenizer_template_and_config(files):
    _, derived, converted = files["gguf_llama_all"]
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    hf = files["gguf_llama_all"][0].parent / "hf"
    ours, theirs = load_tokenizer(derived), load_tokenizer(hf)
    text = "The quick brown fox jumps over the lazy dog. Numbers: 0 1 2 100."
    assert ours.encode(text) == theirs.encode(text)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    assert ours.apply_chat_template(msgs, add_generation_prompt=True) == \
        theirs.apply_chat_template(msgs, add_generation_prompt=True)
    cfg = json.loads((derived / "config.json").read_text())
    q = cfg["quantization"]
    assert q["model.embed_tokens"] == {"group_size": 32, "bits": 8, "mode": "affine"}
    assert q["model.layers.1.mlp.gate_proj"] is False  # F32 matrix
    assert cfg["tie_word_embeddings"] is False


def test_unsupported_type_and_architecture_are_refused(files, ckpt_root):
    import gguf

    hf = files["gguf_llama_all"][0].parent / "hf"
    bad = ckpt_root / "iq4.gguf"
    w = gguf.GGUFWriter(str(bad), "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 18 * 8), np.uint8), raw_dtype=T.IQ4_NL)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(UserError, match=r"token_embd.weight is IQ4_NL, which has no MLX mapping"):
        GGUFCheckpoint(bad)
    other = ckpt_root / "gemma.gguf"
    w = gguf.GGUFWriter(str(other), "gemma")
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    proc = subprocess.run([sys.executable, "-m", "mlx_kvshard", "plan", "--model", str(other), "--world", "2"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "GGUF architecture 'gemma' is not supported" in proc.stderr, proc.stderr
    del hf


def test_plan_takes_a_gguf_file(files):
    path = files["gguf_llama_all"][0]
    proc = subprocess.run([sys.executable, "-m", "mlx_kvshard", "plan", "--model", str(path), "--world", "3",
                           "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["world"] == 3 and plan["quantization_overrides"]["model.embed_tokens"]["bits"] == 8


def test_sentencepiece_vocabulary(tmp_path):
    """A SentencePiece-style vocabulary (tokenizer.ggml.model llama: ▁ pieces, scores, byte
    fallback tokens): BOS prepended as the file says, words whole, text back on decode."""
    import gguf
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    from mlx_kvshard.models.gguf.metadata import GGUFModel

    pieces = ["▁", "h", "e", "l", "o", "w", "r", "d", "▁h", "ll", "llo", "ello", "▁hello", "▁w", "or",
              "orl", "orld", "▁world"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    path = tmp_path / "sp.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    out = tmp_path / "tok"
    eog = GGUFModel(path).write_tokenizer(out)
    assert eog == [2]
    tok = load_tokenizer(out)
    ids = tok.encode("hello world")
    assert ids == [1, tokens.index("▁hello"), tokens.index("▁world")], [tokens[i] for i in ids]
    assert tok.decode(ids[1:]) == "hello world"


def test_llama3_rope_scaling_recovered_from_rope_freqs(files):
    """llama.cpp writes llama3 scaling only as rope_freqs.weight: the derived and converted
    configs carry mlx-lm's rope_scaling again (the HF checkpoint's own values), and the scaling
    changes the model (so the sharded runs against the HF oracle test it)."""
    from mlx_kvshard.models.gguf.rope import llama3_rope_scaling

    path, derived, converted = files["gguf_llama3_rope"]
    want = SPECS["gguf_llama3_rope"][0]["rope_scaling"]
    for d in (derived, converted):
        assert json.loads((d / "config.json").read_text())["rope_scaling"] == want, d
    plain = path.parent / "plain"
    if not (plain / "config.json").exists():
        plain.mkdir()
        for f in (path.parent / "hf").iterdir():
            (plain / f.name).write_bytes(f.read_bytes())
        cfg = json.loads((plain / "config.json").read_text())
        del cfg["rope_scaling"]
        (plain / "config.json").write_text(json.dumps(cfg))
    assert float(np.max(np.abs(oracle(plain)[0] - oracle(path.parent / "hf")[0]))) > 1e-2
    # Llama 3.1 8B and 3.2 1B (theta 500000, head_dim 128/64) come back as released
    for hd, factor in ((128, 8.0), (64, 32.0)):
        sc = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192}
        cfg = {"rope_theta": 500000.0, "hidden_size": hd * 4, "num_attention_heads": 4, "rope_scaling": sc}
        assert llama3_rope_scaling(rope_freqs(cfg).astype(np.float64), 500000.0, hd, path) == sc
    assert llama3_rope_scaling(np.ones(8), 10000.0, 16, path) is None


def test_rope_freqs_not_llama3_is_refused(files, ckpt_root):
    hf = files["gguf_llama3_rope"][0].parent / "hf"
    bad = ckpt_root / "rope_other.gguf"
    write_gguf(bad, hf, {}, T.F32)
    import gguf

    reader = gguf.GGUFReader(bad, "r+")  # same layout, factors no llama3 parameters give
    t = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
    t.data[:] = np.linspace(1.0, 3.0, t.data.size, dtype=np.float32)
    reader.data.flush()
    del reader
    proc = subprocess.run([sys.executable, "-m", "mlx_kvshard", "plan", "--model", str(bad), "--world", "2"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "rope_freqs.weight (8 factors, head_dim 16) is not llama3 rope scaling; not implemented" in proc.stderr, \
        proc.stderr
