"""NormalFloat (NF4 and its k-bit siblings): QLoRA's information-theoretic codebook for normal weights.

Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs" (arXiv 2305.14314), section 3
and appendix E (the 16 NF4 values). Written after bitsandbytes' `create_normal_map` and
`quantize_4bit` (bitsandbytes-foundation/bitsandbytes, bitsandbytes/functional.py).

Pretrained weights are close to zero-mean normal, so a codebook whose levels sit at equal-mass
quantiles of N(0, 1) spends its codes where the weights are. `create_normal_map` builds it from
two halves so that 0 is exact (padding and pruned weights quantize without error):
`2^(k-1)` positive levels `ppf(linspace(offset, 0.5, 2^(k-1) + 1)[:-1])`, `2^(k-1) - 1` negative
ones `-ppf(linspace(offset, 0.5, 2^(k-1))[:-1])`, and 0, all divided by the largest so the
table spans [-1, 1]. bitsandbytes only ships k = 4 with `offset = 0.9677083`, which is
`1 - (1/(2*15) + 1/(2*16)) / 2`: the mean of the centre of the outermost of 15 and of 16
equal-mass bins (the two halves have 2^k - 1 and 2^k quantile bins). This module uses the same
formula with 15 -> 2^k - 1 and 16 -> 2^k for the other widths, which reproduces the published
NF4 table to 1e-7 at k = 4.

Weights are scaled as in `quantize_4bit`: the absolute maximum of each block of `group_size`
weights (QLoRA's block size is 64) maps to +-1 and each weight takes the nearest level (the
CUDA kernel's decision tree compares against midpoints, which is the same). Blocks here are
`group_size` input columns of one row, the contract's groups; bitsandbytes' blocks of the
flattened tensor are the same when the row length is a multiple of the block. QLoRA's double
quantization of the absmax values is not needed: the harness stores scales as float16. The codes
are computed against the float16-rounded scales, so they are the nearest levels of the weight
the harness actually stores.
"""

from __future__ import annotations

from statistics import NormalDist

import numpy as np
from pydantic import Field

from qbench import (
    LayerStats,
    QuantizedTensor,
    Quantizer,
    QuantizerConfig,
    expand_groups,
    group_reduce,
    hookimpl,
)


def normal_float_offset(bits: int) -> float:
    """The outermost quantile of the k-bit table: 0.9677083 at 4 bits (see the module docstring)."""
    k = 1 << bits
    return 1.0 - (1.0 / (2 * (k - 1)) + 1.0 / (2 * k)) / 2


def normal_float_codebook(bits: int, offset: float | None = None) -> np.ndarray:
    """The sorted `2^bits` NormalFloat levels in [-1, 1], with 0 exact, as `create_normal_map`
    builds them (`use_extra_value=True`: one more positive level than negative)."""
    if offset is None:
        offset = normal_float_offset(bits)
    half = 1 << (bits - 1)
    ppf = NormalDist().inv_cdf  # the standard library's inverse CDF; no scipy needed
    positive = [ppf(p) for p in np.linspace(offset, 0.5, half + 1)[:-1]]
    negative = [-ppf(p) for p in np.linspace(offset, 0.5, half)[:-1]]
    values = np.sort(np.array(positive + [0.0] + negative, dtype=np.float64))
    return values / values.max()


def nearest_level(x: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Index of the nearest of the sorted `levels` for each `x` (ties go to the upper level)."""
    midpoints = (levels[1:] + levels[:-1]) / 2
    return np.searchsorted(midpoints, x, side="right").astype(np.uint8)


class NF4Quantizer(Quantizer):
    name = "nf4"
    description = "QLoRA NormalFloat codebook (normal quantiles, exact 0) with absmax scale per block"

    class Config(QuantizerConfig):
        bits: int = Field(4, ge=2, le=8, description="bits per code: a NormalFloat table of 2^bits levels (4 = QLoRA's NF4)")
        group_size: int | None = Field(
            64, ge=1, description="input columns sharing one absmax scale (QLoRA's block size is 64); null = one per output row"
        )

    config: Config

    def quantize(self, weight: np.ndarray, stats: LayerStats | None) -> QuantizedTensor:
        bits, g = self.config.bits, self.config.group_size
        in_f = weight.shape[1]
        if g is not None and g >= in_f:
            g = None  # a block as wide as the row is one scale per row: record it that way
        w = weight.astype(np.float64)
        absmax = group_reduce(np.abs(w), g, np.max)
        # an all-zero block gets scale 1: its codes all point at the exact 0 level
        absmax = np.where(absmax > 0, absmax, 1.0)
        scales = absmax.astype(np.float16).astype(np.float64)
        # a block too small for float16 keeps its true scale: the harness's underflow check
        # then names it, instead of codes computed by dividing by 0
        scales = np.where(scales > 0, scales, absmax)
        levels = normal_float_codebook(bits)
        codes = nearest_level(w / expand_groups(scales, g, in_f), levels)
        return QuantizedTensor(codes=codes, code_bits=bits, scales=scales, group_size=g, codebook=levels, signed=False)


@hookimpl
def qbench_register_quantizers() -> list[type[Quantizer]]:
    return [NF4Quantizer]
