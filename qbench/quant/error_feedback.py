"""GPTQ's error feedback, shared by every plugin that rounds columns through the inverse Hessian.

GPTQ (Frantar, Ashkboos, Hoefler, Alistarh, arXiv:2210.17323) quantizes the columns of a weight
`W` `[out, in]` one at a time and spreads each column's rounding error over the columns not
yet quantized, through the inverse Hessian of the layer's reconstruction loss
`H = 2 X^T X / n`, so that the layer OUTPUT `X W^T` is kept rather than `W` itself. Nothing in
that sweep depends on what the grid is, so the sweep lives here once and a plugin only says
how to fit a grid to some columns and how to round one column to it (`ColumnGrid`): GPTQ on a
uniform grid, rotated GPTQ (QuIP#/QuaRot: the same sweep on `W H` with `H^T X^T X H`) and
ternary weights with error feedback all reuse it.

The sweep follows the reference `GPTQ.fasterquant` (IST-DASLab/gptq, gptq.py; AutoGPTQ's
auto_gptq/quantization/gptq.py is the same):

1. dead inputs (`diag(H) == 0`) get `H_ii = 1` and their weights are zeroed;
2. optional `act_order`: columns processed by descending `diag(H)`;
3. dampening: `H += percdamp * mean(diag(H)) * I`;
4. `Hinv` = upper Cholesky factor of `H^-1`;
5. blocks of `block_size` columns: within a block, per-column rank-1 error updates; after the
   block, one lazy batch update of all later columns (an exact reorganisation: block size
   does not change the result beyond float rounding).

Groups are consecutive input columns in the ORIGINAL order (the dequantization contract of
`qbench.quant.contract`). Without `act_order` a group's grid is fitted when the sweep reaches
its first column, to the weights as updated so far (the reference reads a copy that misses the
in-block updates when a group starts inside a block; here those pending updates are applied
first). With `static_groups`, or always with `act_order` (whose permutation would otherwise
scatter a group's columns over the sweep), every group's grid is fitted before the sweep to
the original weights, as the reference's `static_groups` does, so scales stay indexed by
contiguous column groups and the codes are simply un-permuted afterwards.

`UniformGrid` is the uniform grid of `qbench.uniform_grid` (restricted or full-range
symmetric, or asymmetric with a zero point), with AutoGPTQ's optional MSE clipping search
(auto_gptq/quantization/quantizer.py, `Quantizer.find_params` with `mse=True`): the range is
shrunk by `p = 1 - i / grid` for `i < maxshrink * grid` and, per row of each group, the `p`
with the least `sum |q(w) - w|^norm` is kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import numpy as np
from pydantic import Field, model_serializer, model_validator

from qbench.quant.contract import LayerStats, QuantizerConfig
from qbench.quant.grids import column_groups, expand_groups, grid_codes, grid_values, uniform_grid

#: `(scale, zero)` of one group: float64 `[rows]` (or `[1]`, shared by every row); zero None
#: for grids without a zero point
GroupGrid = tuple[np.ndarray, "np.ndarray | None"]


class ColumnGrid(Protocol):
    """What the sweep needs to know about a grid: fit it to a group, round a column onto it."""

    def fit(self, w: np.ndarray) -> GroupGrid:
        """The grid of one group, fitted to its columns `w` `[rows, k]` (float64)."""
        ...

    def round(self, w: np.ndarray, scale: np.ndarray, zero: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """`(codes, values)` of one column `w` `[rows]` on the group's grid: integer codes and
        the float64 weights they stand for (the error fed back is `w - values`)."""
        ...


@dataclass(frozen=True)
class MSEClip:
    """AutoGPTQ's clipping search: shrink factors `1 - i / grid` for `i < maxshrink * grid`,
    scored by `sum |q(w) - w|^norm` (norm 2.4 weighs large errors above the MSE's 2)."""

    norm: float = 2.4
    grid: int = 100
    maxshrink: float = 0.8


@dataclass(frozen=True)
class UniformGrid:
    """`qbench.uniform_grid` as a `ColumnGrid`, optionally with the MSE clipping search."""

    bits: int
    symmetric: bool = True
    full_range: bool = False
    mse: MSEClip | None = None

    def fit(self, w: np.ndarray) -> GroupGrid:
        scale, zero = uniform_grid(w, self.bits, self.symmetric, None, self.full_range)
        scale = scale[:, 0]
        zero = None if zero is None else zero[:, 0]
        if self.mse is None:
            return scale, zero
        return self._shrink(w, scale, zero)

    def _shrink(self, w: np.ndarray, scale: np.ndarray, zero: np.ndarray | None) -> GroupGrid:
        # Shrinking [lo, hi] by p scales the step by p; the reference recomputes the zero point
        # as round(-p lo / (p step)), which is the same integer, so only the scale moves.
        best = np.full(w.shape[0], np.inf)
        best_scale = scale.copy()
        for i in range(int(self.mse.maxshrink * self.mse.grid)):
            p = 1.0 - i / self.mse.grid
            trial = p * scale
            _, q = self.round(w, trial[:, None], None if zero is None else zero[:, None])
            err = np.sum(np.abs(q - w) ** self.mse.norm, axis=1)
            better = err < best  # strict: ties keep the wider range, as the reference does
            best[better] = err[better]
            best_scale[better] = trial[better]
        return best_scale, zero

    def round(self, w: np.ndarray, scale: np.ndarray, zero: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        codes = grid_codes(w, scale, zero, self.bits, self.full_range)
        return codes, grid_values(codes, scale, zero)


@dataclass
class FeedbackResult:
    """Codes in the original column order and the grid of every group.

    codes       int16 `[out, in]`
    scales      float64 `[out or 1, n_groups]`
    zeros       same shape as `scales`, or None
    group_size  None when one group spans the row (a `group_size >= in` is recorded so)
    """

    codes: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray | None
    group_size: int | None


def gptq_hessian(stats: LayerStats) -> np.ndarray:
    """GPTQ's `H = 2 X^T X / n` (float64) from the harness's calibration statistics."""
    return 2.0 * np.asarray(stats.xtx, dtype=np.float64) / max(stats.n_rows, 1)


class GPTQExtensionsConfig(QuantizerConfig):
    """Knobs a GPTQ-style plugin adds to the sweep: `asym_alpha` (`asymmetric_target`) and
    `refit_scales` (`refit_scales`). Both are off by default, and a knob left off is left out
    of the config, so entries made before it existed keep their labels and identities."""

    asym_alpha: float = Field(
        0.0, ge=0.0, le=1.0,
        description="GPTAQ's asymmetric calibration: fit the layer to the float model's output, not to its own "
                    "float weight on already-quantized inputs; 0 = off (plain GPTQ), 1 = the whole correction. "
                    "Runs the float model beside the quantized one in calibration (twice its cost)",
    )
    refit_scales: bool = Field(
        False, description="after the sweep, refit each row's scales to its final codes by least squares on the "
                           "layer's output error (one small solve per row)",
    )
    refit_rounds: int = Field(
        0, ge=0, le=8, description="with refit_scales: up to this many more sweeps on the refitted scales, each "
                                   "refitted again; the round with the least output error on the calibration data "
                                   "is kept (0 = one sweep, one refit)",
    )

    #: knobs left out of the config while at their defaults (a subclass adds its own later knobs)
    knobs_left_out_when_off: ClassVar[tuple[str, ...]] = ("asym_alpha", "refit_scales", "refit_rounds")

    @model_serializer(mode="wrap")
    def _without_knobs_left_off(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        for name in self.knobs_left_out_when_off:
            if name in data and data[name] == type(self).model_fields[name].default:
                data.pop(name)
        return data

    @model_validator(mode="after")
    def _rounds_need_refit(self) -> GPTQExtensionsConfig:
        if self.refit_rounds and not self.refit_scales:
            raise ValueError("refit_rounds needs refit_scales=true")
        return self


def asymmetric_target(weight: np.ndarray, stats: LayerStats, alpha: float, percdamp: float) -> np.ndarray:
    """The weight GPTQ should aim at so the layer's output matches the FLOAT model's (GPTAQ).

    Sequential GPTQ fits `W_q` to `X~ W^T`, the layer's float weight applied to inputs `X~`
    already perturbed by the quantized layers before it. GPTAQ (Li et al., "GPTQv2: Efficient
    Finetuning-Free Quantization with Asymmetric Calibration", arXiv:2504.02692;
    Intelligent-Computing-Lab-Yale/GPTAQ, fake_quant/gptaq_utils.py) fits it to the float
    model's own output `X W^T` instead, which also undoes part of the earlier layers' error.
    The reference folds that into the sweep (its `P = alpha (dXXT Hinv^T).triu(1) Hinv`
    term). Here it is a change of target, which is exact for the same quadratic loss: with
    `X = X~ + dX`, `||X~ W_q^T - X W^T||^2 = ||X~ (W_q - W*)^T||^2 + const` for
    `W* = W (X^T X~)(X~^T X~)^-1 = W + W dX^T X~ (X~^T X~)^-1`, so GPTQ on `(W*, H)` minimises
    it. `alpha` scales the correction as the reference's does (0: plain GPTQ, 1: the whole
    asymmetric loss; its default is 0.25), and `H` gets GPTQ's dampening before the solve, so
    a layer whose inputs did not drift (`dX = 0`) keeps `W* = W` exactly.
    """
    w = np.asarray(weight, dtype=np.float64)
    if alpha == 0.0:
        return w
    if stats.dxtx is None:
        raise ValueError("the asymmetric target needs LayerStats.dxtx (set wants_float_inputs)")
    if stats.dxtx.shape != stats.xtx.shape:
        raise ValueError(f"LayerStats.dxtx has shape {stats.dxtx.shape}, expected {stats.xtx.shape}")
    xtx = np.asarray(stats.xtx, dtype=np.float64)
    damp = percdamp * float(np.mean(np.diag(xtx)))
    if damp <= 0.0:
        damp = 1e-8 * max(float(np.max(np.abs(xtx))), 1.0)  # no dampening asked: only keep the solve defined
    correction = w @ np.asarray(stats.dxtx, dtype=np.float64)  # [out, in]
    # (W dXXT) (XtX + damp I)^-1, as a solve against the symmetric matrix
    return w + alpha * np.linalg.solve(xtx + damp * np.eye(len(xtx)), correction.T).T


def refit_scales(target: np.ndarray, h: np.ndarray, codes: np.ndarray, scales: np.ndarray,
                 zeros: np.ndarray | None, group_size: int | None, ridge: float = 1e-6) -> np.ndarray:
    """Least-squares scales for fixed codes: per row, the `s` minimising the layer's output
    error `(w - A s)^T H (w - A s)`, where column `g` of `A` holds the row's code values of
    group `g` (`codes - zeros` for a grid with zero points; zero outside the group).

    GPTQ fits each group's scale to the weights once, when its sweep reaches the group, and
    then spends the rounding error on the columns after it; at 2 bits the scale chosen then is
    far from the best one for the codes it ends with. With the codes fixed the loss is a
    quadratic in the `n_groups` scales of a row, so this is one small solve per row. A row
    whose solve is not positive keeps its old scales. `ridge` (relative to the mean diagonal
    of the solve's matrix) keeps rows with near-empty groups well posed.
    """
    w = np.asarray(target, dtype=np.float64)
    q = np.asarray(codes, dtype=np.float64)
    if zeros is not None:  # the code values the scales multiply
        q = q - expand_groups(np.asarray(zeros, dtype=np.float64), group_size, q.shape[1])
    rows, in_f = q.shape
    if np.asarray(scales).shape[0] != rows:
        raise ValueError(f"refit_scales needs one scale per row and group, got scales of shape {np.asarray(scales).shape}")
    old = np.array(scales, dtype=np.float64)
    n_groups = old.shape[1]
    size = in_f if group_size is None or n_groups == 1 else group_size
    bounds = [(g * size, min((g + 1) * size, in_f)) for g in range(n_groups)]
    wh = w @ h
    m = np.empty((rows, n_groups, n_groups))
    b = np.empty((rows, n_groups))
    for g, (a0, a1) in enumerate(bounds):
        qh = q[:, a0:a1] @ h[a0:a1]  # [rows, in]: the row's group-g codes times H
        b[:, g] = np.sum(q[:, a0:a1] * wh[:, a0:a1], axis=1)
        for k, (c0, c1) in enumerate(bounds):
            m[:, g, k] = np.sum(qh[:, c0:c1] * q[:, c0:c1], axis=1)
    diag = np.einsum("rgg->rg", m)
    m += (ridge * np.maximum(diag.mean(axis=1), 1e-30))[:, None, None] * np.eye(n_groups)
    # a group whose codes are all zero leaves its scale undetermined: keep the old one there
    empty = diag <= 0
    m[empty] = 0.0
    idx = np.nonzero(empty)
    m[idx[0], idx[1], idx[1]] = 1.0
    b[empty] = old[empty]
    new = np.linalg.solve(m, b[:, :, None])[:, :, 0]
    ok = np.all(new > 0, axis=1) & np.all(np.isfinite(new), axis=1)
    return np.where(ok[:, None], new, old)


def output_error(target: np.ndarray, h: np.ndarray, codes: np.ndarray, scales: np.ndarray,
                 zeros: np.ndarray | None, group_size: int | None) -> float:
    """`tr((W - deq) H (W - deq)^T)`: the layer-output error GPTQ's sweep and `refit_scales`
    minimise, for the dequantized `(codes - zeros) * scales` of the grouped layout."""
    in_f = codes.shape[1]
    q = np.asarray(codes, dtype=np.float64)
    if zeros is not None:
        q = q - expand_groups(np.asarray(zeros, dtype=np.float64), group_size, in_f)
    e = np.asarray(target, dtype=np.float64) - q * expand_groups(np.asarray(scales, dtype=np.float64), group_size, in_f)
    return float(np.sum((e @ h) * e))


def refit_alternating(target: np.ndarray, h: np.ndarray, grid: ColumnGrid, first: FeedbackResult, rounds: int, *,
                      block_size: int = 128, percdamp: float = 0.01) -> FeedbackResult:
    """`refit_scales` of `first`, then up to `rounds` more times: the sweep again on those
    scales (`fixed_grid`), whose codes fit them better than the ones chosen while the scales were
    still GPTQ's, and the scales refitted to the new codes. Each round is scored by
    `output_error` on the calibration Hessian `h` and the best round is returned, so the result
    is never worse there than one sweep and one refit; a round that does not improve ends it.

    Alternating codes and scales is the coordinate descent of the layer-output loss that
    refitting the scales begins (GPTQ's rounding is greedy, so a round is not guaranteed to
    lower it: hence the score).
    """
    def refit(r: FeedbackResult) -> FeedbackResult:
        scales = refit_scales(target, h, r.codes, r.scales, r.zeros, r.group_size)
        return FeedbackResult(codes=r.codes, scales=scales, zeros=r.zeros, group_size=r.group_size)

    best = refit(first)
    best_error = output_error(target, h, best.codes, best.scales, best.zeros, best.group_size)
    for _ in range(rounds):
        swept = error_feedback_quantize(target, h, grid, group_size=best.group_size, block_size=block_size,
                                        percdamp=percdamp, fixed_grid=(best.scales, best.zeros))
        candidate = refit(swept)
        error = output_error(target, h, candidate.codes, candidate.scales, candidate.zeros, candidate.group_size)
        if not error < best_error:
            break
        best, best_error = candidate, error
    return best


def inverse_hessian_factor(h: np.ndarray) -> np.ndarray:
    """Upper Cholesky factor `U` of `H^-1` (`H^-1 = U^T U`), as the reference computes it."""
    lower = np.linalg.cholesky(h)
    lower_inv = np.linalg.inv(lower)
    h_inv = lower_inv.T @ lower_inv
    h_inv = (h_inv + h_inv.T) / 2
    return np.linalg.cholesky(h_inv).T


def error_feedback_quantize(
    weight: np.ndarray,
    hessian: np.ndarray,
    grid: ColumnGrid,
    *,
    group_size: int | None = None,
    block_size: int = 128,
    percdamp: float = 0.01,
    act_order: bool = False,
    static_groups: bool = False,
    fixed_grid: tuple[np.ndarray, np.ndarray | None] | None = None,
) -> FeedbackResult:
    """GPTQ's sweep of `weight` `[out, in]` over `grid`, with `hessian` `[in, in]` undamped.

    `percdamp` dampens a copy of `hessian` (the caller's array is not changed); see the module
    docstring for dead inputs, the order of columns and when each group's grid is fitted.
    `fixed_grid`: `(scales, zeros)` `[out, n_groups]` of every group, used as given instead of
    fitted (`refit_alternating`).
    """
    W = np.array(weight, dtype=np.float64)  # a copy: the sweep updates it in place
    out_f, in_f = W.shape
    H = np.array(hessian, dtype=np.float64)
    if H.shape != (in_f, in_f):
        raise ValueError(f"Hessian has shape {H.shape}, expected {(in_f, in_f)}")
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    g = group_size if group_size is not None and group_size < in_f else None
    groups = column_groups(in_f, g)
    static = g is None or static_groups or act_order or fixed_grid is not None
    if fixed_grid is not None:
        fixed_scales, fixed_zeros = (np.asarray(a, dtype=np.float64) if a is not None else None for a in fixed_grid)
        if fixed_scales.shape != (out_f, len(groups)):
            raise ValueError(f"fixed grid scales of shape {fixed_scales.shape}, expected {(out_f, len(groups))}")
        params: list[GroupGrid | None] = [(fixed_scales[:, k], None if fixed_zeros is None else fixed_zeros[:, k])
                                          for k in range(len(groups))]
    else:
        params = [grid.fit(W[:, cols]) for cols in groups] if static else [None] * len(groups)

    if act_order:
        perm = np.argsort(-np.diag(H), kind="stable")
        W = W[:, perm]
        H = H[perm][:, perm]
    else:
        perm = np.arange(in_f)

    H[np.diag_indices(in_f)] += percdamp * np.mean(np.diag(H))
    try:
        Hinv = inverse_hessian_factor(H)
    except np.linalg.LinAlgError as exc:
        raise ValueError(f"Hessian not positive definite ({exc}); increase percdamp") from None

    codes = np.zeros((out_f, in_f), dtype=np.int16)
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        W1 = W[:, i1:i2].copy()
        Err1 = np.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if not static and col % g == 0:
                end = min(col + g, in_f)
                current = W1[:, i : min(end, i2) - i1]
                if end > i2:
                    # Later blocks have not received this block's lazy update yet.
                    pending = W[:, i2:end] - Err1[:, :i] @ Hinv[i1 : i1 + i, i2:end]
                    current = np.hstack([current, pending])
                params[col // g] = grid.fit(current)
            scale, zero = params[0 if g is None else int(perm[col]) // g]  # type: ignore[misc]
            w = W1[:, i]
            c, q = grid.round(w, scale, zero)
            codes[:, col] = c
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= np.outer(err, Hinv1[i, i:])
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    if act_order:
        codes = codes[:, np.argsort(perm)]
    scales = np.stack([np.asarray(p[0], dtype=np.float64) for p in params], axis=1)  # type: ignore[index]
    zeros = None if params[0][1] is None else np.stack([np.asarray(p[1], dtype=np.float64) for p in params], axis=1)  # type: ignore[index]
    return FeedbackResult(codes=codes, scales=scales, zeros=zeros, group_size=g)
