"""Activation functions shared by the numpy models, in float32."""

from __future__ import annotations

import numpy as np

# Eigen's `generic_fast_erf_float` rational approximation (odd numerator / even denominator in
# x, input clamped to [-4, 4]); its error is a few float32 ulps, which is what makes the numpy
# models match PyTorch's exact-erf GELU without pulling in scipy.
_ERF_ALPHA = np.array(
    [-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
     -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02],
    dtype=np.float32,
)
_ERF_BETA = np.array(
    [-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
     -1.42647390514189e-02],
    dtype=np.float32,
)


def erf(x: np.ndarray) -> np.ndarray:
    """Error function of a float32 array (max abs error about 1e-7)."""
    x = np.clip(x, -4.0, 4.0).astype(np.float32, copy=False)
    x2 = x * x
    p = np.full_like(x2, _ERF_ALPHA[0])
    for c in _ERF_ALPHA[1:]:
        p *= x2
        p += c
    p *= x
    q = np.full_like(x2, _ERF_BETA[0])
    for c in _ERF_BETA[1:]:
        q *= x2
        q += c
    return p / q


def gelu(x: np.ndarray) -> np.ndarray:
    """Exact (erf) GELU, as torch.nn.GELU() computes it: x * (1 + erf(x / sqrt 2)) / 2."""
    y = erf(x * np.float32(0.7071067811865476))
    y += 1.0
    y *= x
    y *= 0.5
    return y


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax, in place on a float32 array the caller owns."""
    x -= x.max(axis=axis, keepdims=True)
    np.exp(x, out=x)
    x /= x.sum(axis=axis, keepdims=True)
    return x


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """LayerNorm over the last axis."""
    mean = x.mean(axis=-1, keepdims=True)
    centered = x - mean
    var = np.mean(centered * centered, axis=-1, keepdims=True)
    centered /= np.sqrt(var + eps)
    centered *= weight
    centered += bias
    return centered
