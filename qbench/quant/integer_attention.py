"""Attention on quantized operands: Q, K and V per token and head, probabilities at 8 bits.

`integer_attention` is `qbench.models.attention.attention` with every product on stored codes:
the scores are the exact integer dot products of the query and key codes (float32 holds them
exactly: |a| <= 2^(b-1) - 1 and the head width keep every partial sum below 2^24), scaled by the
two tokens' scales and 1/sqrt(dh); the softmax is float32; the probabilities are stored as
unsigned codes `round(p (2^b - 1))` (one static scale, 1/(2^b - 1), as softmax outputs lie in
[0, 1]) and multiply the values as stored (each token's codes times its scale), accumulated in
float32: with one scale per value token this product cannot be factored into integers alone.
"""

from __future__ import annotations

import numpy as np

from qbench.models.parallel import parallel_map
from qbench.quant.activation_scheme import ActivationScheme, quantize_activations
from qbench.quant.integer_matmul import F32_EXACT


def integer_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, n_head: int, scheme: ActivationScheme,
                      causal_offset: int | None = None, threads: int = 1) -> np.ndarray:
    """q `[B, Tq, D]`, k/v `[B, H, Tk, dh]`; returns `[B, Tq, D]` (see the module)."""
    b, tq, d = q.shape
    dh = d // n_head
    if scheme.max_operand**2 * dh >= F32_EXACT:
        raise ValueError(f"{scheme.bits}-bit scores over {dh} channels would not be exact in float32")
    token = scheme.model_copy(update={"granularity": "token", "symmetric": True, "dynamic": True})
    a_q, s_q = quantize_activations(q.reshape(b, tq, n_head, dh), token)  # [B, Tq, H, dh], [B, Tq, H, 1]
    a_k, s_k = quantize_activations(k, token)  # [B, H, Tk, dh], [B, H, Tk, 1]
    a_v, s_v = quantize_activations(v, token)
    levels = np.float32(2**scheme.bits - 1)
    tk = k.shape[2]
    mask = None
    if causal_offset is not None:
        mask = np.arange(tk)[None, :] > (causal_offset + np.arange(tq))[:, None]
    out = np.empty((b, tq, n_head, dh), dtype=np.float32)
    inv_sqrt = np.float32(dh**-0.5)

    def one_head(pair: tuple[int, int]) -> None:
        i, h = pair
        scores = a_q[i, :, h] @ a_k[i, h].T  # exact integers
        scores *= s_q[i, :, h] * inv_sqrt
        scores *= s_k[i, h, :, 0][None, :]
        if mask is not None:
            scores[mask] = -np.inf
        scores -= scores.max(axis=-1, keepdims=True)
        np.exp(scores, out=scores)
        scores /= scores.sum(axis=-1, keepdims=True)
        codes = np.rint(scores * levels)
        out[i, :, h] = (codes @ (a_v[i, h] * s_v[i, h])) / levels

    parallel_map(one_head, [(i, h) for i in range(b) for h in range(n_head)], threads)
    return out.reshape(b, tq, d)
