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
_ALPHA = tuple(np.float32(c) for c in _ERF_ALPHA)
_BETA = tuple(np.float32(c) for c in _ERF_BETA)
_INV_SQRT2 = np.float32(0.7071067811865476)

# Elements per block of the element-wise kernels: the ~25 passes of the erf polynomial then
# run on three scratch buffers that stay in L2 instead of streaming (and allocating) arrays
# the size of an encoder MLP activation (9 MB per window) for every pass.
_BLOCK = 1 << 16
#: Bytes of scratch `gelu` holds per thread (four float32 blocks, even for a smaller array)
GELU_SCRATCH_BYTES = 4 * 4 * _BLOCK


def _erf_block(x: np.ndarray, p: np.ndarray, q: np.ndarray, x2: np.ndarray) -> np.ndarray:
    """erf of the 1-D float32 `x` into `p`, using `q` and `x2` as scratch (all the same size);
    `x` is clipped in place. The same float32 operations in the same order as `erf`."""
    np.clip(x, -4.0, 4.0, out=x)
    np.multiply(x, x, out=x2)
    np.multiply(x2, _ALPHA[0], out=p)
    p += _ALPHA[1]
    for c in _ALPHA[2:]:
        p *= x2
        p += c
    p *= x
    np.multiply(x2, _BETA[0], out=q)
    q += _BETA[1]
    for c in _BETA[2:]:
        q *= x2
        q += c
    p /= q
    return p


def erf(x: np.ndarray) -> np.ndarray:
    """Error function of a float32 array (max abs error about 1e-7)."""
    x = np.array(x, dtype=np.float32)  # a copy: the kernel clips in place
    out = np.empty_like(x)
    flat_x, flat_out = x.reshape(-1), out.reshape(-1)
    q, x2 = np.empty(_BLOCK, np.float32), np.empty(_BLOCK, np.float32)
    for i in range(0, flat_x.size, _BLOCK):
        n = min(_BLOCK, flat_x.size - i)
        _erf_block(flat_x[i : i + n], flat_out[i : i + n], q[:n], x2[:n])
    return out


def gelu(x: np.ndarray, out: np.ndarray | None = None, threads: int = 1) -> np.ndarray:
    """Exact (erf) GELU, as torch.nn.GELU() computes it: x * (1 + erf(x / sqrt 2)) / 2.

    `out=x` computes in place (no allocation beyond four block-sized scratch buffers per
    thread). `threads` > 1 splits the array into that many spans computed in parallel, each
    element the same float32 operations as on one thread.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    if out is None:
        out = np.empty_like(x)
    flat_x, flat_out = x.reshape(-1), out.reshape(-1)

    def span(bounds: tuple[int, int]) -> None:
        t, p, q, x2 = (np.empty(_BLOCK, np.float32) for _ in range(4))
        for i in range(bounds[0], bounds[1], _BLOCK):
            n = min(_BLOCK, bounds[1] - i)
            xb = flat_x[i : i + n]
            tb = np.multiply(xb, _INV_SQRT2, out=t[:n])
            y = _erf_block(tb, p[:n], q[:n], x2[:n])
            y += 1.0
            y *= xb
            np.multiply(y, 0.5, out=flat_out[i : i + n])

    size = flat_x.size
    # whole blocks per span; small arrays are not worth a thread
    per_thread = -(-(-(-size // _BLOCK)) // max(1, threads)) * _BLOCK
    spans = [(i, min(i + per_thread, size)) for i in range(0, size, per_thread)] if size else []
    if threads > 1 and len(spans) > 1:
        from qbench.models.parallel import parallel_map

        parallel_map(span, spans, threads)
    else:
        for bounds in spans:
            span(bounds)
    return out


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax, in place on a float32 array the caller owns."""
    x -= x.max(axis=axis, keepdims=True)
    np.exp(x, out=x)
    x /= x.sum(axis=axis, keepdims=True)
    return x


def log_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Log-probabilities of logits `x`, computed in float64 (differences of near-equal logits
    matter for KL divergences) and returned as float32; `x` is not modified."""
    z = np.asarray(x, dtype=np.float64)
    z = z - z.max(axis=axis, keepdims=True)
    return (z - np.log(np.exp(z).sum(axis=axis, keepdims=True))).astype(np.float32)


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """LayerNorm over the last axis."""
    mean = x.mean(axis=-1, keepdims=True)
    centered = x - mean
    var = np.mean(centered * centered, axis=-1, keepdims=True)
    centered /= np.sqrt(var + eps)
    centered *= weight
    centered += bias
    return centered
