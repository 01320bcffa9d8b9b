"""Round-to-nearest (RTN) uniform weight quantization: the baseline every other method must beat.

Each row, or each group of `group_size` input columns, gets its own `bits`-bit uniform grid
(`qbench.uniform_grid`) and every weight the code nearest to it. Symmetric grids use the
restricted signed range (4 bits: -7..7), so `+max|w|` and `-max|w|` are both exact; asymmetric
ones span `[min(w, 0), max(w, 0)]` with an integer zero point, so an exact 0 stays
representable. A row (or group) that is entirely zero gets scale 1.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from qbench import LayerStats, QuantizedTensor, Quantizer, QuantizerConfig, expand_groups, grid_codes, hookimpl, uniform_grid


class RTNQuantizer(Quantizer):
    name = "rtn"
    description = "Round-to-nearest uniform quantization, per channel or per group"

    class Config(QuantizerConfig):
        bits: int = Field(4, ge=2, le=8, description="bits per weight code")
        group_size: int | None = Field(
            128, ge=1, description="input columns sharing one scale; null = one scale per output channel"
        )
        symmetric: bool = Field(True, description="zero-centred signed grid (no zero point) vs min/max with zero point")

    config: Config

    def quantize(self, weight: np.ndarray, stats: LayerStats | None) -> QuantizedTensor:
        bits, symmetric, g = self.config.bits, self.config.symmetric, self.config.group_size
        in_f = weight.shape[1]
        if g is not None and g >= in_f:
            g = None  # a group as wide as the row is per-channel: record it that way (one scale per row)
        w = weight.astype(np.float64)
        scales, zeros = uniform_grid(w, bits, symmetric, g)
        codes = grid_codes(w, expand_groups(scales, g, in_f), expand_groups(zeros, g, in_f), bits)
        return QuantizedTensor(codes=codes, code_bits=bits, scales=scales, group_size=g, zeros=zeros, signed=symmetric)


@hookimpl
def qbench_register_quantizers() -> list[type[Quantizer]]:
    return [RTNQuantizer]
