"""GPTQ (Frantar, Ashkboos, Hoefler, Alistarh, arXiv:2210.17323) as a qbench plugin.

Quantizes the columns of `W` `[out, in]` one at a time and spreads each column's rounding error
over the not-yet-quantized columns through the inverse Hessian of the layer's reconstruction
loss, `H = 2 X^T X / n`, so the layer OUTPUT `X W^T` is preserved rather than `W` itself.
Follows the reference implementation (IST-DASLab/gptq, `GPTQ.fasterquant`):

1. dead inputs (`diag(H) == 0`) get `H_ii = 1` and their weights are zeroed;
2. optional `act_order`: columns processed by descending `diag(H)`;
3. dampening: `H += percdamp * mean(diag(H)) * I`;
4. `Hinv` = upper Cholesky factor of `H^-1`;
5. blocks of `block_size` columns: within a block, per-column rank-1 error updates; after the
   block, one lazy batch update of all later columns.

Grid: qbench's shared uniform grid (`qbench.uniform_grid`, which the `rtn` plugin also uses:
restricted symmetric `-(2^(b-1)-1)..2^(b-1)-1`, or asymmetric with an integer zero point), so
GPTQ and RTN at the same settings differ only in how codes are chosen. With groups, each group's scale is computed when the sweep reaches the
group's first column, from the weights as updated so far (the reference reads a possibly
stale copy when a group starts inside a block; here the pending updates are applied first).
With `act_order` and groups, the static-groups variant is used: all group scales are computed
up front on the original column order, so scales stay indexed by contiguous input-column
groups and the codes are simply un-permuted afterwards.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from qbench import LayerStats, QuantizedTensor, Quantizer, QuantizerConfig, grid_codes, grid_values, hookimpl, uniform_grid


def inverse_hessian_factor(h: np.ndarray) -> np.ndarray:
    """Upper Cholesky factor `U` of `H^-1` (`H^-1 = U^T U`), as the reference computes it."""
    lower = np.linalg.cholesky(h)
    lower_inv = np.linalg.inv(lower)
    h_inv = lower_inv.T @ lower_inv
    h_inv = (h_inv + h_inv.T) / 2
    return np.linalg.cholesky(h_inv).T


class GPTQQuantizer(Quantizer):
    name = "gptq"
    description = "GPTQ: Hessian-aware column-by-column quantization with error feedback (needs calibration)"
    needs_calibration = True

    class Config(QuantizerConfig):
        bits: int = Field(4, ge=2, le=8, description="bits per weight code")
        group_size: int | None = Field(
            128, ge=1, description="input columns sharing one scale; null = one scale per output channel"
        )
        symmetric: bool = Field(True, description="zero-centred signed grid vs min/max with zero point")
        percdamp: float = Field(0.01, ge=0.0, le=10.0, description="dampening, as a fraction of mean(diag(H))")
        act_order: bool = Field(False, description="process columns by descending diag(H)")
        static_groups: bool = Field(
            False, description="compute all group scales before the sweep (always on with act_order and groups)"
        )
        block_size: int = Field(128, ge=1, description="columns per lazy batch update")

    config: Config

    def quantize(self, weight: np.ndarray, stats: LayerStats | None) -> QuantizedTensor:
        if stats is None:
            raise ValueError("gptq needs calibration statistics (LayerStats)")
        cfg = self.config
        bits, symmetric = cfg.bits, cfg.symmetric
        W = weight.astype(np.float64)  # a copy: the sweep updates it in place
        out_f, in_f = W.shape
        if stats.xtx.shape != (in_f, in_f):
            raise ValueError(f"LayerStats.xtx has shape {stats.xtx.shape}, expected {(in_f, in_f)}")
        H = 2.0 * np.asarray(stats.xtx, dtype=np.float64) / max(stats.n_rows, 1)
        dead = np.diag(H) == 0
        H[dead, dead] = 1.0
        W[:, dead] = 0.0

        g = cfg.group_size if cfg.group_size is not None and cfg.group_size < in_f else None
        n_groups = 1 if g is None else -(-in_f // g)
        static = g is None or cfg.static_groups or cfg.act_order
        if static:
            scales, zeros = uniform_grid(W, bits, symmetric, g)
        else:  # each group's grid is fitted when the sweep reaches it
            scales = np.ones((out_f, n_groups))
            zeros = None if symmetric else np.zeros((out_f, n_groups))

        def set_group(j: int, cols: np.ndarray) -> None:
            scale, zero = uniform_grid(cols, bits, symmetric)
            scales[:, j] = scale[:, 0]
            if zeros is not None:
                zeros[:, j] = zero[:, 0]

        if cfg.act_order:
            perm = np.argsort(-np.diag(H), kind="stable")
            W = W[:, perm]
            H = H[perm][:, perm]
        else:
            perm = np.arange(in_f)

        H[np.diag_indices(in_f)] += cfg.percdamp * np.mean(np.diag(H))
        try:
            Hinv = inverse_hessian_factor(H)
        except np.linalg.LinAlgError as exc:
            raise ValueError(f"Hessian not positive definite ({exc}); increase percdamp") from None

        codes = np.zeros((out_f, in_f), dtype=np.int16)
        bs = cfg.block_size
        for i1 in range(0, in_f, bs):
            i2 = min(i1 + bs, in_f)
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
                    set_group(col // g, current)
                j = 0 if g is None else int(perm[col]) // g
                w = W1[:, i]
                zero = None if zeros is None else zeros[:, j]
                c = grid_codes(w, scales[:, j], zero, bits)
                codes[:, col] = c
                err = (w - grid_values(c, scales[:, j], zero)) / Hinv1[i, i]
                W1[:, i:] -= np.outer(err, Hinv1[i, i:])
                Err1[:, i] = err
            W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

        if cfg.act_order:
            codes = codes[:, np.argsort(perm)]
        return QuantizedTensor(
            codes=codes, code_bits=bits, scales=scales, group_size=g, zeros=zeros, signed=symmetric
        )


@hookimpl
def qbench_register_quantizers() -> list[type[Quantizer]]:
    return [GPTQQuantizer]
