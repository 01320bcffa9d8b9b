"""Half-Quadratic Quantization (HQQ): a calibration-free affine grid whose zero point is fitted
to the weights under a sparsity-promoting lp loss (p < 1).

Badri & Shaji, 2023, "Half-Quadratic Quantization of Large Machine Learning Models"
(https://mobiusml.github.io/hqq_blog/). Written after github:mobiusml/hqq,
`hqq/core/quantize.py` (`Quantizer.quantize`) and `hqq/core/optimize.py`
(`optimize_weights_proximal_legacy`, `shrink_lp_op`).

Each group of `group_size` consecutive input columns of a row (the reference's `axis=1`
layout, `W.reshape(-1, group_size)`) starts from its min/max grid: with `maxq = 2^b - 1`,
HQQ works with the *inverse* scale `s = maxq / (max - min)` and a float zero `z = -min * s`,
so `W_q = clip(round(W s + z), 0, maxq)` and `W_r = (W_q - z) / s`. It then minimises
`||W - W_r||_p^p` over `z` (scale fixed) by half-quadratic splitting: an auxiliary error `W_e`
absorbs the large (outlier) residuals, and the two sub-problems have closed forms,

    W_e <- shrink_p(W - W_r, beta)        generalised soft-thresholding, the lp proximal step
    z   <- mean_group(W_q - (W - W_e) s)   least squares in z with W_e held fixed
    beta <- kappa * beta                  annealing towards the hard constraint W_e = W - W_r

where `shrink_p(x, beta) = sign(x) relu(|x| - |x|^(p-1) / beta)`. Residuals the shrinkage zeroes
make the zero update a plain least-squares fit; the ones it keeps (the outliers) no longer pull
the grid towards them, which is why p < 1 helps where a few large weights dominate a group.
The loop stops as soon as the mean |W - W_r| over the whole tensor stops falling.

Where this departs from the reference, and why:

- On early stop the best zero seen is kept (as the reference's `optimize_weights_proximal_v2`
  does). The legacy loop measures each zero's error only after computing its successor and
  returns that successor: the update made from the zero whose error rose, never evaluated.
- `beta *= kappa` every step, as the paper and the reference did until 2025; the current legacy
  loop still reads `kappa` but no longer applies it (`kappa=1` reproduces that).
- A row whose width `group_size` does not divide gets a shorter last group (the qbench
  contract); the reference's flat reshape would let a group run across two rows instead.
- The harness stores scales and float zeros as float16. After the optimisation the scale
  `1 / s` and the zero are rounded to float16 and the codes recomputed once with the rounded
  values, so the stored model is the optimised one rather than a grid shifted by rounding
  (at 8 bits a zero near 200 is only stored to 1/8 of a step).
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from qbench import LayerStats, QuantizedTensor, Quantizer, QuantizerConfig, hookimpl

# The reference's guards (quantize.py): a near-constant group gets s = 1 (its codes are then
# all 0 and the zero carries the value); s is clamped so 1/s stays a usable half-precision scale.
_FLAT_RANGE = 1e-4
_MAX_INV_SCALE = 2e4


def shrink_lp(x: np.ndarray, beta: float, lp_norm: float) -> np.ndarray:
    """The lp shrinkage operator (reference `shrink_lp_op`): `sign(x) relu(|x| - |x|^(p-1) / beta)`.

    For p = 1 it is the soft threshold at 1/beta. For p < 1 the threshold shrinks as |x| grows,
    so small residuals go to 0 and large ones are kept almost whole.
    """
    a = np.abs(x)
    if lp_norm == 1:
        shrunk = a - 1.0 / beta
    else:
        # 0^(p-1) is inf and gives -inf, which the relu turns into the right 0
        with np.errstate(divide="ignore"):
            shrunk = a - np.power(a, lp_norm - 1) / beta
    return np.sign(x) * np.maximum(shrunk, 0.0)


class _Groups:
    """A weight `[out, in]` as groups `[out, n_groups, width]` of consecutive input columns.

    When `width` does not divide `in`, the last group is padded with zeros and `valid` masks the
    padding out of every reduction, so a short group is fitted on its own columns only.
    """

    def __init__(self, weight: np.ndarray, group_size: int | None):
        out_f, in_f = weight.shape
        width = in_f if group_size is None else min(group_size, in_f)
        n_groups = -(-in_f // width)
        pad = n_groups * width - in_f
        w = np.pad(weight, ((0, 0), (0, pad))) if pad else weight
        self.in_features = in_f
        self.w = w.reshape(out_f, n_groups, width)
        self.valid: np.ndarray | None = None
        if pad:
            self.valid = (np.arange(n_groups * width) < in_f).reshape(1, n_groups, width)
        self.counts = np.full((1, n_groups, 1), width, dtype=np.float32)
        if pad:
            self.counts[0, -1, 0] = width - pad

    def mean(self, x: np.ndarray) -> np.ndarray:
        """Per-group mean `[out, n_groups, 1]` over the group's real columns."""
        if self.valid is not None:
            x = np.where(self.valid, x, 0.0)
        return (x.sum(axis=2, keepdims=True) / self.counts).astype(np.float32)

    def mean_abs_error(self, w_r: np.ndarray) -> float:
        """Mean |W - W_r| over the tensor's real weights: the reference's early-stop criterion."""
        err = np.abs(self.w - w_r)
        if self.valid is not None:
            err = np.where(self.valid, err, 0.0)
        return float(err.sum(dtype=np.float64) / (self.w.shape[0] * self.in_features))

    def minmax(self) -> tuple[np.ndarray, np.ndarray]:
        w = self.w
        lo = w if self.valid is None else np.where(self.valid, w, np.inf)
        hi = w if self.valid is None else np.where(self.valid, w, -np.inf)
        return lo.min(axis=2, keepdims=True), hi.max(axis=2, keepdims=True)

    def flat(self, x: np.ndarray) -> np.ndarray:
        """`[out, n_groups, width]` back to `[out, in]`."""
        return x.reshape(x.shape[0], -1)[:, : self.in_features]


def minmax_grid(groups: _Groups, maxq: int) -> tuple[np.ndarray, np.ndarray]:
    """The reference's initial `(s, z)` per group: inverse scale `maxq / (max - min)`, float zero `-min s`."""
    lo, hi = groups.minmax()
    denom = hi - lo
    with np.errstate(divide="ignore"):
        s = np.where(denom <= _FLAT_RANGE, 1.0, maxq / denom)
    s = np.minimum(s, _MAX_INV_SCALE).astype(np.float32)
    return s, (-lo * s).astype(np.float32)


def reconstruct(w: np.ndarray, s: np.ndarray, z: np.ndarray, maxq: int) -> tuple[np.ndarray, np.ndarray]:
    """`(W_q, W_r)`: codes on the grid `(s, z)` and the weights they stand for."""
    w_q = np.clip(np.rint(w * s + z), 0, maxq)
    return w_q, (w_q - z) / s


def proximal_step(groups: _Groups, s: np.ndarray, z: np.ndarray, maxq: int,
                  beta: float, lp_norm: float) -> tuple[np.ndarray, np.ndarray]:
    """One half-quadratic step (reference `optimize_weights_proximal_legacy_step`).

    Returns `(W_r, z_new)`: the reconstruction on the current zero, and the zero fitted to it.
    """
    w_q, w_r = reconstruct(groups.w, s, z, maxq)
    w_e = shrink_lp(groups.w - w_r, beta, lp_norm)
    return w_r, groups.mean(w_q - (groups.w - w_e) * s)


def optimize_zero(groups: _Groups, s: np.ndarray, z: np.ndarray, maxq: int, lp_norm: float,
                  beta: float, kappa: float, iters: int) -> np.ndarray:
    """The zero after at most `iters` proximal steps, stopping (keeping the best zero) as soon
    as a step does not lower the tensor's mean |W - W_r|."""
    _, w_r = reconstruct(groups.w, s, z, maxq)
    best = groups.mean_abs_error(w_r)
    for _ in range(iters):
        _, z_new = proximal_step(groups, s, z, maxq, beta, lp_norm)
        beta *= kappa
        error = groups.mean_abs_error(reconstruct(groups.w, s, z_new, maxq)[1])
        if not error < best:
            break
        z, best = z_new, error
    return z


class HQQQuantizer(Quantizer):
    name = "hqq"
    description = "Half-Quadratic Quantization: per-group min/max grid, float zero fitted by an lp (p<1) proximal solver, no calibration"

    class Config(QuantizerConfig):
        bits: int = Field(4, ge=2, le=8, description="bits per weight code (unsigned, 0..2^bits-1)")
        group_size: int | None = Field(
            64, ge=1, description="consecutive input columns sharing one scale and zero (HQQ's usual 64); "
                                  "null = one group per output channel"
        )
        optimize: bool = Field(True, description="fit the zero points by HQQ's proximal solver; "
                                                 "false = the plain min/max grid (float zero), HQQ's starting point")
        lp_norm: float = Field(0.7, gt=0, le=1, description="p of the ||W - W_r||_p^p loss; 1 = L1 (soft threshold)")
        beta: float = Field(10.0, gt=0, description="initial half-quadratic penalty (in 1/weight units): "
                                                    "residuals below about beta^(-1/(2-p)) are treated as noise")
        kappa: float = Field(1.01, ge=1, description="beta is multiplied by kappa after every step")
        iters: int = Field(20, ge=1, le=1000, description="at most this many proximal steps (early stop on error increase)")

    config: Config

    def quantize(self, weight: np.ndarray, stats: LayerStats | None) -> QuantizedTensor:
        cfg = self.config
        maxq = (1 << cfg.bits) - 1
        g = cfg.group_size
        if g is not None and g >= weight.shape[1]:
            g = None  # a group as wide as the row is per-channel: record it that way
        groups = _Groups(np.asarray(weight, dtype=np.float32), g)
        s, z = minmax_grid(groups, maxq)
        if cfg.optimize:
            z = optimize_zero(groups, s, z, maxq, cfg.lp_norm, cfg.beta, cfg.kappa, cfg.iters)
        # Store what the harness will store (float16), then round to that exact grid.
        scales = (1.0 / s).astype(np.float16).astype(np.float32)
        zeros = z.astype(np.float16).astype(np.float32)
        codes = np.clip(np.rint(groups.w / scales + zeros), 0, maxq).astype(np.int16)
        return QuantizedTensor(codes=groups.flat(codes), code_bits=cfg.bits, scales=scales[:, :, 0],
                               group_size=g, zeros=zeros[:, :, 0])


@hookimpl
def qbench_register_quantizers() -> list[type[Quantizer]]:
    return [HQQQuantizer]
