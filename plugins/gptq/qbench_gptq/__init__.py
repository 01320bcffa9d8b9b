"""GPTQ (Frantar, Ashkboos, Hoefler, Alistarh, arXiv:2210.17323) as a qbench plugin.

Quantizes the columns of `W` `[out, in]` one at a time and spreads each column's rounding error
over the not-yet-quantized columns through the inverse Hessian of the layer's reconstruction
loss, `H = 2 X^T X / n`, so the layer OUTPUT `X W^T` is preserved rather than `W` itself. The
sweep is the shared `qbench.quant.error_feedback.error_feedback_quantize`, written after the
reference `GPTQ.fasterquant` (IST-DASLab/gptq, gptq.py): dead inputs, dampening, optional
act-order, upper Cholesky factor of `H^-1`, blocked lazy batch updates; its docstring says when
each group's grid is fitted (with `act_order` always before the sweep, static groups, so scales
stay indexed by contiguous input-column groups of the original order).

Grid: qbench's shared uniform grid (`qbench.uniform_grid`, which the `rtn` plugin also uses),
so GPTQ and RTN at the same settings differ only in how codes are chosen. By default it is
asymmetric, `[min(w, 0), max(w, 0)]` in 2^b - 1 steps with an integer zero point per group, the
reference's default (`--sym` is off in IST-DASLab/gptq): on dev-clean it beat every symmetric
grid at 4, 3 and 2 bits for 0.0625 bits/weight of zero points (the README's table). Symmetric:

- `full_range` uses all 2^b symmetric codes (-2^(b-1)..2^(b-1)-1, `scale = 2 max|w| / (2^b-1)`),
  the grid of the reference's and AutoGPTQ's symmetric quantizer (gptq/quant.py
  `Quantizer.find_params`: `zero = (maxq + 1) / 2`); off, the restricted grid -(2^(b-1)-1)..
  2^(b-1)-1 of `rtn` (3 bits: 7 levels instead of 8).
- `mse` is AutoGPTQ's clipping search (auto_gptq/quantization/quantizer.py, `mse=True`): each
  group's range shrunk by up to `mse_maxshrink` in `mse_grid` steps, keeping per row the
  factor with the least `sum |q(w) - w|^mse_norm`. Weight-space, as the reference: GPTQ's
  feedback then takes care of the output.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from qbench import LayerStats, QuantizedTensor, Quantizer, hookimpl
from qbench.quant.error_feedback import (
    GPTQExtensionsConfig,
    MSEClip,
    UniformGrid,
    asymmetric_target,
    refit_alternating,
    error_feedback_quantize,
    gptq_hessian,
)


class GPTQQuantizer(Quantizer):
    name = "gptq"
    description = "GPTQ: Hessian-aware column-by-column quantization with error feedback (needs calibration)"
    needs_calibration = True

    class Config(GPTQExtensionsConfig):
        bits: int = Field(4, ge=2, le=8, description="bits per weight code")
        group_size: int | None = Field(
            128, ge=1, description="input columns sharing one scale; null = one scale per output channel"
        )
        symmetric: bool = Field(
            False, description="zero-centred signed grid (no zero point) vs min/max with an integer zero point"
        )
        full_range: bool = Field(
            True, description="symmetric grid on all 2^b codes (AutoGPTQ's) instead of the restricted -(2^(b-1)-1)..2^(b-1)-1; asymmetric grids always use all 2^b"
        )
        mse: bool = Field(False, description="AutoGPTQ's per-group clipping search (shrink the range, least |error|^norm)")
        mse_norm: float = Field(2.4, gt=0.0, description="exponent of the clipping search's error")
        mse_grid: int = Field(100, ge=1, description="shrink factors are 1 - i / mse_grid")
        mse_maxshrink: float = Field(0.8, gt=0.0, lt=1.0, description="largest shrink the search tries")
        percdamp: float = Field(0.01, ge=0.0, le=10.0, description="dampening, as a fraction of mean(diag(H))")
        act_order: bool = Field(False, description="process columns by descending diag(H) (groups then static)")
        static_groups: bool = Field(
            False, description="compute all group scales before the sweep (always on with act_order and groups)"
        )
        block_size: int = Field(128, ge=1, description="columns per lazy batch update")

    config: Config

    @property
    def wants_float_inputs(self) -> bool:
        return self.config.asym_alpha > 0.0

    def quantize(self, weight: np.ndarray, stats: LayerStats | None) -> QuantizedTensor:
        if stats is None:
            raise ValueError("gptq needs calibration statistics (LayerStats)")
        cfg = self.config
        in_f = weight.shape[1]
        if stats.xtx.shape != (in_f, in_f):
            raise ValueError(f"LayerStats.xtx has shape {stats.xtx.shape}, expected {(in_f, in_f)}")
        mse = MSEClip(cfg.mse_norm, cfg.mse_grid, cfg.mse_maxshrink) if cfg.mse else None
        grid = UniformGrid(cfg.bits, cfg.symmetric, cfg.full_range and cfg.symmetric, mse)
        target, h = asymmetric_target(weight, stats, cfg.asym_alpha, cfg.percdamp), gptq_hessian(stats)
        r = error_feedback_quantize(
            target, h, grid, group_size=cfg.group_size, block_size=cfg.block_size,
            percdamp=cfg.percdamp, act_order=cfg.act_order, static_groups=cfg.static_groups,
        )
        if cfg.refit_scales:
            r = refit_alternating(target, h, grid, r, cfg.refit_rounds, block_size=cfg.block_size, percdamp=cfg.percdamp)
        return QuantizedTensor(
            codes=r.codes, code_bits=cfg.bits, scales=r.scales, group_size=r.group_size, zeros=r.zeros, signed=cfg.symmetric
        )


@hookimpl
def qbench_register_quantizers() -> list[type[Quantizer]]:
    return [GPTQQuantizer]
