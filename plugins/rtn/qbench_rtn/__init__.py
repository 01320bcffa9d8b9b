"""Round-to-nearest (RTN) uniform weight quantization: the baseline every other method must beat.

Grid per row (and per group of `group_size` input columns, if set), with `b = bits`:

* symmetric: `scale = max|w| / (2^(b-1) - 1)`, `code = clip(round(w / scale), -(2^(b-1) - 1),
  2^(b-1) - 1)`, stored as signed `b`-bit codes. The range is the restricted, zero-centred one
  (4 bits: -7..7): the most negative code -2^(b-1) is never used, so `+max|w|` and `-max|w|`
  are both exact and nothing is clipped.
* asymmetric: the range `[min(w, 0), max(w, 0)]` is split into `2^b - 1` steps,
  `scale = (hi - lo) / (2^b - 1)`, integer zero point `z = clip(round(-lo / scale), 0, 2^b - 1)`,
  `code = clip(round(w / scale) + z, 0, 2^b - 1)`, dequantized as `(code - z) * scale`.
  Including 0 in the range keeps an exact zero representable (as GPTQ's reference does).

A row (or group) that is entirely zero gets scale 1 so its codes are exactly the zero point.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from qbench.hookspecs import hookimpl
from qbench.quant.contract import LayerStats, QuantizedTensor, Quantizer

__version__ = "0.1.0"


def grid(w: np.ndarray, bits: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Per-row `(scale, zero)` for `w` `[rows, cols]`; `zero` is None when symmetric."""
    w = w.astype(np.float64, copy=False)
    if symmetric:
        qmax = (1 << (bits - 1)) - 1
        scale = np.abs(w).max(axis=1) / qmax
        scale[scale == 0] = 1.0
        return scale, None
    maxq = (1 << bits) - 1
    lo = np.minimum(w.min(axis=1), 0.0)
    hi = np.maximum(w.max(axis=1), 0.0)
    scale = (hi - lo) / maxq
    scale[scale == 0] = 1.0
    zero = np.clip(np.rint(-lo / scale), 0, maxq)
    return scale, zero


def to_codes(w: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, bits: int) -> np.ndarray:
    """Codes of `w` `[rows, cols]` on the grid `(scale, zero)` given per row."""
    q = np.rint(w / scale[:, None])
    if zero is None:
        qmax = (1 << (bits - 1)) - 1
        return np.clip(q, -qmax, qmax).astype(np.int16)
    return np.clip(q + zero[:, None], 0, (1 << bits) - 1).astype(np.int16)


class RTNQuantizer(Quantizer):
    name = "rtn"
    version = __version__
    description = "Round-to-nearest uniform quantization, per channel or per group"
    needs_calibration = False

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")

        bits: int = Field(4, ge=2, le=8, description="bits per weight code")
        group_size: int | None = Field(
            128, ge=1, description="input columns sharing one scale; null = one scale per output channel"
        )
        symmetric: bool = Field(True, description="zero-centred signed grid (no zero point) vs min/max with zero point")

    config: Config

    def quantize(self, weight: np.ndarray, stats: LayerStats | None) -> QuantizedTensor:
        bits, symmetric = self.config.bits, self.config.symmetric
        out_f, in_f = weight.shape
        g = self.config.group_size
        # A group as wide as the row is per-channel; record it that way (one scale per row).
        if g is not None and g >= in_f:
            g = None
        width = in_f if g is None else g
        n_groups = -(-in_f // width)
        codes = np.empty((out_f, in_f), dtype=np.int16)
        scales = np.empty((out_f, n_groups), dtype=np.float64)
        zeros = None if symmetric else np.empty((out_f, n_groups), dtype=np.float64)
        for j in range(n_groups):
            cols = slice(j * width, min((j + 1) * width, in_f))
            scale, zero = grid(weight[:, cols], bits, symmetric)
            codes[:, cols] = to_codes(weight[:, cols].astype(np.float64), scale, zero, bits)
            scales[:, j] = scale
            if zeros is not None:
                zeros[:, j] = zero
        return QuantizedTensor(
            codes=codes, code_bits=bits, scales=scales, group_size=g, zeros=zeros, signed=symmetric
        )


@hookimpl
def qbench_register_quantizers() -> list[type[Quantizer]]:
    return [RTNQuantizer]
