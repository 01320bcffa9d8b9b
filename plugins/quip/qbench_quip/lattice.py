"""QuIP#'s D4 lattice codebook and the block-LDLQ sweep that rounds a rotated weight onto it.

QuIP# (Tseng et al., arXiv:2402.04396) rounds groups of weights to the points of a lattice
rather than each weight to a grid: after incoherence processing the rows of `W H` look like
i.i.d. Gaussians, and a lattice covers the Gaussian ball more tightly than the cube a scalar
grid tiles. Its 4-dimensional codebook (Cornell-RelaxML/quip-sharp, lib/codebook/latticed4.py,
"deep-hole-centered D4") is the 256 points of `D4 + (1/2, 1/2, 1/2, 1/2)` (half-integer
coordinates with an even sum) of squared norm at most 9: one 8-bit code per 4 weights, exactly
2 bits per weight. On a unit Gaussian, scaled by 0.83 it has a mean squared error of 0.103 per
coordinate against 0.119 for the best 4-level scalar grid.

The sweep is GPTQ's with a block of `d` columns in place of one column (QuIP#'s "block LDL"
form of LDLQ): the block is rounded to its nearest codeword, and the error is spread over the
columns not yet rounded through the upper Cholesky factor `U` of `H^-1`,
`W[:, later] -= E U_bb^-1 U_b,later`.
"""

from __future__ import annotations

import itertools
from functools import cache

import numpy as np

from qbench.quant.error_feedback import inverse_hessian_factor

D4_DIM = 4
#: the scale that minimises the D4 codebook's squared error on a unit Gaussian (measured, 0.80-0.86 are within 0.3 %)
D4_GAUSSIAN_SCALE = 0.83
#: quip's default scale: larger, because the sweep feeds each block's error into the columns after
#: it and widens them; chosen on dev-clean (the quip README: 0.83, 0.95 and 1.1 compared)
LATTICE_SCALE = 0.95


@cache
def d4_codebook() -> np.ndarray:
    """float32 `[256, 4]`: the half-integer points of even coordinate sum and squared norm <= 9,
    in lexicographic order (so a code means the same point on every machine)."""
    halves = (-2.5, -1.5, -0.5, 0.5, 1.5, 2.5)
    points = [p for p in itertools.product(halves, repeat=D4_DIM) if sum(p) % 2 == 0 and sum(x * x for x in p) <= 9]
    codebook = np.array(points, dtype=np.float32)
    codebook.setflags(write=False)
    return codebook


def nearest_codewords(x: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """Index of the codeword nearest each row of `x` `[n, d]` (squared Euclidean distance)."""
    c = np.asarray(codebook, dtype=np.float64)
    return np.argmin(np.sum(c * c, axis=1)[None, :] - 2.0 * (x @ c.T), axis=1)


def vector_error_feedback(
    weight: np.ndarray,
    hessian: np.ndarray,
    codebook: np.ndarray,
    *,
    group_size: int | None,
    scale_multiplier: float = D4_GAUSSIAN_SCALE,
    percdamp: float = 0.01,
) -> tuple[np.ndarray, np.ndarray]:
    """Block-LDLQ of `weight` `[out, in]` onto `scale * codebook`, with `hessian` undamped.

    Each group's scale (one per row and group of `group_size` columns; None = per row) is
    `scale_multiplier` times the RMS of the group's columns as the sweep reaches them, i.e.
    after the error of the groups before it has been fed in, as GPTQ fits each group's grid.
    Returns `(codes [out, in/d] int64, scales [out, n_groups] float64)`.
    """
    d = codebook.shape[1]
    w = np.array(weight, dtype=np.float64)
    out_f, in_f = w.shape
    if in_f % d:
        raise ValueError(f"a {d}-dimensional codebook needs in_features divisible by {d}, got {in_f}")
    size = in_f if group_size is None or group_size >= in_f else group_size
    if size % d:
        raise ValueError(f"group_size {group_size} is not a multiple of the codebook's dimension {d}")
    h = np.array(hessian, dtype=np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += percdamp * float(np.mean(np.diag(h))) * np.eye(in_f)
    u = inverse_hessian_factor(h)
    n_groups = -(-in_f // size)
    scales = np.empty((out_f, n_groups))
    codes = np.empty((out_f, in_f // d), dtype=np.int64)
    cb = np.asarray(codebook, dtype=np.float64)
    for j in range(0, in_f, d):
        if j % size == 0:
            g = j // size
            rms = np.sqrt(np.mean(w[:, j : j + size] ** 2, axis=1))
            scales[:, g] = np.where(rms > 0, scale_multiplier * rms, 1.0)
        s = scales[:, j // size][:, None]
        block = slice(j, j + d)
        idx = nearest_codewords(w[:, block] / s, cb)
        codes[:, j // d] = idx
        if j + d < in_f:
            err = w[:, block] - cb[idx] * s
            w[:, j + d :] -= err @ np.linalg.solve(u[block, block], u[block, j + d :])
    return codes, scales


def codeword_values(codes: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """float64 `[out, in]`: each code replaced by its d coordinates (before scaling)."""
    out_f = codes.shape[0]
    return np.asarray(codebook, dtype=np.float64)[codes].reshape(out_f, -1)
