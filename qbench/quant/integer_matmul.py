"""The product an integer kernel computes: integer activations times integer weight codes.

A layer on a uniform grid (`w = s_w (c - z)` per group of input columns, ternary included) with
integer activations (`x ~ s_x a`) is, per output:

    y = s_x * sum_g s_w[g] * (sum_{i in g} a_i c_i  -  z[g] * sum_{i in g} a_i)

The inner sums are integer multiply-accumulates (int8 x int4, int8 x ternary, ...) and are
computed exactly: as float32 GEMMs over column chunks short enough that no partial sum can
reach 2^24 (where float32 stops representing every integer), whatever order BLAS adds in, then
added in float64. The rescaling is float64, in a fixed order. So the result is what an integer
kernel with exact (int32) accumulators gives, and it does not depend on threads or batching.
`integer_accumulators` exposes the exact integer sums for tests against a plain int64 reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qbench.quant.packing import PackedTensor

#: every integer up to this is a float32
F32_EXACT = 2**24


@dataclass(frozen=True)
class IntegerWeights:
    """One uniform-grid layer as an integer kernel holds it."""

    #: `[in, out]` float32 holding the integer codes (stored code minus offset)
    codes_t: np.ndarray
    #: `[groups, out]` float64 weight scales
    scales: np.ndarray
    #: `[groups, out]` float64 zero points (integers, or HQQ's float ones), or None
    zeros: np.ndarray | None
    #: input columns per group (the last may be shorter)
    group_size: int
    #: largest |code|
    max_code: int

    @property
    def groups(self) -> list[tuple[int, int]]:
        in_f = self.codes_t.shape[0]
        return [(g, min(g + self.group_size, in_f)) for g in range(0, in_f, self.group_size)]


def runs_on_integers(pt: PackedTensor | None) -> bool:
    """True for a packed layer on a uniform grid (codes times scales); codebook layers (scalar,
    and vector ones, which always have a codebook) and float layers are multiplied in float (a
    lookup-table kernel)."""
    return pt is not None and pt.codebook is None


def integer_weights(pt: PackedTensor) -> IntegerWeights:
    """The integer codes, scales and zero points of a uniform-grid packed layer."""
    if not runs_on_integers(pt):
        raise ValueError("a codebook layer has no integer codes to multiply")
    out_f, in_f = pt.shape
    codes = pt._codes_range(0, pt.numel).reshape(out_f, in_f)
    one_group = pt.group_size is None or pt.scales.shape[1] == 1
    group_size = in_f if one_group else int(pt.group_size)
    n_groups = -(-in_f // group_size)

    def per_group(v: np.ndarray) -> np.ndarray:
        v = np.asarray(v, dtype=np.float64)
        return np.ascontiguousarray(np.broadcast_to(v, (out_f, n_groups)).T)

    return IntegerWeights(
        codes_t=np.ascontiguousarray(codes.T, dtype=np.float32),
        scales=per_group(pt.scales),
        zeros=None if pt.zeros is None else per_group(pt.zeros),
        group_size=group_size,
        max_code=int(np.abs(codes).max()) if codes.size else 0,
    )


def _chunk(w: IntegerWeights, max_operand: int) -> int:
    """Columns per float32 GEMM with every partial sum below 2^24."""
    return max(1, F32_EXACT // max(1, max_operand * max(1, w.max_code)))


def integer_accumulators(a: np.ndarray, w: IntegerWeights, max_operand: int) -> list[np.ndarray]:
    """Per group, the exact `sum_{i in g} a_i c_i` as float64 `[rows, out]` (`a` is `[rows, in]`)."""
    step = _chunk(w, max_operand)
    sums = []
    for g0, g1 in w.groups:
        acc = None
        for c0 in range(g0, g1, step):
            c1 = min(g1, c0 + step)
            part = (a[:, c0:c1] @ w.codes_t[c0:c1]).astype(np.float64)
            acc = part if acc is None else acc + part
        sums.append(acc)
    return sums


def integer_linear(a: np.ndarray, s: np.ndarray, w: IntegerWeights, max_operand: int) -> np.ndarray:
    """float32 `s_x * sum_g s_w (acc_g - z_g A_g)` over the last axis of `a` (any leading shape);
    `s` broadcasts against `a`'s leading axes with a trailing 1."""
    lead = a.shape[:-1]
    a2 = a.reshape(-1, a.shape[-1])
    y = np.zeros((a2.shape[0], w.codes_t.shape[1]), dtype=np.float64)
    for i, ((g0, g1), acc) in enumerate(zip(w.groups, integer_accumulators(a2, w, max_operand), strict=True)):
        if w.zeros is not None:
            acc -= w.zeros[i] * a2[:, g0:g1].sum(axis=1, dtype=np.float64)[:, None]
        acc *= w.scales[i]
        y += acc
    y = y.reshape(*lead, -1)
    y *= np.broadcast_to(np.asarray(s, dtype=np.float64), (*lead, 1))
    return y.astype(np.float32)
