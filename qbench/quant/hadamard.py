"""The randomized (block-)Hadamard transform a layer may declare on its input (QuIP#, QuaRot).

A layer with `hadamard_signs` d stores codes for `W H`, where

    H = diag(d) . blockdiag(S_b, ..., S_b) / sqrt(b)

`S_b` is the `b x b` Sylvester Hadamard matrix and `b = hadamard_block(in_features)` the
largest power of two dividing `in_features` (384 -> 128, 1536 -> 512, 1024 -> 1024). `H` is
orthogonal, so `(x H)(W H)^T = x W^T`: the harness applies `x H` to the layer's input at run
time and the quantized product needs no other change. Spreading each weight row over the
block makes its entries look Gaussian (incoherent), which is what lets a uniform low-bit grid
stop wasting its range on the few outliers.

`hadamard_transform` is the fast transform (log2(b) butterfly stages of additions and
subtractions over the last axis, no multiplications but the final 1/sqrt(b)), used both for
the weights at quantize time and for the activations at run time.
"""

from __future__ import annotations

import math

import numpy as np


def hadamard_block(n: int) -> int:
    """The block size of the transform on `n` input features: the largest power of two dividing `n`."""
    if n < 1:
        raise ValueError(f"a transform needs at least one input feature, got {n}")
    return n & -n


def random_signs(n: int, seed: int) -> np.ndarray:
    """`n` random +-1 as int8, reproducible from `seed` (the `d` of `H`)."""
    return np.where(np.random.default_rng(seed).random(n) < 0.5, -1, 1).astype(np.int8)


def _butterflies(y: np.ndarray, block: int) -> np.ndarray:
    lead, n = y.shape[:-1], y.shape[-1]
    if block == 1:
        return y.copy()
    h = 1
    while h < block:
        # pairs (i, i + h) within each run of 2h: [a + c, a - c], Sylvester's ordering
        v = y.reshape(*lead, n // (2 * h), 2, h)
        a, c = v[..., 0, :], v[..., 1, :]
        y = np.stack([a + c, a - c], axis=-2).reshape(*lead, n)
        h *= 2
    return y


def _as_input(x: np.ndarray, signs: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """`x` as a floating array, the signs checked against its last axis, and the block size."""
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
    signs = np.asarray(signs)
    if signs.shape != (x.shape[-1],):
        raise ValueError(f"{signs.size} signs for an input of {x.shape[-1]} features")
    return x, signs.astype(x.dtype), hadamard_block(x.shape[-1])


def hadamard_transform(x: np.ndarray, signs: np.ndarray) -> np.ndarray:
    """`x @ H` over the last axis of `x` (float32 stays float32, float64 stays float64)."""
    x, d, block = _as_input(x, signs)
    y = _butterflies(x * d, block)
    y *= x.dtype.type(1.0 / math.sqrt(block))
    return y


def inverse_hadamard_transform(y: np.ndarray, signs: np.ndarray) -> np.ndarray:
    """`y @ H^T` over the last axis: undoes `hadamard_transform` (S_b is symmetric)."""
    y, d, block = _as_input(y, signs)
    out = _butterflies(y, block)
    out *= y.dtype.type(1.0 / math.sqrt(block))
    out *= d
    return out


def transform_additions(rows: int, n: int) -> int:
    """Additions/subtractions `hadamard_transform` performs on `rows` inputs of `n` features."""
    return rows * n * int(math.log2(hadamard_block(n)))
