"""Low-rank error correction that wraps any quantizer's output: `W ~ deq(Q) + U V`.

ZeroQuant-V2's LoRC (arXiv 2303.08302) takes the rank-r truncated SVD of the quantization
error `E = W - deq(Q)`; LQER (arXiv 2402.02446) scales E by the input activations' magnitude
before the SVD, so the correction spends its rank where the layer's inputs are large. With
calibration statistics the harness goes one step further and minimises the layer's output
error on the calibration inputs exactly: with `X^T X = L L^T` (Cholesky, damped),

    min_{rank(C) <= r} || (E - C) X^T ||_F  =  || (E - C) L ||_F

is solved by the truncated SVD of `E L`, mapped back with `L^{-1}` (Eckart-Young on the
whitened error; QERA, arXiv 2410.06040, derives the same solution). Without statistics (a
calibration-free plugin) it is LoRC's plain SVD.

It runs in the harness at quantize time, on the plugin's validated output: no plugin code
is involved, and any plugin can be wrapped (`qbench run --lowrank RANK`). The factors are
stored at the declared precision and the correction runs beside the quantized product as
`(x V^T) U^T`, counted in the compute report (`lowrank_macs`) and in the layer's bytes.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from qbench.quant.contract import (
    LayerStats,
    LowRankDtype,
    QuantizedTensor,
    QuantizedTensorError,
    dequantize,
)

#: relative damping of X^T X before the Cholesky factorization (as GPTQ's percdamp)
DAMPING = 0.01


class LowRankCorrection(BaseModel):
    """The harness's low-rank correction of every quantized layer (part of the policy)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rank: int = Field(ge=1, le=4096, description="rank r of U [out, r] and V [r, in] (capped at min(out, in))")
    dtype: LowRankDtype = Field("float16", description="how U and V are stored: float16, or int8 with per-row scales")


def _whitening(stats: LayerStats, in_features: int) -> tuple[np.ndarray, np.ndarray] | None:
    """`(L, L^{-1})` with `L L^T = X^T X / n + damp`, or None if it cannot be factored."""
    h = np.asarray(stats.xtx, dtype=np.float64) / max(stats.n_rows, 1)
    diag = np.diag(h)
    damp = DAMPING * float(diag.mean()) if diag.size and diag.mean() > 0 else 1.0
    h = h + damp * np.eye(in_features)
    try:
        chol = np.linalg.cholesky(h)
    except np.linalg.LinAlgError:
        return None
    return chol, np.linalg.inv(chol)


def lowrank_factors(error: np.ndarray, rank: int, stats: LayerStats | None) -> tuple[np.ndarray, np.ndarray]:
    """`(U [out, r], V [r, in])` minimising `||(E - U V) L||` (or `||E - U V||` without stats)."""
    error = np.asarray(error, dtype=np.float64)
    out_f, in_f = error.shape
    rank = min(rank, out_f, in_f)
    whitening = _whitening(stats, in_f) if stats is not None else None
    target = error @ whitening[0] if whitening is not None else error
    u, sigma, vt = np.linalg.svd(target, full_matrices=False)
    # split the singular values evenly between the factors: both stay well scaled in float16/int8
    root = np.sqrt(sigma[:rank])
    big_u = u[:, :rank] * root[None, :]
    big_v = root[:, None] * vt[:rank]
    if whitening is not None:
        big_v = big_v @ whitening[1]
    return big_u.astype(np.float32), big_v.astype(np.float32)


def add_lowrank_correction(qt: QuantizedTensor, weight: np.ndarray, stats: LayerStats | None,
                           correction: LowRankCorrection) -> QuantizedTensor:
    """`qt` with the rank-r correction of its error on `weight` attached."""
    if qt.lowrank_u is not None:
        raise QuantizedTensorError("the plugin already declares a low-rank correction; the harness's --lowrank would replace it")
    error = np.asarray(weight, dtype=np.float64) - dequantize(qt).astype(np.float64)
    u, v = lowrank_factors(error, correction.rank, stats)
    return replace(qt, lowrank_u=u, lowrank_v=v, lowrank_dtype=correction.dtype)
