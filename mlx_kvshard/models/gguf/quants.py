"""GGML block formats mapped onto MLX affine quantization (w = scale * q + bias, per group of
32 values along a row, q packed little-endian into uint32 words).

Exact where the format allows, because every such GGML block is an affine map of unsigned
codes over 32 values (or 32-value sub-blocks of a 256-value super-block):

  Q8_0  w = d * q8 (signed)        -> 8-bit, scale d, bias -128 d (codes q8 + 128)
  Q4_0  w = d * (q4 - 8)           -> 4-bit, scale d, bias -8 d
  Q4_1  w = d * q4 + m             -> 4-bit, scale d, bias m
  Q5_0  w = d * (q5 - 16)          -> 5-bit, scale d, bias -16 d
  Q5_1  w = d * q5 + m             -> 5-bit, scale d, bias m
  Q4_K  w = d sc_j * q4 - dmin m_j -> 4-bit, scale d sc_j, bias -dmin m_j (sub-block j of 32)
  Q5_K  same, 5-bit codes

Scales and biases are computed in float32 (d sc_j has up to 17 significant bits), so the
MLX weights dequantize to exactly the values of the `gguf` package's own dequantization.
Q6_K, Q3_K and Q2_K use 16-value sub-blocks, which MLX's smallest group (32) cannot hold:
they are dequantized and requantized at a wider MLX width (REQUANTIZED), error measured.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T

GROUP = 32  # every mapping here uses MLX group size 32

# type -> (MLX bits, values per GGML block, bytes per GGML block)
EXACT = {
    T.Q8_0: (8, 32, 34),
    T.Q4_0: (4, 32, 18),
    T.Q4_1: (4, 32, 20),
    T.Q5_0: (5, 32, 22),
    T.Q5_1: (5, 32, 24),
    T.Q4_K: (4, 256, 144),
    T.Q5_K: (5, 256, 176),
}
# 16-value sub-blocks: the nearest MLX width that keeps their resolution (two more bits than
# the codes, or 8), group 32
REQUANTIZED = {
    T.Q6_K: (8, 256, 210),
    T.Q3_K: (5, 256, 110),
    T.Q2_K: (4, 256, 84),
}
FLOAT = {T.F32, T.F16, T.BF16}


def bits_of(qtype: T) -> int:
    return (EXACT.get(qtype) or REQUANTIZED[qtype])[0]


def block_values(qtype: T) -> int:
    return (EXACT.get(qtype) or REQUANTIZED[qtype])[1]


def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    """The float16 at byte `at` of every block, as float32 of shape (..., 1)."""
    return blocks[..., at:at + 2].copy().view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return qs & 0x0F, qs >> 4


def _k_scales(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The eight 6-bit (scale, min) pairs packed in 12 bytes (llama.cpp's get_scale_min_k4)."""
    s = scales.astype(np.uint8)
    sc = np.empty(s.shape[:-1] + (8,), np.uint8)
    m = np.empty_like(sc)
    sc[..., :4] = s[..., 0:4] & 63
    m[..., :4] = s[..., 4:8] & 63
    sc[..., 4:] = (s[..., 8:12] & 0x0F) | ((s[..., 0:4] >> 6) << 4)
    m[..., 4:] = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    return sc.astype(np.float32), m.astype(np.float32)


def decode_exact(qtype: T, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """blocks (rows, n_blocks, block_bytes) uint8 -> (codes uint8 (rows, n_blocks * values),
    scales float32 (rows, groups), biases float32 (rows, groups)), groups of 32 values."""
    rows, nb = blocks.shape[:2]
    if qtype == T.Q8_0:
        d = _f16(blocks, 0)
        codes = (blocks[..., 2:34].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        scale, bias = d, -128 * d
    elif qtype in (T.Q4_0, T.Q4_1):
        d = _f16(blocks, 0)
        at = 2 if qtype == T.Q4_0 else 4
        lo, hi = _nibbles(blocks[..., at:at + 16])
        codes = np.concatenate([lo, hi], axis=-1)
        scale, bias = d, (-8 * d if qtype == T.Q4_0 else _f16(blocks, 2))
    elif qtype in (T.Q5_0, T.Q5_1):
        d = _f16(blocks, 0)
        at = 2 if qtype == T.Q5_0 else 4
        qh = blocks[..., at:at + 4].copy().view("<u4")  # (rows, nb, 1): bit j is value j's 5th bit
        lo, hi = _nibbles(blocks[..., at + 4:at + 20])
        j = np.arange(16, dtype=np.uint32)
        lo = lo | (((qh >> j) & 1) << 4).astype(np.uint8)
        hi = hi | (((qh >> (j + 16)) & 1) << 4).astype(np.uint8)
        codes = np.concatenate([lo, hi], axis=-1)
        scale, bias = d, (-16 * d if qtype == T.Q5_0 else _f16(blocks, 2))
    elif qtype in (T.Q4_K, T.Q5_K):
        d, dmin = _f16(blocks, 0), _f16(blocks, 2)
        sc, m = _k_scales(blocks[..., 4:16])
        scale, bias = d * sc, -(dmin * m)  # (rows, nb, 8): one per 32-value sub-block
        qs = blocks[..., 16:144] if qtype == T.Q4_K else blocks[..., 48:176]
        qs = qs.reshape(rows, nb, 4, 32)  # four chunks of 64 values: low nibbles, then high
        lo, hi = _nibbles(qs)
        if qtype == T.Q5_K:
            qh = blocks[..., 16:48][:, :, None, :]  # bit 2c / 2c+1 of byte l: value l of chunk c
            c = np.arange(4, dtype=np.uint8)[None, None, :, None]
            lo = lo | (((qh >> (2 * c)) & 1) << 4)
            hi = hi | (((qh >> (2 * c + 1)) & 1) << 4)
        codes = np.stack([lo, hi], axis=3)  # (rows, nb, 4, 2, 32): sub-blocks in order
    else:
        raise ValueError(f"{qtype.name} has no exact MLX mapping")
    return (codes.reshape(rows, -1).astype(np.uint8), scale.reshape(rows, -1).astype(np.float32),
            bias.reshape(rows, -1).astype(np.float32))


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned `bits`-bit codes (rows, cols) -> MLX's packed uint32 (rows, cols * bits / 32):
    value i of a row occupies bits [i*bits, (i+1)*bits) of the row's little-endian bit stream."""
    rows, cols = codes.shape
    if 32 % bits == 0:
        per = 32 // bits
        c = codes.reshape(rows, cols // per, per).astype(np.uint32)
        return np.bitwise_or.reduce(c << (np.arange(per, dtype=np.uint32) * bits), axis=2)
    stream = np.unpackbits(codes.reshape(rows, cols, 1), axis=2, bitorder="little")[:, :, :bits]
    return np.packbits(stream.reshape(rows, cols * bits), axis=1, bitorder="little").view("<u4")
