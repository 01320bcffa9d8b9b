"""Ternary weights by BitNet b1.58's absmean rule (Ma et al., arXiv:2402.17764, eq. 1-3).

    gamma = mean(|W|)                                  over the tensor, a row, or a group
    codes = RoundClip(W / (gamma + eps), -1, 1)        in {-1, 0, 1}
    W ~ gamma * codes

BitNet applies this during training; used post-training, as here, it measures how much a
pretrained speech model loses when forced to 1.58 bits. Codes are stored five per byte
("trit5", 1.6 bits/weight) by default, or as 2-bit signed codes ("2bit") for targets whose
kernels cannot decode base-3.

`ternary-gptq` (`TernaryGPTQQuantizer`) is the same grid with GPTQ's error feedback (Frantar et
al., arXiv:2210.17323): the columns are rounded one at a time by the shared sweep
`qbench.quant.error_feedback.error_feedback_quantize`, each column's rounding error spread over
the columns still to come through the inverse Hessian `H = 2 X^T X / n` of the layer's
calibration inputs, so the layer's output rather than its weight is kept. It is a second
registered class rather than an `error_feedback` knob of `ternary` because `needs_calibration`
is a class attribute: the harness decides from the class, before any config is read, whether
to run calibration audio, and plain `ternary` must not need any. The grid of a group (gamma)
is fitted as GPTQ fits its uniform grid: per tensor or per channel before the sweep; per group
when the sweep reaches the group (to the error-fed weights), or before it with
`static_groups`/`act_order`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from qbench import LayerStats, QuantizedTensor, Quantizer, QuantizerConfig, hookimpl
from qbench.quant.error_feedback import error_feedback_quantize, gptq_hessian


class TernaryQuantizer(Quantizer):
    name = "ternary"
    description = "BitNet b1.58 absmean ternary {-1,0,1} x gamma, 1.6 bits/weight packed"

    class Config(QuantizerConfig):
        granularity: Literal["tensor", "channel", "group"] = Field(
            "tensor", description="what one gamma covers (BitNet: the whole tensor)"
        )
        group_size: int = Field(128, ge=1, description="input columns per gamma when granularity='group'")
        eps: float = Field(1e-5, ge=0.0, description="added to gamma before dividing (BitNet's epsilon)")
        packing: Literal["trit5", "2bit"] = Field("trit5", description="5 trits per byte, or 2-bit codes")

        @model_validator(mode="after")
        def _group_size_only_for_groups(self) -> TernaryQuantizer.Config:
            # the default is accepted anywhere: a run's recorded full config must validate again
            # (qbench verify reruns an entry from it); another value without groups is a mistake
            default = type(self).model_fields["group_size"].default
            if self.granularity != "group" and self.group_size != default:
                raise ValueError("group_size only applies with granularity='group'")
            return self

    config: Config

    def quantize(self, weight: np.ndarray, stats: LayerStats | None) -> QuantizedTensor:
        cfg = self.config
        w = weight.astype(np.float64)
        out_f, in_f = w.shape
        absw = np.abs(w)
        group_size: int | None = None
        if cfg.granularity == "tensor":
            gamma = np.full((1, 1), absw.mean())
            per_col = np.broadcast_to(gamma, (1, in_f))
        elif cfg.granularity == "channel":
            gamma = absw.mean(axis=1, keepdims=True)
            per_col = gamma
        else:
            group_size = cfg.group_size
            col_group = np.arange(in_f) // group_size
            n_groups = int(col_group[-1]) + 1
            gamma = np.zeros((out_f, n_groups))
            np.add.at(gamma.T, col_group, absw.T)
            gamma /= np.bincount(col_group, minlength=n_groups)[None, :]
            per_col = gamma[:, col_group]
        codes = np.clip(np.rint(w / (per_col + cfg.eps)), -1, 1).astype(np.int8)
        return QuantizedTensor(
            codes=codes,
            code_bits=2,
            scales=gamma,
            group_size=group_size,
            signed=True,
            packing="trit5" if cfg.packing == "trit5" else "int",
        )


@dataclass(frozen=True)
class AbsmeanTernaryGrid:
    """BitNet's grid `{-1, 0, 1} x gamma`, `gamma = mean|w|`, as a `ColumnGrid` of the sweep."""

    eps: float
    per_row: bool  # False: one gamma shared by every row (granularity 'tensor')

    def fit(self, w: np.ndarray) -> tuple[np.ndarray, None]:
        absw = np.abs(w)
        return (absw.mean(axis=1) if self.per_row else np.array([absw.mean()])), None

    def round(self, w: np.ndarray, scale: np.ndarray, zero: None) -> tuple[np.ndarray, np.ndarray]:
        codes = np.clip(np.rint(w / (scale + self.eps)), -1, 1).astype(np.int16)
        return codes, codes * scale


class TernaryGPTQQuantizer(TernaryQuantizer):
    name = "ternary-gptq"
    description = "BitNet b1.58 absmean ternary with GPTQ error feedback (needs calibration), 1.6 bits/weight packed"
    needs_calibration = True

    class Config(TernaryQuantizer.Config):
        percdamp: float = Field(0.01, ge=0.0, le=10.0, description="GPTQ dampening, as a fraction of mean(diag(H))")
        act_order: bool = Field(False, description="process columns by descending diag(H) (groups then static)")
        static_groups: bool = Field(False, description="fit every group's gamma before the sweep, to the original weights")
        block_size: int = Field(128, ge=1, description="columns per lazy batch update")

    config: Config

    def quantize(self, weight: np.ndarray, stats: LayerStats | None) -> QuantizedTensor:
        if stats is None:
            raise ValueError("ternary-gptq needs calibration statistics (LayerStats)")
        cfg = self.config
        in_f = weight.shape[1]
        if stats.xtx.shape != (in_f, in_f):
            raise ValueError(f"LayerStats.xtx has shape {stats.xtx.shape}, expected {(in_f, in_f)}")
        grid = AbsmeanTernaryGrid(cfg.eps, per_row=cfg.granularity != "tensor")
        r = error_feedback_quantize(
            weight, gptq_hessian(stats), grid, group_size=cfg.group_size if cfg.granularity == "group" else None,
            block_size=cfg.block_size, percdamp=cfg.percdamp, act_order=cfg.act_order, static_groups=cfg.static_groups,
        )
        return QuantizedTensor(
            codes=r.codes.astype(np.int8), code_bits=2, scales=r.scales, group_size=r.group_size, signed=True,
            packing="trit5" if cfg.packing == "trit5" else "int",
        )


@hookimpl
def qbench_register_quantizers() -> list[type[Quantizer]]:
    return [TernaryQuantizer, TernaryGPTQQuantizer]
