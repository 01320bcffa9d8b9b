"""AWQ (Lin, Tang, Tang, Yang, Dang, Gan, Han: "AWQ: Activation-aware Weight Quantization for
LLM Compression and Acceleration", arXiv:2306.00978) as a qbench plugin.

A few input channels carry much larger activations than the rest, and the rounding error of
their weights dominates the layer's output error. AWQ scales those weight columns up before
rounding (`W diag(s)`, so they get relatively finer steps) and divides the input by `s` at run
time, `(x / s) (W diag(s))^T = x W^T`; the harness does that division (and counts it) from
`QuantizedTensor.input_scales`. Follows the reference implementation (mit-han-lab/llm-awq,
`awq/quantize/auto_scale.py` `_search_module_scale` and `awq/quantize/auto_clip.py`
`auto_clip_layer`):

1. scale search: `s = a^alpha`, clamped below at 1e-4 and normalised by
   `sqrt(max(s) min(s))`, for `alpha = i / n_grid`, `i = 0..n_grid-1`; the `alpha` with the
   lowest layer-output error wins (ties keep the smaller `alpha`). `alpha = 0` is `s = 1`, plain
   round-to-nearest on the same grid, so the chosen scales never lose to it on calibration data;
2. clip search (after scaling, on `W diag(s)` with the input `x / s`): for every row and group,
   the clamp `[-m f, m f]` (`m` = the group's max |w|) with `f = 1 - i / n_grid`,
   `i = 0..int(max_shrink n_grid) - 1` (the reference's `range`, so 1.0 down to 0.55 by default)
   that gives the lowest output error of that group; `f = 1` is tried first, so clipping never
   raises a group's error;
3. the clipped, scaled weights are rounded to the grid.

The grid is qbench's `uniform_grid`: asymmetric with an integer zero point by default (the
reference's `zero_point=True`), or symmetric (restricted, or `full_range`).

Where this differs from the reference, and why:

- activation magnitude: the reference uses the mean |x| per input channel; from `LayerStats`
  (which hold `X^T X`, not `X`) the per-channel statistic available is the RMS,
  `a = sqrt(diag(X^T X) / n_rows)`;
- loss: the reference measures the mean squared output error on sampled calibration tokens; with
  `X^T X` the output error is exact over all calibration rows,
  `||(W - W_hat) X^T||_F^2 = trace(D X^T X D^T)`, `D = W - W_hat` (same argmin: only the
  constant `1 / (n out)` differs). The clip search likewise uses each group's exact error
  `sum_rows d_G (X^T X)[G, G] d_G^T`, ignoring cross-group terms as the reference does by
  clipping groups independently;
- granularity: the reference shares one `s` over the linears that read the same input (q, k, v;
  gate and up) and folds it into the preceding LayerNorm or linear at no run-time cost; a qbench
  plugin sees one layer at a time, so every layer gets its own `s`, divided out at run time.
  The reference also skips clipping for q/k projections (`auto_clip_block`); a plugin does not
  know the layer's role, so every layer may be clipped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydantic import Field, model_validator

from qbench import (
    LayerStats,
    QuantizedTensor,
    Quantizer,
    QuantizerConfig,
    column_groups,
    expand_groups,
    grid_codes,
    grid_values,
    group_reduce,
    hookimpl,
    uniform_grid,
)

#: the reference's floor on `a^alpha` (`clamp(min=1e-4)`), so a dead input channel cannot get s = 0
MIN_SCALE = 1e-4


@dataclass(frozen=True)
class Grid:
    """The uniform grid every candidate is rounded to: the same one for the search and the result."""

    bits: int
    symmetric: bool
    group_size: int | None
    full_range: bool = False

    def fit(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """`(scales, zeros, codes)` of `w` rounded to nearest on its own per-group grid."""
        scales, zeros = uniform_grid(w, self.bits, self.symmetric, self.group_size, self.full_range)
        in_f = w.shape[1]
        codes = grid_codes(w, expand_groups(scales, self.group_size, in_f), expand_groups(zeros, self.group_size, in_f),
                           self.bits, self.full_range)
        return scales, zeros, codes

    def fake_quantize(self, w: np.ndarray) -> np.ndarray:
        """float64 weights `w` stands for after rounding: what the harness will dequantize."""
        scales, zeros, codes = self.fit(w)
        in_f = w.shape[1]
        return grid_values(codes, expand_groups(scales, self.group_size, in_f), expand_groups(zeros, self.group_size, in_f))


def output_error(d: np.ndarray, xtx: np.ndarray) -> float:
    """`||D X^T||_F^2 = trace(D X^T X D^T)`: the squared layer-output error of a weight error `D`
    summed over every calibration row, exact from the statistics alone."""
    return float(np.einsum("ij,ij->", d @ xtx, d))


def group_errors(d: np.ndarray, xtx: np.ndarray, group_size: int | None) -> np.ndarray:
    """`[out, n_groups]`: `d_G (X^T X)[G, G] d_G^T` per row and group, each group's own share of the
    output error (cross-group terms left out, as in the reference's per-group clip search)."""
    cols = column_groups(d.shape[1], group_size)
    return np.stack([np.einsum("ij,ij->i", d[:, g] @ xtx[g, g], d[:, g]) for g in cols], axis=1)


def activation_rms(stats: LayerStats) -> np.ndarray:
    """Per-input-channel RMS `sqrt(diag(X^T X) / n)` (the reference's mean |x| needs X itself)."""
    return np.sqrt(np.maximum(np.diag(stats.xtx), 0.0) / max(stats.n_rows, 1))


def candidate_scales(a: np.ndarray, alpha: float) -> np.ndarray:
    """The reference's `s = a^alpha` floored at 1e-4 and divided by `sqrt(max(s) min(s))`, so the
    scales straddle 1; rounded to float32 because that is what the harness divides the input by."""
    s = np.maximum(np.power(a, alpha), MIN_SCALE)
    s = s / np.sqrt(s.max() * s.min())
    return s.astype(np.float32).astype(np.float64)


def search_scales(w: np.ndarray, xtx: np.ndarray, a: np.ndarray, grid: Grid,
                  n_grid: int) -> tuple[np.ndarray, float, list[float]]:
    """`(s, alpha, losses)`: the scales whose rounding `W_hat = Q(W diag(s)) diag(1/s)` has the lowest
    output error over `alpha = i / n_grid`, and every candidate's error (in `alpha` order)."""
    best_s, best_alpha, best_loss = None, 0.0, np.inf
    losses = []
    for i in range(n_grid):
        alpha = i / n_grid
        s = candidate_scales(a, alpha)
        loss = output_error(w - grid.fake_quantize(w * s) / s, xtx)
        losses.append(loss)
        if loss < best_loss:  # strict: a tie keeps the smaller alpha, as the reference does
            best_s, best_alpha, best_loss = s, alpha, loss
    return best_s, best_alpha, losses


def search_clip(ws: np.ndarray, xtx_s: np.ndarray, grid: Grid, n_grid: int, max_shrink: float) -> np.ndarray:
    """`[out, n_groups]` clip bound per row and group of the scaled weights `ws` (input statistics
    `xtx_s` of `x / s`): the `m (1 - i / n_grid)` whose clamped rounding has the lowest group error."""
    org_max = group_reduce(np.abs(ws), grid.group_size, np.max)
    best_max = org_max.copy()
    best_err = np.full(org_max.shape, np.inf)
    for i in range(max(1, int(max_shrink * n_grid))):
        max_val = org_max * (1 - i / n_grid)
        bound = expand_groups(max_val, grid.group_size, ws.shape[1])
        # the error is against the unclipped weights: clipping trades range for resolution
        err = group_errors(ws - grid.fake_quantize(np.clip(ws, -bound, bound)), xtx_s, grid.group_size)
        better = err < best_err
        best_err[better] = err[better]
        best_max[better] = max_val[better]
    return best_max


class AWQQuantizer(Quantizer):
    name = "awq"
    description = "AWQ: activation-aware per-input-channel scales + clip search, then RTN (needs calibration)"
    needs_calibration = True

    class Config(QuantizerConfig):
        bits: int = Field(4, ge=2, le=8, description="bits per weight code")
        group_size: int | None = Field(
            128, ge=1, description="input columns sharing one scale; null (or >= in_features) = one scale per output channel"
        )
        symmetric: bool = Field(
            False, description="zero-centred signed grid; false = min/max with an integer zero point (the reference's)"
        )
        full_range: bool = Field(
            False, description="symmetric only: use all 2^bits signed codes (-2^(b-1)..2^(b-1)-1) instead of the restricted range"
        )
        n_grid: int = Field(20, ge=1, le=1000, description="grid points of the scale exponent alpha in [0, 1) and of the clip search")
        clip: bool = Field(True, description="search a per-group clipping range after scaling (auto_clip)")
        max_shrink: float = Field(
            0.5, ge=0.0, lt=1.0, description="clip search tries max|w| * (1 - i/n_grid) for i < max_shrink * n_grid"
        )

        @model_validator(mode="after")
        def _full_range_is_symmetric(self) -> QuantizerConfig:
            if self.full_range and not self.symmetric:
                raise ValueError("full_range applies to the symmetric grid: set symmetric=true with it")
            return self

    config: Config

    def quantize(self, weight: np.ndarray, stats: LayerStats | None) -> QuantizedTensor:
        if stats is None:
            raise ValueError("awq needs calibration statistics (LayerStats)")
        cfg = self.config
        w = weight.astype(np.float64)
        in_f = w.shape[1]
        xtx = np.asarray(stats.xtx, dtype=np.float64)
        if xtx.shape != (in_f, in_f):
            raise ValueError(f"LayerStats.xtx has shape {xtx.shape}, expected {(in_f, in_f)}")
        g = cfg.group_size if cfg.group_size is not None and cfg.group_size < in_f else None
        grid = Grid(cfg.bits, cfg.symmetric, g, cfg.full_range)

        s, _, _ = search_scales(w, xtx, activation_rms(stats), grid, cfg.n_grid)
        ws = w * s
        if cfg.clip:
            # the scaled weights meet the input x / s, whose statistics are diag(1/s) X^T X diag(1/s)
            xtx_s = xtx / np.outer(s, s)
            bound = expand_groups(search_clip(ws, xtx_s, grid, cfg.n_grid, cfg.max_shrink), g, in_f)
            ws = np.clip(ws, -bound, bound)
        scales, zeros, codes = grid.fit(ws)
        return QuantizedTensor(codes=codes, code_bits=cfg.bits, scales=scales, group_size=g, zeros=zeros,
                               signed=cfg.symmetric, input_scales=s)


@hookimpl
def qbench_register_quantizers() -> list[type[Quantizer]]:
    return [AWQQuantizer]
