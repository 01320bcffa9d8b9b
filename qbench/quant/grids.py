"""The uniform grid and per-group bookkeeping most quantizers need, so a plugin does not re-derive them.

Groups follow the dequantization contract (`qbench.quant.contract`): group `g` spans input
columns `[g * group_size, (g + 1) * group_size)` of a weight `[out, in]`, the last group may be
shorter and still counts as a group, and `group_size=None` is one group over the whole row.
Per-group parameters are `[rows, n_groups]` arrays, which is also the shape
`QuantizedTensor.scales` and `zeros` take.

Everything is float64 and elementwise once the group reductions (exact max/min) are done, so
a grid computed for all groups at once equals the grid computed one group at a time.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from qbench.quant.contract import n_groups_for


def column_groups(in_features: int, group_size: int | None) -> list[slice]:
    """The input-column slice of every group, in order."""
    width = in_features if group_size is None else group_size
    return [slice(start, min(start + width, in_features)) for start in range(0, in_features, width)]


def group_reduce(w: np.ndarray, group_size: int | None, reduce: Callable[..., np.ndarray]) -> np.ndarray:
    """`[rows, n_groups]`: `reduce(w[:, group], axis=1)` for each group of input columns of `w`."""
    return np.stack([reduce(w[:, cols], axis=1) for cols in column_groups(w.shape[1], group_size)], axis=1)


def expand_groups(params: np.ndarray | None, group_size: int | None, in_features: int) -> np.ndarray | None:
    """Per-group `params` `[rows, n_groups]` repeated along the input axis: `[rows, in_features]`.

    None stays None (a symmetric grid has no zero points).
    """
    if params is None:
        return None
    params = np.asarray(params)
    if params.shape[1] != n_groups_for(in_features, group_size):
        raise ValueError(f"{params.shape[1]} groups do not cover {in_features} columns with group_size={group_size}")
    col_group = np.zeros(in_features, dtype=np.intp) if group_size is None else np.arange(in_features) // group_size
    return params[:, col_group]


def uniform_grid(
    w: np.ndarray, bits: int, symmetric: bool, group_size: int | None = None, full_range: bool = False
) -> tuple[np.ndarray, np.ndarray | None]:
    """Per-row, per-group `(scales, zeros)` of a uniform `bits`-bit grid fitted to `w` `[rows, in]`.

    symmetric   `scale = max|w| / (2^(b-1) - 1)` and no zero point (`zeros` is None). The codes
                use the restricted range `-(2^(b-1) - 1)..2^(b-1) - 1` (4 bits: -7..7): the most
                negative code is never used, so `+max|w|` and `-max|w|` are both exact.
                With `full_range` every one of the 2^b codes is used, as AutoGPTQ's symmetric
                grid does: `scale = 2 max|w| / (2^b - 1)` and codes `-2^(b-1)..2^(b-1) - 1`
                (3 bits: 8 levels instead of 7, which matters most where levels are few).
    asymmetric  `[min(w, 0), max(w, 0)]` split into `2^b - 1` steps, `scale = (hi - lo) / (2^b - 1)`,
                integer zero point `z = clip(round(-lo / scale), 0, 2^b - 1)`. Including 0 in the
                range keeps an exact zero representable (as GPTQ's reference does).

    A row (or group) that is entirely zero gets scale 1, so its codes are exactly the zero point.
    """
    w = np.asarray(w).astype(np.float64, copy=False)
    if symmetric:
        levels = ((1 << bits) - 1) / 2 if full_range else (1 << (bits - 1)) - 1
        scale = group_reduce(np.abs(w), group_size, np.max) / levels
        scale[scale == 0] = 1.0
        return scale, None
    maxq = (1 << bits) - 1
    lo = np.minimum(group_reduce(w, group_size, np.min), 0.0)
    hi = np.maximum(group_reduce(w, group_size, np.max), 0.0)
    scale = (hi - lo) / maxq
    scale[scale == 0] = 1.0
    return scale, np.clip(np.rint(-lo / scale), 0, maxq)


def grid_codes(w: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, bits: int,
               full_range: bool = False) -> np.ndarray:
    """int16 codes of `w` rounded to the nearest point of the grid `(scale, zero)`.

    `scale` and `zero` broadcast against `w` (e.g. `expand_groups(scales, ...)` for a whole
    weight, or one group's column `scales[:, j]` for one input column `w[:, i]`). Symmetric
    codes (`zero` None) are clipped to the restricted range `uniform_grid` describes, or with
    `full_range` to `-2^(b-1)..2^(b-1) - 1`.
    """
    q = np.rint(w / scale)
    if zero is None:
        qmax = (1 << (bits - 1)) - 1
        return np.clip(q, -qmax - 1 if full_range else -qmax, qmax).astype(np.int16)
    return np.clip(q + zero, 0, (1 << bits) - 1).astype(np.int16)


def grid_values(codes: np.ndarray, scale: np.ndarray, zero: np.ndarray | None) -> np.ndarray:
    """The float64 weights `codes` stand for on the grid `(scale, zero)`: `(codes - zero) * scale`.

    The same formula the harness dequantizes with, in float64, for quantizers that feed the
    rounding error back into the weights still to be quantized (GPTQ).
    """
    return codes * scale if zero is None else (codes - zero) * scale
