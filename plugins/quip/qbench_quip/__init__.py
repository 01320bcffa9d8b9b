"""Randomized-Hadamard incoherence processing followed by GPTQ, as a qbench plugin.

QuIP# (Tseng, Chee, Sun, Kuleshov, De Sa, arXiv:2402.04396; Cornell-RelaxML/quip-sharp,
lib/algo/quip.py `incoherence_preprocess`, `RHT_W`/`RHT_H`) and QuaRot (Ashkboos et al.,
arXiv:2404.00456; spcl/QuaRot, fake_quant/gptq_utils.py, GPTQ on rotated weights) rotate a
layer by a random orthogonal `H` before rounding it: `x W^T = (x H)(W H)^T`, and the rows of
`W H` have their mass spread over many coordinates (incoherent), so a uniform grid no longer
spends its range on a few outlier input channels. Here:

1. `d = random_signs(in_features, seed)`, `H = diag(d) blockdiag(S_b) / sqrt(b)`
   (`qbench.quant.hadamard`): `b` is the largest power of two dividing `in_features`, so on
   whisper-tiny.en's 384-wide layers the Hadamard blocks are 128 wide (384 -> 128,
   1536 -> 512, conv 240 -> 16, 1152 -> 128); the signs still cover every column.
2. `W' = W H` (`hadamard_transform` on the rows of W) and the Hessian follows the input,
   `H' = H^T (2 X^T X / n) H` (the transform applied to both sides, as `RHT_H` does).
3. GPTQ on `(W', H')`: the shared sweep `qbench.quant.error_feedback.error_feedback_quantize`
   on a full-range symmetric uniform grid (all 2^b codes), in groups of 128 input columns by
   default. Incoherence removes the outliers groups exist for, so per output channel
   (`group_size=None`, as QuIP# and QuaRot) saves the scales' bytes, but on dev-clean at 3 bits
   it cut one utterance short where groups of 128 did not (the README's table), and 128 puts
   quip at the bits/weight of gptq's default, so the two differ by the rotation only.
4. The tensor declares `hadamard_signs = d`; the harness multiplies the layer's input by `H`
   at run time (the same fast transform), so `dequantize(qt) = deq(codes) H^T ~ W`.

5. `codebook="d4"` (2 bits only) rounds the rotated weight onto QuIP#'s 256-point D4 lattice
   codebook instead of the grid, 4 weights per 8-bit code, with block LDLQ (`lattice.py`);
   the tensor declares the harness's vector-codebook part (`vector_dim=4`).

Out of scope (said so in the README): QuIP#'s output-side rotation (`W -> U^T W H`, which
would need the harness to rotate the layer's output back), its 8-dimensional E8P codebook
(65536 entries: codes wider than the contract's 8 bits) and its fine-tuning between layers;
QuaRot's rotations folded into the residual stream and its activation/KV quantization.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np
from pydantic import Field, model_validator

from qbench import LayerStats, QuantizedTensor, Quantizer, hookimpl
from qbench.quant.error_feedback import (
    GPTQExtensionsConfig,
    MSEClip,
    UniformGrid,
    asymmetric_target,
    error_feedback_quantize,
    gptq_hessian,
    refit_alternating,
    refit_scales,
)
from qbench.quant.hadamard import hadamard_transform, random_signs

from qbench_quip.lattice import D4_DIM, LATTICE_SCALE, codeword_values, d4_codebook, vector_error_feedback


def rotate_hessian(h: np.ndarray, signs: np.ndarray) -> np.ndarray:
    """`H^T h H` for the randomized block-Hadamard `H` of `signs`: `h H` is the transform of
    the rows of `h`, and for a symmetric `h`, `H^T (h H) = ((h H)^T H)^T` is the transform of
    the rows of `(h H)^T`, symmetric again."""
    rotated = hadamard_transform(hadamard_transform(h, signs).T, signs)
    return (rotated + rotated.T) / 2  # float rounding only: keep it exactly symmetric for Cholesky


class QuIPQuantizer(Quantizer):
    name = "quip"
    description = "Randomized-Hadamard incoherence + GPTQ on a full-range grid (QuIP#/QuaRot style, needs calibration)"
    needs_calibration = True

    class Config(GPTQExtensionsConfig):
        bits: int = Field(4, ge=2, le=8, description="bits per weight code")
        group_size: int | None = Field(
            128, ge=1, description="input columns (of the rotated weight) sharing one scale; null = per output channel"
        )
        seed: int = Field(0, ge=0, description="seed of the random signs d of H")
        mse: bool = Field(False, description="AutoGPTQ's clipping search on each group's range (see qbench-gptq)")
        percdamp: float = Field(0.01, ge=0.0, le=10.0, description="GPTQ dampening, as a fraction of mean(diag(H'))")
        act_order: bool = Field(False, description="GPTQ's descending-diag(H') column order (incoherence flattens it)")
        block_size: int = Field(128, ge=1, description="GPTQ columns per lazy batch update")
        codebook: Literal["grid", "d4"] = Field(
            "grid", description="grid: GPTQ onto the full-range uniform grid; d4: block LDLQ onto QuIP#'s 256-point "
                                "D4 lattice codebook, 4 weights per 8-bit code (bits=2 only; group_size then sets the "
                                "scales, null = one per row as QuIP#; a layer whose input width is not a multiple "
                                "of 4, e.g. wav2vec2's first conv (10), takes the 2-bit grid)",
        )

        lattice_scale: float = Field(
            LATTICE_SCALE, gt=0.0, le=4.0,
            description="with codebook=d4: each group's scale as a multiple of the RMS of its columns when the sweep "
                        "reaches them (0.95 chosen on dev-clean; 0.83 is the optimum for an i.i.d. Gaussian)",
        )

        knobs_left_out_when_off: ClassVar[tuple[str, ...]] = (
            *GPTQExtensionsConfig.knobs_left_out_when_off, "codebook", "lattice_scale",
        )

        @model_validator(mode="after")
        def _d4_is_two_bit_ldlq(self) -> QuIPQuantizer.Config:
            if self.codebook == "d4":
                unsupported = [name for name, on in (("mse", self.mse), ("act_order", self.act_order),
                                                     ("refit_rounds", self.refit_rounds)) if on]
                if self.bits != 2:
                    raise ValueError(f"codebook=d4 is a 2-bit codebook (4 weights per 8-bit code), got bits={self.bits}")
                if unsupported:
                    raise ValueError(f"codebook=d4 does not take {', '.join(unsupported)} (grid-only knobs)")
                if self.group_size is not None and self.group_size % D4_DIM:
                    raise ValueError(f"codebook=d4 needs group_size a multiple of {D4_DIM} or null, got {self.group_size}")
            return self

    config: Config

    @property
    def wants_float_inputs(self) -> bool:
        return self.config.asym_alpha > 0.0

    def quantize(self, weight: np.ndarray, stats: LayerStats | None) -> QuantizedTensor:
        if stats is None:
            raise ValueError("quip needs calibration statistics (LayerStats)")
        cfg = self.config
        in_f = weight.shape[1]
        if stats.xtx.shape != (in_f, in_f):
            raise ValueError(f"LayerStats.xtx has shape {stats.xtx.shape}, expected {(in_f, in_f)}")
        signs = random_signs(in_f, cfg.seed)
        # the asymmetric target is W's, in the input basis dxtx is in, and is rotated with it
        w_rot = hadamard_transform(asymmetric_target(weight, stats, cfg.asym_alpha, cfg.percdamp), signs)
        h_rot = rotate_hessian(gptq_hessian(stats), signs)
        if cfg.codebook == "d4" and in_f % D4_DIM == 0:
            return self._lattice_quantize(w_rot, h_rot, signs)
        grid = UniformGrid(cfg.bits, symmetric=True, full_range=True, mse=MSEClip() if cfg.mse else None)
        r = error_feedback_quantize(
            w_rot, h_rot, grid, group_size=cfg.group_size, block_size=cfg.block_size,
            percdamp=cfg.percdamp, act_order=cfg.act_order,
        )
        if cfg.refit_scales:
            r = refit_alternating(w_rot, h_rot, grid, r, cfg.refit_rounds, block_size=cfg.block_size, percdamp=cfg.percdamp)
        return QuantizedTensor(
            codes=r.codes, code_bits=cfg.bits, scales=r.scales, group_size=r.group_size, signed=True,
            hadamard_signs=signs,
        )

    def _lattice_quantize(self, w_rot: np.ndarray, h_rot: np.ndarray, signs: np.ndarray) -> QuantizedTensor:
        cfg = self.config
        in_f = w_rot.shape[1]
        group_size = cfg.group_size if cfg.group_size is not None and cfg.group_size < in_f else None
        codebook = d4_codebook()
        codes, scales = vector_error_feedback(w_rot, h_rot, codebook, group_size=group_size,
                                              scale_multiplier=cfg.lattice_scale, percdamp=cfg.percdamp)
        if cfg.refit_scales:
            scales = refit_scales(w_rot, h_rot, codeword_values(codes, codebook), scales, None, group_size)
        return QuantizedTensor(
            codes=codes.astype(np.uint8), code_bits=8, scales=scales, group_size=group_size, codebook=codebook,
            vector_dim=D4_DIM, hadamard_signs=signs,
        )


@hookimpl
def qbench_register_quantizers() -> list[type[Quantizer]]:
    return [QuIPQuantizer]
