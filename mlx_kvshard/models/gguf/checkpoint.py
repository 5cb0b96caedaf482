"""Tensors of a GGUF file under mlx-lm's names and shapes, read slice by slice.

The file is memory-mapped by the `gguf` package's reader; a read touches only the rows (and
blocks of columns) asked for, so a rank decodes its own slices and never the whole model.
Quantized tensors appear as MLX quantized modules (`.weight` packed uint32, `.scales`,
`.biases`, group 32; quants.py); float tensors as themselves. llama.cpp's converter permutes
the rows of q and k within each head for its rotary layout (llama architecture only); reads
undo it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T

from ...errors import UserError
from . import quants
from .metadata import GGUFModel
from .rope import ROPE_FREQS

# llama.cpp tensor name (after "blk.N.") -> mlx-lm module under model.layers.N
_LAYER_MODULES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_MODULES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def hf_name(gguf_name: str) -> str | None:
    """mlx-lm's parameter name for a llama.cpp tensor name; None when we do not know it."""
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    if m and m.group(2) in _LAYER_MODULES:
        return f"model.layers.{m.group(1)}.{_LAYER_MODULES[m.group(2)]}.{m.group(3)}"
    m = re.fullmatch(r"(\w+)\.(weight|bias)", gguf_name)
    if m and m.group(1) in _GLOBAL_MODULES:
        return f"{_GLOBAL_MODULES[m.group(1)]}.{m.group(2)}"
    return None


@dataclass
class _Tensor:
    gguf_name: str
    qtype: T
    rows: int  # output features (GGUF's ne[1]); 1 for a vector
    cols: int  # input features (ne[0])
    data: np.ndarray  # memory-mapped: (rows, cols) floats or (rows, row_bytes) blocks; (cols,) vectors
    permuted_heads: int = 0  # head_dim when llama.cpp permuted the rows of this q/k tensor

    @property
    def quantized(self) -> bool:
        return self.qtype not in quants.FLOAT


def tensor_table(model: GGUFModel) -> dict:
    """Where each tensor lies in the file (from the `gguf` package's reader), so a rank can
    memory-map its slices without parsing the metadata again (49k-token vocabularies take
    seconds to parse)."""
    tensors = [[t.name, T(t.tensor_type).name, [int(n) for n in t.shape], int(t.data_offset), int(t.n_bytes)]
               for t in model.reader.tensors]
    permuted = model.arch == "llama" and any(n.endswith(("attn_q.weight", "attn_k.weight")) for n, *_ in tensors)
    return {"arch": model.arch, "head_dim": model.head_dim if permuted else 0, "tensors": tensors}


_FLOAT_DTYPES = {T.F32: np.float32, T.F16: np.float16, T.BF16: np.uint16}  # BF16: the bits, viewed in MLX


class GGUFCheckpoint:
    """The Checkpoint interface (names, shape, read) over one GGUF file."""

    def __init__(self, path: Path, model: GGUFModel | None = None, table: dict | None = None):
        """`table`: tensor_table() saved beside the derived directory; else read it from the file."""
        self.path = Path(path)
        if table is None:
            table = tensor_table(model or GGUFModel(self.path))
        self.arch = table["arch"]
        self._modules: dict[str, _Tensor] = {}  # module prefix ("model.layers.0.mlp.up_proj") -> tensor
        self._params: dict[str, tuple[str, str]] = {}  # parameter name -> (module prefix, leaf)
        raw = np.memmap(self.path, dtype=np.uint8, mode="r")
        for gname, type_name, shape, offset, n_bytes in table["tensors"]:
            if gname == ROPE_FREQS:  # not a weight: config.json's rope_scaling (metadata.py, rope.py)
                continue
            name = hf_name(gname)
            if name is None:
                raise UserError(f"{self.path}: tensor {gname} ({type_name}) has no counterpart in "
                                f"the {self.arch} model mlx-kvshard runs; this file's variant is not supported")
            qtype = T[type_name]
            if qtype not in quants.FLOAT and qtype not in quants.EXACT and qtype not in quants.REQUANTIZED:
                raise UserError(f"{self.path}: tensor {gname} is {qtype.name}, which has no MLX mapping "
                                f"(supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, "
                                f"and Q6_K/Q3_K/Q2_K requantized); use a file quantized with one of them")
            prefix, leaf = name.rsplit(".", 1)
            cols, rows = shape[0], (shape[1] if len(shape) > 1 else 1)  # GGUF order: ne[0] (columns) first
            data = raw[offset:offset + n_bytes]
            if qtype in quants.FLOAT:
                data = data.view(_FLOAT_DTYPES[qtype]).reshape(rows, cols) if len(shape) > 1 else \
                    data.view(_FLOAT_DTYPES[qtype])
            else:
                data = data.reshape(rows, n_bytes // rows)
            permuted = table["head_dim"] if (self.arch == "llama" and prefix.endswith(("q_proj", "k_proj"))) else 0
            tensor = _Tensor(gname, qtype, rows, cols, data, permuted)
            if tensor.quantized:
                if len(shape) != 2 or cols % quants.block_values(qtype):
                    raise UserError(f"{self.path}: quantized tensor {gname} has shape {shape}; "
                                    f"expected a matrix of whole {qtype.name} blocks")
                self._modules[prefix] = tensor
                for p in ("weight", "scales", "biases"):
                    self._params[f"{prefix}.{p}"] = (prefix, p)
            else:
                self._modules[name] = tensor
                self._params[name] = (name, "")
        self._last: tuple | None = None  # the last decoded slice: (key, weight, scales, biases)
        self.requantized: dict[str, float] = {}  # GGML type name -> max |error| of its requantization
        self.requantized_tensors: set[str] = set()

    # ---- what is in the file --------------------------------------------------------
    def __contains__(self, name: str) -> bool:
        return name in self._params

    def names(self) -> list[str]:
        return list(self._params)

    def module_quantizations(self) -> dict[str, tuple[int, int] | None]:
        """Every matrix module's (bits, group size) as loaded, None for a float one."""
        out = {}
        for key, t in self._modules.items():
            if t.quantized:
                out[key] = (quants.bits_of(t.qtype), quants.GROUP)
            elif t.data.ndim == 2 and key.endswith(".weight"):
                out[key.rsplit(".", 1)[0]] = None
        return out

    def ggml_types(self) -> dict[str, str]:
        return {t.gguf_name: t.qtype.name for t in self._modules.values()}

    def shape(self, name: str) -> tuple[int, ...]:
        prefix, leaf = self._params[name]
        t = self._modules[prefix]
        if not t.quantized:
            return (t.cols,) if t.data.ndim == 1 else (t.rows, t.cols)
        if leaf == "weight":
            return (t.rows, t.cols * quants.bits_of(t.qtype) // 32)
        return (t.rows, t.cols // quants.GROUP)

    # ---- reading slices ---------------------------------------------------------------
    def read(self, name: str, axis: int | None = None, start: int = 0, stop: int | None = None):
        import mlx.core as mx

        prefix, leaf = self._params[name]
        t = self._modules[prefix]
        shape = self.shape(name)
        rows, cols = (0, t.rows), (0, t.cols)
        if axis is not None:
            stop = shape[axis] if stop is None else stop
            if axis == 0:
                rows = (start, stop)
            elif t.quantized:  # packed words or groups -> values
                per = 32 / quants.bits_of(t.qtype) if leaf == "weight" else quants.GROUP
                cols = (int(start * per), int(stop * per))
            else:
                cols = (start, stop)
        if not t.quantized:
            arr = np.asarray(t.data)
            if arr.ndim == 1:  # a bias or norm: its one axis is axis 0
                arr = arr[start:stop] if axis is not None else arr
            else:
                arr = self._unpermute(t, arr[rows[0]:rows[1], cols[0]:cols[1]], rows)
            if t.qtype == T.BF16:
                return mx.array(np.ascontiguousarray(arr)).view(mx.bfloat16)
            return mx.array(np.ascontiguousarray(arr))
        weight, scales, biases = self._decode(t, rows, cols)
        return mx.array({"weight": weight, "scales": scales, "biases": biases}[leaf])

    def _decode(self, t: _Tensor, rows: tuple[int, int], cols: tuple[int, int]):
        key = (t.gguf_name, rows, cols)
        if self._last is not None and self._last[0] == key:
            return self._last[1:]
        bits, per_block, block_bytes = quants.EXACT.get(t.qtype) or quants.REQUANTIZED[t.qtype]
        b0, b1 = cols[0] // per_block, -(-cols[1] // per_block)
        blocks = np.asarray(t.data[rows[0]:rows[1]]).reshape(rows[1] - rows[0], -1, block_bytes)[:, b0:b1]
        trim = slice(cols[0] - b0 * per_block, cols[1] - b0 * per_block)
        groups = slice(trim.start // quants.GROUP, trim.stop // quants.GROUP)
        if t.qtype in quants.EXACT:
            codes, scales, biases = quants.decode_exact(t.qtype, blocks)
            weight = quants.pack(np.ascontiguousarray(codes[:, trim]), bits)
            scales, biases = scales[:, groups], biases[:, groups]
        else:
            weight, scales, biases = self._requantize(t, blocks, trim, bits)
        weight, scales, biases = (self._unpermute(t, a, rows) for a in (weight, scales, biases))
        out = tuple(np.ascontiguousarray(a) for a in (weight, scales, biases))
        self._last = (key, *out)
        return out

    def _requantize(self, t: _Tensor, blocks: np.ndarray, trim: slice, bits: int):
        import mlx.core as mx
        from gguf import quants as gguf_quants

        values = gguf_quants.dequantize(blocks.reshape(blocks.shape[0], -1), t.qtype)[:, trim]
        x = mx.array(np.ascontiguousarray(values, dtype=np.float32))
        w, s, b = mx.quantize(x, group_size=quants.GROUP, bits=bits)
        err = float(mx.max(mx.abs(mx.dequantize(w, s, b, group_size=quants.GROUP, bits=bits) - x)))
        self.requantized[t.qtype.name] = max(err, self.requantized.get(t.qtype.name, 0.0))
        self.requantized_tensors.add(t.gguf_name)
        return np.array(w), np.array(s), np.array(b)

    @staticmethod
    def _unpermute(t: _Tensor, arr: np.ndarray, rows: tuple[int, int]) -> np.ndarray:
        """llama.cpp stores each head's rows as (head_dim/2, 2) interleaved; HF as (2, head_dim/2)."""
        hd = t.permuted_heads
        if not hd:
            return arr
        n = rows[1] - rows[0]
        assert rows[0] % hd == 0 and n % hd == 0, (t.gguf_name, rows, hd)  # slices hold whole heads
        return arr.reshape(n // hd, hd // 2, 2, *arr.shape[1:]).swapaxes(1, 2).reshape(arr.shape)

    def summary(self) -> str | None:
        """One line on the tensors that could not map exactly (None when all did)."""
        if not self.requantized:
            return None
        kinds = ", ".join(f"{k} -> {quants.bits_of(T[k])}-bit group {quants.GROUP} (max |error| {e:.3g})"
                          for k, e in sorted(self.requantized.items()))
        return (f"{self.path.name}: {len(self.requantized_tensors)} tensor(s) with 16-value sub-blocks "
                f"requantized: {kinds}")
