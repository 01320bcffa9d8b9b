"""The contract a quantizer plugin implements, and the harness's one way to read its output.

A plugin only maps a float weight `[out, in]` (plus, if it asks for them, calibration
statistics) to integer codes and the few float numbers needed to turn them back into weights.
It never packs bits, never touches the model and never measures anything: the harness does all
of that identically for every plugin, which is what makes their results comparable.

Dequantization contract (implemented once, in `dequantize`):

    v = codebook[codes] if codebook is not None else codes
    w = (v - zeros) * scales          # broadcast per group along the input axis

where group `g` spans input columns `[g * group_size, (g + 1) * group_size)` (the last group
may be shorter) and `group_size=None` means one group spans the whole input dimension.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from qbench.errors import QBenchError

Packing = Literal["int", "trit5"]


class QuantizedTensorError(QBenchError, ValueError):
    """A plugin returned a `QuantizedTensor` that breaks the contract (shape, range, NaN)."""


@dataclass
class LayerStats:
    """Calibration statistics of one layer's input, computed by the harness.

    `xtx` is the float64 sum of `x^T x` over every calibration row reaching the layer (rows =
    all leading axes of the input flattened), `n_rows` the number of those rows. GPTQ's Hessian
    is `2 * xtx / n_rows`.
    """

    xtx: np.ndarray
    n_rows: int


def code_range(code_bits: int, signed: bool, packing: Packing = "int") -> tuple[int, int]:
    """Inclusive `(lowest, highest)` code a tensor with these declarations may contain."""
    if packing == "trit5":
        return -1, 1
    if signed:
        return -(1 << (code_bits - 1)), (1 << (code_bits - 1)) - 1
    return 0, (1 << code_bits) - 1


def n_groups_for(in_features: int, group_size: int | None) -> int:
    return 1 if group_size is None else -(-in_features // group_size)


@dataclass
class QuantizedTensor:
    """What `Quantizer.quantize` returns: codes plus the parameters that dequantize them.

    codes      integer array, same shape as the weight `[out, in]`
    code_bits  bits per code the packer uses, 2..8
    packing    "int" (`code_bits` per code, bit-packed) or "trit5" (codes in {-1, 0, 1},
               five per byte; `signed` must be True)
    scales     float32 `[out, n_groups]`, or `[1, n_groups]` shared by every row
               (per-tensor is `[1, 1]`, per-channel `[out, 1]`)
    group_size input columns per group; None = one group over the whole input dimension
    zeros      same shape as `scales`, in code units (subtracted before scaling), or None
    codebook   float32 values indexed by code (log / power-of-two grids), or None; codes
               are then unsigned indices into it
    signed     codes centred at 0 (-2^(b-1)..2^(b-1)-1) rather than 0..2^b-1
    """

    codes: np.ndarray
    code_bits: int
    scales: np.ndarray
    group_size: int | None = None
    zeros: np.ndarray | None = None
    codebook: np.ndarray | None = None
    signed: bool = False
    packing: Packing = "int"

    def __post_init__(self) -> None:
        # Coerce first so plugins may hand back float64 scales; overflow to inf is caught below.
        self.scales = np.asarray(self.scales, dtype=np.float32)
        if self.zeros is not None:
            self.zeros = np.asarray(self.zeros, dtype=np.float32)
        if self.codebook is not None:
            self.codebook = np.asarray(self.codebook, dtype=np.float32)
        self._check()

    def _check(self) -> None:
        codes = np.asarray(self.codes)
        if not np.issubdtype(codes.dtype, np.integer):
            raise QuantizedTensorError(f"codes must be an integer array, got dtype {codes.dtype}")
        if codes.ndim != 2:
            raise QuantizedTensorError(f"codes must be 2-D [out, in], got shape {codes.shape}")
        self.codes = codes
        if self.packing not in ("int", "trit5"):
            raise QuantizedTensorError(f"packing must be 'int' or 'trit5', got {self.packing!r}")
        if not isinstance(self.code_bits, (int, np.integer)) or not 2 <= self.code_bits <= 8:
            raise QuantizedTensorError(f"code_bits must be an int in 2..8, got {self.code_bits!r}")
        self.code_bits = int(self.code_bits)
        if self.packing == "trit5" and (not self.signed or self.codebook is not None):
            raise QuantizedTensorError("trit5 packing needs signed=True codes and no codebook")
        if self.codebook is not None and self.signed:
            raise QuantizedTensorError("codes indexing a codebook must be unsigned (signed=False)")
        out_f, in_f = codes.shape
        if self.group_size is not None:
            if not isinstance(self.group_size, (int, np.integer)) or self.group_size < 1:
                raise QuantizedTensorError(f"group_size must be a positive int or None, got {self.group_size!r}")
            self.group_size = int(self.group_size)
        n_groups = n_groups_for(in_f, self.group_size)
        if self.scales.ndim != 2 or self.scales.shape[0] not in (1, out_f) or self.scales.shape[1] != n_groups:
            raise QuantizedTensorError(
                f"scales shape {self.scales.shape} does not fit codes {codes.shape} with "
                f"group_size={self.group_size} (expected [{out_f} or 1, {n_groups}])"
            )
        if not np.all(np.isfinite(self.scales)):
            raise QuantizedTensorError("scales contain NaN or inf")
        if self.zeros is not None:
            if self.zeros.shape != self.scales.shape:
                raise QuantizedTensorError(f"zeros shape {self.zeros.shape} != scales shape {self.scales.shape}")
            if not np.all(np.isfinite(self.zeros)):
                raise QuantizedTensorError("zeros contain NaN or inf")
        lo, hi = code_range(self.code_bits, self.signed, self.packing)
        if self.codebook is not None:
            if self.codebook.ndim != 1 or not 1 <= self.codebook.size <= 1 << self.code_bits:
                raise QuantizedTensorError(
                    f"codebook must be 1-D with 1..{1 << self.code_bits} entries, got shape {self.codebook.shape}"
                )
            if not np.all(np.isfinite(self.codebook)):
                raise QuantizedTensorError("codebook contains NaN or inf")
            hi = self.codebook.size - 1
        if codes.size:
            cmin, cmax = int(codes.min()), int(codes.max())
            if cmin < lo or cmax > hi:
                kind = "trit5" if self.packing == "trit5" else f"{'signed' if self.signed else 'unsigned'} {self.code_bits}-bit"
                raise QuantizedTensorError(f"codes span [{cmin}, {cmax}], outside {kind} range [{lo}, {hi}]")

    def validate(self, weight_shape: tuple[int, ...]) -> None:
        """Raise `QuantizedTensorError` unless this tensor can stand in for a weight of that shape."""
        self._check()
        if tuple(self.codes.shape) != tuple(weight_shape):
            raise QuantizedTensorError(f"codes shape {self.codes.shape} != weight shape {tuple(weight_shape)}")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]


def apply_scales(
    values: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None, group_size: int | None
) -> np.ndarray:
    """`(values - zeros) * scales` with per-group parameters broadcast along the input axis.

    `values` is `[rows, in]` float32; `scales`/`zeros` are `[rows or 1, n_groups]`. Shared by
    `dequantize` and the packed representation so both read codes the same way.
    """
    scales = np.asarray(scales, dtype=np.float32)
    zeros = None if zeros is None else np.asarray(zeros, dtype=np.float32)
    in_f = values.shape[1]
    if group_size is None or scales.shape[1] == 1:
        out = values - zeros if zeros is not None else values
        return np.asarray(out * scales, dtype=np.float32)
    n_groups = scales.shape[1]
    if n_groups * group_size == in_f:
        # A free reshape when groups tile the row exactly (the common case).
        v = values.reshape(values.shape[0], n_groups, group_size)
        if zeros is not None:
            v = v - zeros[:, :, None]
        return np.asarray(v * scales[:, :, None], dtype=np.float32).reshape(values.shape[0], in_f)
    col_group = np.arange(in_f) // group_size
    out = values - zeros[:, col_group] if zeros is not None else values
    return np.asarray(out * scales[:, col_group], dtype=np.float32)


def dequantize(qt: QuantizedTensor) -> np.ndarray:
    """The float32 `[out, in]` weight a `QuantizedTensor` stands for."""
    if qt.codebook is not None:
        values = qt.codebook[qt.codes]
    else:
        values = qt.codes.astype(np.float32)
    return apply_scales(values, qt.scales, qt.zeros, qt.group_size)


class QuantizerConfig(BaseModel):
    """Base of a quantizer's knobs (`qbench run --set key=value`), each with a default and
    validation. Unknown keys are errors, so a typo in `--set` fails instead of silently running
    the defaults; discovery rejects a `Config` that relaxes this."""

    model_config = ConfigDict(extra="forbid")


class Quantizer(ABC):
    """Base class of every quantizer plugin.

    Subclasses set `name` and implement `quantize`; the other class attributes have defaults.
    A quantizer with knobs declares them as a nested `class Config(QuantizerConfig)` and
    annotates `config: Config`, so `self.config` is typed as its own knobs.
    """

    #: unique registry name, used as `qbench run --plugin NAME`
    name: ClassVar[str]
    #: version of the algorithm/implementation, recorded in every result; None = the version
    #: of the distribution whose plugin registers the class
    version: ClassVar[str | None] = None
    #: one line for `qbench plugins`
    description: ClassVar[str] = ""
    #: the knobs; the default has none
    Config: ClassVar[type[BaseModel]] = QuantizerConfig
    #: True if `quantize` needs `LayerStats` (the harness then runs calibration audio)
    needs_calibration: ClassVar[bool] = False

    config: BaseModel

    def __init__(self, config: BaseModel | dict[str, Any] | None = None):
        if config is None:
            config = self.Config()
        elif isinstance(config, dict):
            config = self.Config.model_validate(config)
        elif not isinstance(config, self.Config):
            raise TypeError(f"{type(self).__name__} expects a {self.Config.__qualname__}, got {type(config).__name__}")
        self.config = config

    @abstractmethod
    def quantize(self, weight: np.ndarray, stats: LayerStats | None) -> QuantizedTensor:
        """Quantize one float32 weight `[out, in]`; `stats` is None unless `needs_calibration`."""
