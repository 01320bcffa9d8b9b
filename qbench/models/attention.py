"""Scaled dot-product attention shared by the numpy models, in float32 and bounded memory.

The models call it through `WeightStore.attention`, naming which attention it is, so that a
store that counts a run's arithmetic sees the shapes this kernel receives; `score_block_bytes`
is what its buffers cost, for the models' memory models.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from qbench.models.activations import softmax
from qbench.models.parallel import parallel_map

#: Queries per attention block: bounds a head's `[block, Tk]` scores whatever the length
#: (a 35 s wav2vec2 utterance's full `[T, T]` is 12 MB per head, 150 MB for all heads at once).
QUERY_BLOCK = 512

#: Which attention a call is: an encoder's self-attention, the decoder's masked self-attention
#: over its cache, or the decoder's cross-attention to the audio features
AttentionKind = Literal["encoder_self", "decoder_self", "cross"]


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, n_head: int, causal_offset: int | None = None,
              threads: int = 1) -> np.ndarray:
    """Scaled dot-product attention. q `[B, Tq, D]`, k/v `[B, H, Tk, dh]` (already split).

    `causal_offset` is the position of q's first row; given, row i may see keys up to
    `causal_offset + i` (the decoder's mask while it processes several tokens at once).
    Long queries run one (utterance, head, block of queries) at a time: 2-D GEMMs reach BLAS
    speed where numpy's stacked matmul over `[B, H, T, T]` is several times slower, and a
    `[512, 1500]` score block (3 MB) stays in cache through the softmax passes and the second
    GEMM, where a whole 1500 x 1500 head (9 MB) streams from memory on every pass.
    `threads` spreads the (utterance, head) pairs over Python threads (`parallel_map`: their
    GEMMs stay on a single-threaded BLAS, so the output is the same on any thread count).
    """
    b, tq, d = q.shape
    dh = d // n_head
    q = q.reshape(b, tq, n_head, dh) * np.float32(dh**-0.5)
    if tq == 1:
        scores = q.transpose(0, 2, 1, 3) @ k.transpose(0, 1, 3, 2)  # [B, H, 1, Tk]
        softmax(scores)
        return (scores @ v).reshape(b, 1, d)
    tk = k.shape[2]
    out = np.empty((b, tq, n_head, dh), dtype=np.float32)
    block = min(tq, QUERY_BLOCK)
    mask = None
    if causal_offset is not None:
        mask = np.arange(tk)[None, :] > (causal_offset + np.arange(tq))[:, None]

    def one_head(pair: tuple[int, int]) -> None:
        i, h = pair
        k_t, v_h = k[i, h].T, v[i, h]
        scores_buf = np.empty((block, tk), dtype=np.float32)
        for q0 in range(0, tq, block):
            q1 = min(q0 + block, tq)
            scores = np.matmul(q[i, q0:q1, h], k_t, out=scores_buf[: q1 - q0])
            if mask is not None:
                scores[mask[q0:q1]] = -np.inf
            # softmax with the normalisation moved after the second GEMM: dividing the
            # [block, dh] output is 23x less work than dividing the [block, Tk] scores
            scores -= scores.max(axis=-1, keepdims=True)
            np.exp(scores, out=scores)
            denom = scores.sum(axis=-1, keepdims=True)
            head_out = scores @ v_h
            head_out /= denom
            out[i, q0:q1, h] = head_out

    parallel_map(one_head, [(i, h) for i in range(b) for h in range(n_head)], threads)
    return out.reshape(b, tq, d)


def score_block_bytes(tq: int, tk: int) -> int:
    """Bytes of the float32 `[block, tk]` score buffer one (utterance, head) holds while
    `attention` works through `tq` queries (each attention thread holds one)."""
    return 4 * min(QUERY_BLOCK, tq) * tk


def split_heads(x: np.ndarray, n_head: int) -> np.ndarray:
    """`[B, T, H * dh]` -> `[B, H, T, dh]`, contiguous (the layout `attention` takes k, v in)."""
    b, t, d = x.shape
    return np.ascontiguousarray(x.reshape(b, t, n_head, d // n_head).transpose(0, 2, 1, 3))
