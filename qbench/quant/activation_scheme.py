"""Activation quantization as data: what a scheme declares, and the rule the harness runs.

A weight quantizer hands the harness codes; an activation scheme cannot, because activations
exist only while the model runs. So a scheme plugin *declares* its rule (`ActivationScheme`:
bits, per token or per tensor, symmetric or not, rounding, dynamic or static scales) and the
harness executes it on every linear input (`quantize_activations`); no plugin code runs during
evaluation. What a static scheme computes from calibration data (one scale and zero point per
layer input) is computed by the plugin, in its own process, at quantize time
(`ActivationQuantizer.calibrate`), from statistics the harness collects (`ActivationStats`), and
stored with the quantized model.

The rule, for `b` bits (BitNet b1.58's activation quantizer, arXiv 2402.17764, eq. 1-3, is the
symmetric per-token case at b = 8):

* symmetric: `q = clip(round(x / s), -(2^(b-1) - 1), 2^(b-1) - 1)`, `s = absmax / (2^(b-1) - 1)`;
* asymmetric: `q = clip(round(x / s) + z, 0, 2^b - 1)`, `s = (max - min) / (2^b - 1)`,
  `z = round(-min / s)`;

with absmax / min / max over each token's features (dynamic per token), the whole input
(dynamic per tensor), or fixed from calibration (static). The integer a kernel multiplies is
`a = q - z` (z = 0 when symmetric); `x ~ s a`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator

from qbench.quant.contract import QuantizerConfig, validated_config

#: bins of the histograms `ActivationStats` carries (signed over [min, max], and of |x|)
HISTOGRAM_BINS = 4096


class ActivationScheme(BaseModel):
    """The rule a scheme declares; the harness executes exactly this."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bits: int = Field(ge=2, le=8, description="bits per activation code")
    granularity: Literal["token", "tensor"] = Field(description="one scale per token (row) or per layer input")
    symmetric: bool = Field(True, description="zero-centred codes (no zero point)")
    rounding: Literal["half_even", "half_away"] = Field("half_even", description="round half to even (numpy, "
                                                         "torch.round) or half away from zero (C's lround)")
    dynamic: bool = Field(True, description="scales from each input as it runs; False: one static scale per "
                                            "layer from calibration, stored with the model")

    @model_validator(mode="after")
    def _static_is_per_tensor(self) -> ActivationScheme:
        if not self.dynamic and self.granularity == "token":
            raise ValueError("a static scale cannot be per token (tokens are not known at quantize time)")
        return self

    @property
    def code_range(self) -> tuple[int, int]:
        """Smallest and largest stored code."""
        if self.symmetric:
            return -(2 ** (self.bits - 1) - 1), 2 ** (self.bits - 1) - 1
        return 0, 2**self.bits - 1

    @property
    def max_operand(self) -> int:
        """Largest |q - z| a kernel multiplies."""
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1


class StaticActivationScale(BaseModel):
    """One layer input's fixed scale and zero point (a static scheme's calibration)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    scale: float = Field(gt=0, allow_inf_nan=False)
    zero: int = 0


@dataclass(frozen=True)
class ActivationStats:
    """What the harness measured of one layer's input over the calibration pass (float64).

    `histogram` counts the values in `HISTOGRAM_BINS` equal bins over `[min, max]`,
    `abs_histogram` the magnitudes over `[0, absmax]`: enough for min/max, percentile or
    MSE-optimal clipping, without shipping the activations themselves to the plugin.
    """

    n_values: int
    min: float
    max: float
    absmax: float
    histogram: np.ndarray
    abs_histogram: np.ndarray

    def quantile(self, q: float) -> float:
        """The value below which a fraction `q` of the inputs lie (interpolated in the histogram)."""
        return _hist_quantile(self.histogram, self.min, self.max, q)

    def abs_quantile(self, q: float) -> float:
        """The magnitude below which a fraction `q` of |inputs| lie."""
        return _hist_quantile(self.abs_histogram, 0.0, self.absmax, q)


def _hist_quantile(hist: np.ndarray, lo: float, hi: float, q: float) -> float:
    cdf = np.cumsum(hist, dtype=np.float64)
    if cdf[-1] <= 0 or hi <= lo:
        return hi
    target = q * cdf[-1]
    i = int(np.searchsorted(cdf, target, side="left"))
    i = min(i, hist.size - 1)
    before = cdf[i - 1] if i > 0 else 0.0
    frac = (target - before) / hist[i] if hist[i] > 0 else 1.0
    width = (hi - lo) / hist.size
    return float(lo + (i + min(max(frac, 0.0), 1.0)) * width)


def static_scale_for_range(lo: float, hi: float, scheme: ActivationScheme) -> StaticActivationScale:
    """The scale (and zero point) that maps `[lo, hi]` onto the scheme's codes: `max(|lo|, |hi|)`
    onto `2^(b-1) - 1` when symmetric, `[min(lo, 0), max(hi, 0)]` onto `[0, 2^b - 1]` if not."""
    if scheme.symmetric:
        m = max(abs(lo), abs(hi))
        return StaticActivationScale(scale=float(np.float32(m / scheme.max_operand)) if m > 0 else 1.0)
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if hi - lo <= 0:
        return StaticActivationScale(scale=1.0)
    scale = float(np.float32((hi - lo) / (2**scheme.bits - 1)))
    return StaticActivationScale(scale=scale, zero=int(np.clip(np.rint(-lo / scale), 0, 2**scheme.bits - 1)))


class ActivationQuantizer(ABC):
    """Base class of every activation-scheme plugin (registered by `qbench_register_activation_schemes`).

    Subclasses set `name`, implement `scheme()` (the rule, as data) and, for a static scheme,
    `calibrate` (one layer input's scale from its statistics). Knobs are a nested
    `class Config(qbench.QuantizerConfig)`, as for weight quantizers.
    """

    name: ClassVar[str]
    version: ClassVar[str | None] = None
    description: ClassVar[str] = ""
    Config: ClassVar[type[BaseModel]] = QuantizerConfig

    config: BaseModel

    def __init__(self, config: BaseModel | dict[str, Any] | None = None):
        self.config = validated_config(self, config)

    @abstractmethod
    def scheme(self) -> ActivationScheme:
        """The rule the harness runs on every quantized activation."""

    def calibrate(self, layer: str, stats: ActivationStats) -> StaticActivationScale:
        """One layer input's static scale (called only when `scheme().dynamic` is False)."""
        raise NotImplementedError(f"{type(self).__name__} declares a static scheme but does not implement calibrate")


# -- the rule, as the harness runs it ------------------------------------------------------------


def _round(v: np.ndarray, rounding: str) -> np.ndarray:
    if rounding == "half_even":
        return np.rint(v, out=v)
    return np.copysign(np.floor(np.abs(v) + 0.5), v)


def quantize_activations(x: np.ndarray, scheme: ActivationScheme,
                         static: StaticActivationScale | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`(a, s)` with `a` the integer operands `q - z` (float32 holding exact integers, the
    shape of `x`) and `s` float32 scales broadcastable against it (`[..., 1]` per token,
    `[B, 1, ..., 1]` per tensor, i.e. per batch row): `x ~ s a`.

    Computed in float32 as a kernel would: `x * (1 / s)` is not used, `x / s` is, so the code of
    a value exactly on a grid point is that point."""
    x = np.asarray(x, dtype=np.float32)
    lo_code, hi_code = scheme.code_range
    # per tensor is per utterance (every axis but the batch's): a scale shared across a batch
    # would make one utterance's transcript depend on the others
    axis = -1 if scheme.granularity == "token" else (tuple(range(1, x.ndim)) if x.ndim > 1 else None)
    if static is not None:
        shape = (1,) * x.ndim
        s = np.full(shape, static.scale, dtype=np.float32)
        z = np.float32(static.zero)
    elif scheme.symmetric:
        m = np.max(np.abs(x), axis=axis, keepdims=True) if x.size else np.zeros((1,) * x.ndim, np.float32)
        s = m / np.float32(hi_code)
        s[s == 0] = 1.0  # an all-zero token: any scale gives zero codes
        z = np.float32(0)
    else:
        lo = np.minimum(np.min(x, axis=axis, keepdims=True), 0)
        hi = np.maximum(np.max(x, axis=axis, keepdims=True), 0)
        s = (hi - lo) / np.float32(hi_code)
        s[s == 0] = 1.0
        z = np.clip(_round(-lo / s, scheme.rounding), 0, hi_code).astype(np.float32)
    v = x / s
    v = _round(v, scheme.rounding)
    if not scheme.symmetric:
        v += z
    np.clip(v, lo_code, hi_code, out=v)
    if not scheme.symmetric:
        v -= z
    return v.astype(np.float32, copy=False), s.astype(np.float32, copy=False)


def fake_quantize(x: np.ndarray, scheme: ActivationScheme, static: StaticActivationScale | None = None) -> np.ndarray:
    """`s a`: the float32 value a quantized activation stands for."""
    a, s = quantize_activations(x, scheme, static)
    return a * s


def collect_stats(chunks: list[np.ndarray]) -> ActivationStats:
    """`ActivationStats` of the values of `chunks` (one layer's calibration inputs)."""
    flat = [np.asarray(c, dtype=np.float32).reshape(-1) for c in chunks]
    lo = float(min(f.min() for f in flat))
    hi = float(max(f.max() for f in flat))
    absmax = max(abs(lo), abs(hi))
    hist = np.zeros(HISTOGRAM_BINS, dtype=np.float64)
    abs_hist = np.zeros(HISTOGRAM_BINS, dtype=np.float64)
    for f in flat:
        if hi > lo:
            hist += np.histogram(f, bins=HISTOGRAM_BINS, range=(lo, hi))[0]
        else:
            hist[-1] += f.size
        if absmax > 0:
            abs_hist += np.histogram(np.abs(f), bins=HISTOGRAM_BINS, range=(0.0, absmax))[0]
        else:
            abs_hist[0] += f.size
    return ActivationStats(n_values=int(sum(f.size for f in flat)), min=lo, max=hi, absmax=absmax,
                           histogram=hist, abs_histogram=abs_hist)


# -- what a run asks for and what it records ----------------------------------------------------


def _without_false_attention(data: dict[str, Any]) -> dict[str, Any]:
    if not data.get("attention"):
        data.pop("attention", None)
    return data


class ActivationChoice(BaseModel):
    """The activation quantization a run asks for (`qbench run --act NAME [--act-set k=v] [--kv-cache]`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="registered activation scheme (qbench plugins), e.g. absmax; 'absmax8' = bits 8")
    config: dict[str, Any] = Field(default_factory=dict, description="the scheme's settings (JSON values)")
    kv_cache: bool = Field(False, description="also store attention keys/values (self and cross) at the scheme's "
                                              "bits, symmetric absmax per token and head")
    attention: bool = Field(False, description="also run every attention on quantized Q, K, V (per token and head) "
                                               "and probabilities (unsigned, the scheme's bits)")

    @model_serializer(mode="wrap")
    def _without_float_attention(self, handler: Any) -> dict[str, Any]:
        # without quantized attention a choice serializes as before the option existed, so
        # the identity of such a run (and a resume of it) does not change
        return _without_false_attention(handler(self))


class ActivationRecord(BaseModel):
    """What a result, an artifact and an entry record of a run's activation quantization: the
    scheme's identity and settings, the rule it declared, where it applies and, for a static
    scheme, every layer input's scale."""

    model_config = ConfigDict(extra="forbid")

    name: str
    version: str
    distribution: str | None = None
    distribution_version: str | None = None
    config: dict[str, Any]
    scheme: ActivationScheme
    kv_cache: bool = False
    attention: bool = False
    static_scales: dict[str, StaticActivationScale] | None = None

    @model_serializer(mode="wrap")
    def _without_float_attention(self, handler: Any) -> dict[str, Any]:
        # as `ActivationChoice`: artifacts made before the option keep their digests
        return _without_false_attention(handler(self))

    @property
    def label(self) -> str:
        """`A8 absmax`, `A8 static, KV8`, `A8 absmax, attention A8`: how tables name it."""
        kv = f", KV{self.scheme.bits}" if self.kv_cache else ""
        att = f", attention A{self.scheme.bits}" if self.attention else ""
        return f"A{self.scheme.bits} {self.name}{kv}{att}"

    def choice(self) -> ActivationChoice:
        return ActivationChoice(name=self.name, config=dict(self.config), kv_cache=self.kv_cache, attention=self.attention)
