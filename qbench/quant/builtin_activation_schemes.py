"""qbench's own activation schemes, registered through the public hook like any plugin's.

* `absmax`: per-token absmax, symmetric, dynamic: BitNet b1.58's 8-bit activations
  (arXiv 2402.17764, eq. 3; the 1bitLLM reference's `activation_quant`: `127 / absmax` per
  token, round, clip). `--act absmax8`, `absmax6`, `absmax4` name its bit widths.
* `static`: one scale per layer input, fixed from calibration: `method=minmax` (the observed
  range, TensorRT's and PyTorch's MinMaxObserver) or `method=percentile` (clipped at the
  `percentile`-th percentile of the magnitudes, or of each tail when asymmetric, as
  TensorRT's percentile calibrator does; 99.99 by default).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from qbench.hookspecs import hookimpl
from qbench.quant.activation_scheme import (
    ActivationQuantizer,
    ActivationScheme,
    ActivationStats,
    StaticActivationScale,
    static_scale_for_range,
)
from qbench.quant.contract import QuantizerConfig


class AbsmaxPerToken(ActivationQuantizer):
    name = "absmax"
    version = "1.0"
    description = "per-token absmax, symmetric, dynamic (BitNet b1.58's A8 at bits=8)"

    class Config(QuantizerConfig):
        bits: int = Field(8, ge=2, le=8, description="bits per activation code")
        rounding: Literal["half_even", "half_away"] = "half_even"

    config: Config

    def scheme(self) -> ActivationScheme:
        return ActivationScheme(bits=self.config.bits, granularity="token", symmetric=True,
                                rounding=self.config.rounding, dynamic=True)


class StaticPerTensor(ActivationQuantizer):
    name = "static"
    version = "1.0"
    description = "one scale per layer input from calibration: min/max or percentile"

    class Config(QuantizerConfig):
        bits: int = Field(8, ge=2, le=8, description="bits per activation code")
        method: Literal["minmax", "percentile"] = "minmax"
        percentile: float = Field(99.99, gt=50, le=100, description="for method=percentile")
        symmetric: bool = Field(True, description="False: a zero point, the range [min, max] onto 0..2^b-1")

    config: Config

    def scheme(self) -> ActivationScheme:
        return ActivationScheme(bits=self.config.bits, granularity="tensor", symmetric=self.config.symmetric,
                                dynamic=False)

    def calibrate(self, layer: str, stats: ActivationStats) -> StaticActivationScale:
        c = self.config
        if c.method == "minmax":
            lo, hi = stats.min, stats.max
        elif c.symmetric:
            hi = stats.abs_quantile(c.percentile / 100)
            lo = -hi
        else:
            lo, hi = stats.quantile(1 - c.percentile / 100), stats.quantile(c.percentile / 100)
        return static_scale_for_range(lo, hi, self.scheme())


@hookimpl
def qbench_register_activation_schemes() -> list[type[ActivationQuantizer]]:
    return [AbsmaxPerToken, StaticPerTensor]
