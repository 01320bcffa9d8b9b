"""Power-of-two (logarithmic) weight quantization: multiplications become shifts on a device.

Each weight is a sign and an exponent relative to the largest magnitude `m` of its row (or
group): `w ~ sign * m * 2^-e`. A `bits`-bit code is one sign bit `s` and a `(bits-1)`-bit
exponent field `f` in `0..2^(bits-1)-1`: `code = s * 2^(bits-1) + f`. With `zero_code` the top
exponent value `f = 2^(bits-1)-1` is reserved to mean 0 (for either sign), so exponents run
`0..2^(bits-1)-2`; without it there is no zero and tiny weights snap to the smallest level.

Rounding is in the log domain: `e = round(log2(m / |w|))` clipped to the exponent range, so
the decision point between `2^-e` and `2^-(e+1)` is their geometric mean. With `zero_code`, a
weight becomes 0 when `|w| / m < 2^-(e_max+1)`, the linear midpoint between 0 and the smallest
level. The result is expressed as a codebook (`codebook[code] = (-1)^s 2^-f` or 0) with
`scales = m`, so the harness dequantizes it like any other plugin.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from qbench import LayerStats, QuantizedTensor, Quantizer, QuantizerConfig, expand_groups, group_reduce, hookimpl


def codebook(bits: int, zero_code: bool) -> np.ndarray:
    """Value of every code: sign bit on top, exponent field below."""
    half = 1 << (bits - 1)
    field = np.arange(half)
    magnitude = np.exp2(-field.astype(np.float64))
    if zero_code:
        magnitude[-1] = 0.0
    return np.concatenate([magnitude, -magnitude]).astype(np.float32)


class LogScaleQuantizer(Quantizer):
    name = "logscale"
    description = "Power-of-two weights: sign + exponent relative to the row/group max"

    class Config(QuantizerConfig):
        bits: int = Field(4, ge=2, le=8, description="bits per code: 1 sign bit + (bits-1) exponent bits")
        granularity: Literal["channel", "group"] = Field("channel", description="what one max scale covers")
        group_size: int = Field(128, ge=1, description="input columns per scale when granularity='group'")
        zero_code: bool = Field(True, description="reserve the smallest exponent code for an exact zero")

    config: Config

    def quantize(self, weight: np.ndarray, stats: LayerStats | None) -> QuantizedTensor:
        cfg = self.config
        bits = cfg.bits
        half = 1 << (bits - 1)
        w = weight.astype(np.float64)
        in_f = w.shape[1]
        absw = np.abs(w)
        group_size: int | None = None
        if cfg.granularity == "channel" or cfg.group_size >= in_f:
            m = absw.max(axis=1, keepdims=True)
            per_col = m
        else:
            group_size = cfg.group_size
            m = group_reduce(absw, group_size, np.max)
            per_col = expand_groups(m, group_size, in_f)
        e_max = half - 2 if cfg.zero_code else half - 1
        safe_m = np.where(per_col > 0, per_col, 1.0)
        ratio = absw / safe_m
        with np.errstate(divide="ignore"):
            e = np.clip(np.rint(-np.log2(ratio)), 0, e_max).astype(np.int16)
        if cfg.zero_code:
            e[ratio < 2.0 ** -(e_max + 1)] = half - 1
        sign = (w < 0).astype(np.int16)
        codes = sign * half + e
        return QuantizedTensor(
            codes=codes.astype(np.uint8),
            code_bits=bits,
            scales=m,
            group_size=group_size,
            codebook=codebook(bits, cfg.zero_code),
            signed=False,
        )


@hookimpl
def qbench_register_quantizers() -> list[type[Quantizer]]:
    return [LogScaleQuantizer]
