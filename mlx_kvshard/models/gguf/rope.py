"""llama3 rope scaling back from a GGUF file's `rope_freqs.weight`.

llama.cpp's converter writes no `rope.scaling.*` metadata for llama3 scaling; it stores the
per-pair factors by which the base wavelengths are multiplied (1 for high frequencies,
`factor` for low ones, a smooth blend between; convert_hf_to_gguf.py, LlamaModel). Those
factors depend on `factor` and on the two threshold wavelengths `orig/high_freq_factor` and
`orig/low_freq_factor` only, so we recover them as mlx-lm's `rope_scaling` with
`low_freq_factor` 1 (Llama 3.x files come back as their own 8192/1/4), check that the
recomputed factors equal the file's, and refuse anything else.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ...errors import UserError

ROPE_FREQS = "rope_freqs.weight"  # llama.cpp's tensor of llama3 factors
RTOL = 1e-5  # the file holds float32 factors computed in float32


def llama3_factors(wavelengths: np.ndarray, factor: float, low: float, high: float, orig: float) -> np.ndarray:
    """llama.cpp's (and mlx-lm's Llama3RoPE's) factor per rotary pair."""
    smooth = (orig / wavelengths - low) / (high - low)
    medium = 1.0 / ((1.0 - smooth) / factor + smooth)
    return np.where(wavelengths < orig / high, 1.0, np.where(wavelengths > orig / low, factor, medium))


def llama3_rope_scaling(factors: np.ndarray, base: float, head_dim: int, path: Path) -> dict | None:
    """mlx-lm's rope_scaling reproducing `factors`; None when every factor is 1."""
    refuse = (f"{path}: rope_freqs.weight ({factors.size} factors, head_dim {head_dim}) is not llama3 rope "
              f"scaling; not implemented for GGUF files: convert the original HF checkpoint with mlx_lm.convert")
    if factors.size != head_dim // 2 or not np.all(np.isfinite(factors)) or np.min(factors) <= 0:
        raise UserError(refuse)
    if np.allclose(factors, 1.0, rtol=0, atol=RTOL):
        return None
    wavelengths = 2 * math.pi * base ** (np.arange(0, head_dim, 2) / head_dim)
    factor = float(np.max(factors))
    candidates = [(1.0, 4.0, 8192.0)]  # every Llama 3.x release
    s = (1 / factors - 1 / factor) / (1 - 1 / factor)  # the blend weight of the medium pairs
    medium = (factors > 1 + RTOL) & (factors < factor * (1 - RTOL))
    if medium.sum() >= 2:  # s = (orig/wavelength - 1) / (high - 1): a line in 1/wavelength
        slope, intercept = np.polyfit(1 / wavelengths[medium], s[medium], 1)
        if intercept < 0:
            high, orig = float(1 - 1 / intercept), float(-slope / intercept)
            # the fit from float32 factors is off in the 6th digit: the round values first
            candidates += [(1.0, round(high, d), float(round(orig))) for d in (2, 4, 6)] + [(1.0, high, orig)]
    for low, high, orig in candidates:
        if high > low and np.allclose(llama3_factors(wavelengths, factor, low, high, orig), factors, rtol=RTOL, atol=0):
            return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
                    "original_max_position_embeddings": int(orig) if orig == int(orig) else orig}
    raise UserError(refuse)
