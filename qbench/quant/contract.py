"""The contract a quantizer plugin implements, and the harness's one way to read its output.

A plugin only maps a float weight `[out, in]` (plus, if it asks for them, calibration
statistics) to integer codes and the few float numbers needed to turn them back into weights.
It never packs bits, never touches the model and never measures anything: the harness does all
of that identically for every plugin, which is what makes their results comparable.

Dequantization contract (implemented once, in `dequantize_codes` and `dequantize`):

    v = codebook[row, group, codes] if codebook is not None else codes
    q = (v - zeros) * scales                       # broadcast per group along the input axis
    W = (q @ H^T) / input_scales + U @ V           # the weight the layer stands for

where group `g` spans input columns `[g * group_size, (g + 1) * group_size)` (the last group
may be shorter) and `group_size=None` means one group spans the whole input dimension.

A vector codebook (`vector_dim = d > 1`, QuIP#'s E8P or D4 lattice codebooks) makes one code
stand for `d` consecutive weights of a row: `codes` is `[out, in / d]`, `codebook` is one
`[K, d]` table for the tensor, and the first line becomes

    v = codebook[codes].reshape(out, in)           # code [r, j] -> columns [j*d, (j+1)*d) of row r

after which scales, the input transform and the low-rank correction are exactly as above (it
needs unsigned codes, "int" packing, no zeros, and groups of whole vectors). `vector_dim = 1`
is the scalar contract, unchanged. The last line's parts are each optional:

- `input_scales` s (AWQ): the codes quantize `W diag(s)`; at run time the layer's input is
  divided by s, so `(x / s) (W diag(s))^T = x W^T`.
- `hadamard_signs` (QuIP#, QuaRot): the codes quantize `W diag(s) H` for the randomized
  block-Hadamard `H` of `qbench.quant.hadamard`; at run time the input is `(x / s) H`.
- `lowrank_u`, `lowrank_v` (LQER, ZeroQuant-V2's LoRC): a rank-r correction applied beside the
  quantized product, `y += (x V^T) U^T`, on the layer's original input.

so a layer runs as `y = ((x / s) H) q^T + (x V^T) U^T + b`, which is what the harness executes
(and counts) for every part a layer declares.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from qbench.errors import QBenchError

Packing = Literal["int", "trit5"]
LowRankDtype = Literal["float16", "int8"]
#: the array fields of a `QuantizedTensor` (what a plugin's process sends back, as raw arrays)
TENSOR_ARRAYS = ("codes", "scales", "zeros", "codebook", "input_scales", "hadamard_signs", "lowrank_u", "lowrank_v")


class QuantizedTensorError(QBenchError, ValueError):
    """A plugin returned a `QuantizedTensor` that breaks the contract (shape, range, NaN)."""


@dataclass
class LayerStats:
    """Calibration statistics of one layer's input, computed by the harness.

    `xtx` is the float64 sum of `x^T x` over every calibration row reaching the layer (rows =
    all leading axes of the input flattened), `n_rows` the number of those rows. GPTQ's Hessian
    is `2 * xtx / n_rows`.

    `dxtx` is given only to a quantizer that sets `wants_float_inputs`: the float64 sum of
    `(x_float - x)^T x` over the same rows, where `x_float` is the row the float model feeds
    this layer and `x` the row it gets with every earlier layer already quantized (GPTQ's
    sequential mode). It is what an "asymmetric" calibration (GPTAQ, arXiv:2504.02692) needs to
    match the layer's output to the float model's rather than to its own float weight on
    already-perturbed inputs. None otherwise.
    """

    xtx: np.ndarray
    n_rows: int
    dxtx: np.ndarray | None = None


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

    codes      integer array, same shape as the weight `[out, in]` (`[out, in / vector_dim]`
               for a vector codebook, below)
    code_bits  bits per code the packer uses, 2..8
    packing    "int" (`code_bits` per code, bit-packed) or "trit5" (codes in {-1, 0, 1},
               five per byte; `signed` must be True)
    scales     float32 `[out, n_groups]`, or `[1, n_groups]` shared by every row
               (per-tensor is `[1, 1]`, per-channel `[out, 1]`)
    group_size input columns per group; None = one group over the whole input dimension
    zeros      same shape as `scales`, in code units (subtracted before scaling), or None
    codebook   float32 values indexed by code, or None; codes are then unsigned indices into
               it. `[K]` is one codebook for the tensor (log grids, NF4), `[rows, K]` one per
               row (SqueezeLLM), `[rows, n_groups, K]` one per group; rows = out or 1;
               K <= 2^code_bits
    signed     codes centred at 0 (-2^(b-1)..2^(b-1)-1) rather than 0..2^b-1

    and, each optional (see the module docstring for how a layer runs with them):

    input_scales    float32 `[in]`, > 0: the codes quantize `W diag(input_scales)`
    hadamard_signs  `[in]` of +-1: the codes quantize `W diag(input_scales) H`
    lowrank_u       float32 `[out, r]` and
    lowrank_v       float32 `[r, in]`: `W ~ (dequantized codes) + U V`
    lowrank_dtype   how U and V are stored: "float16", or "int8" with one float16 scale per
                    row of U and of V (absmax)
    vector_dim      weights per code (default 1: one code per weight). With d > 1 (vector
                    codebooks, QuIP#'s D4/E8P lattices): `codes` is `[out, in / d]`, code
                    `[r, j]` standing for columns `[j*d, (j+1)*d)` of row r; `codebook` is
                    required, one float32 `[K, d]` table for the tensor (1 <= K <= 2^code_bits,
                    codes unsigned and < K); `packing` must be "int", `zeros` None, and
                    `group_size` None or a multiple of d. `scales`, `input_scales`,
                    `hadamard_signs` and the low-rank factors are sized by the weight's `in`,
                    as in the scalar case; `shape` is the weight's `(out, in)`, not `codes.shape`.
                    With a 256-entry D4 codebook (8-bit codes, d = 4) the codes cost 2 bits
                    per weight.
    """

    codes: np.ndarray
    code_bits: int
    scales: np.ndarray
    group_size: int | None = None
    zeros: np.ndarray | None = None
    codebook: np.ndarray | None = None
    signed: bool = False
    packing: Packing = "int"
    input_scales: np.ndarray | None = None
    hadamard_signs: np.ndarray | None = None
    lowrank_u: np.ndarray | None = None
    lowrank_v: np.ndarray | None = None
    lowrank_dtype: LowRankDtype = "float16"
    vector_dim: int = 1

    def __post_init__(self) -> None:
        # Coerce first so plugins may hand back float64 scales; overflow to inf is caught below.
        self.scales = np.asarray(self.scales, dtype=np.float32)
        for name in ("zeros", "codebook", "input_scales", "lowrank_u", "lowrank_v"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, np.asarray(value, dtype=np.float32))
        if self.hadamard_signs is not None:
            signs = np.asarray(self.hadamard_signs)
            if not np.issubdtype(signs.dtype, np.number) or not np.all(np.isin(signs, (-1, 1))):
                raise QuantizedTensorError("hadamard_signs must hold only -1 and +1")
            self.hadamard_signs = signs.astype(np.int8)
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
        if isinstance(self.vector_dim, bool) or not isinstance(self.vector_dim, (int, np.integer)) or self.vector_dim < 1:
            raise QuantizedTensorError(f"vector_dim must be a positive int, got {self.vector_dim!r}")
        self.vector_dim = int(self.vector_dim)
        if self.vector_dim > 1:
            # before the scalar rules, so a wrong vector declaration is named as such
            self._check_group_size()
            self._check_vector_declaration()
        if self.packing == "trit5" and (not self.signed or self.codebook is not None):
            raise QuantizedTensorError("trit5 packing needs signed=True codes and no codebook")
        if self.codebook is not None and self.signed:
            raise QuantizedTensorError("codes indexing a codebook must be unsigned (signed=False)")
        self._check_group_size()
        out_f, in_f = self.shape
        n_groups = n_groups_for(in_f, self.group_size)
        if self.scales.ndim != 2 or self.scales.shape[0] not in (1, out_f) or self.scales.shape[1] != n_groups:
            fits = f"codes {codes.shape}" if self.vector_dim == 1 else f"a [{out_f}, {in_f}] weight (vector_dim={self.vector_dim})"
            raise QuantizedTensorError(
                f"scales shape {self.scales.shape} does not fit {fits} with "
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
        if self.vector_dim > 1:
            hi = self.codebook.shape[0] - 1  # its shape was checked with the declaration
        elif self.codebook is not None:
            cb = self.codebook
            k = cb.shape[-1] if cb.ndim else 0
            allowed = {1: True, 2: cb.ndim == 2 and cb.shape[0] in (1, out_f),
                       3: cb.ndim == 3 and cb.shape[0] in (1, out_f) and cb.shape[1] == n_groups}
            if not allowed.get(cb.ndim, False) or not 1 <= k <= 1 << self.code_bits:
                raise QuantizedTensorError(
                    f"codebook shape {cb.shape} does not fit codes {codes.shape} with group_size={self.group_size}: "
                    f"expected [K], [{out_f} or 1, K] or [{out_f} or 1, {n_groups}, K] with 1 <= K <= {1 << self.code_bits}"
                )
            if not np.all(np.isfinite(cb)):
                raise QuantizedTensorError("codebook contains NaN or inf")
            hi = k - 1
        if codes.size:
            cmin, cmax = int(codes.min()), int(codes.max())
            if cmin < lo or cmax > hi:
                kind = "trit5" if self.packing == "trit5" else f"{'signed' if self.signed else 'unsigned'} {self.code_bits}-bit"
                if self.vector_dim > 1:
                    kind = f"the {hi + 1}-entry vector codebook's"
                raise QuantizedTensorError(f"codes span [{cmin}, {cmax}], outside {kind} range [{lo}, {hi}]")
        self._check_input_side(in_f)
        self._check_lowrank(out_f, in_f)

    def _check_group_size(self) -> None:
        if self.group_size is not None:
            if not isinstance(self.group_size, (int, np.integer)) or self.group_size < 1:
                raise QuantizedTensorError(f"group_size must be a positive int or None, got {self.group_size!r}")
            self.group_size = int(self.group_size)

    def _check_vector_declaration(self) -> None:
        """The rules a vector codebook adds (`vector_dim > 1`), each refused with its own line."""
        d = self.vector_dim
        if self.codebook is None:
            raise QuantizedTensorError(f"vector_dim={d} needs a codebook of shape [K, {d}] (each code indexes one row of it)")
        cb, most = self.codebook, 1 << self.code_bits
        if cb.ndim != 2 or cb.shape[1] != d or not 1 <= cb.shape[0] <= most:
            raise QuantizedTensorError(f"codebook shape {cb.shape} does not fit vector_dim={d}: expected one [K, {d}] "
                                       f"codebook for the tensor with 1 <= K <= {most}")
        if not np.all(np.isfinite(cb)):
            raise QuantizedTensorError("codebook contains NaN or inf")
        if self.packing != "int":
            raise QuantizedTensorError(f"vector_dim={d} needs packing='int' (one {self.code_bits}-bit index per code), "
                                       f"got {self.packing!r}")
        if self.signed:
            raise QuantizedTensorError(f"vector_dim={d}: codes indexing a codebook must be unsigned (signed=False)")
        if self.zeros is not None:
            raise QuantizedTensorError(f"vector_dim={d} takes no zeros (a codebook row is a value, not a code to offset)")
        if self.group_size is not None and self.group_size % d:
            raise QuantizedTensorError(f"group_size={self.group_size} is not a multiple of vector_dim={d} "
                                       "(a group must hold whole vectors)")

    def _check_input_side(self, in_f: int) -> None:
        s = self.input_scales
        if s is not None:
            if s.shape != (in_f,):
                raise QuantizedTensorError(f"input_scales shape {s.shape} != ({in_f},) (one per input column)")
            if not np.all(np.isfinite(s)) or not np.all(s > 0):
                raise QuantizedTensorError("input_scales must be finite and > 0")
        d = self.hadamard_signs
        if d is not None and d.shape != (in_f,):
            raise QuantizedTensorError(f"hadamard_signs shape {d.shape} != ({in_f},) (one per input column)")

    def _check_lowrank(self, out_f: int, in_f: int) -> None:
        u, v = self.lowrank_u, self.lowrank_v
        if (u is None) != (v is None):
            raise QuantizedTensorError("lowrank_u and lowrank_v come together (W ~ deq + U V)")
        if self.lowrank_dtype not in ("float16", "int8"):
            raise QuantizedTensorError(f"lowrank_dtype must be 'float16' or 'int8', got {self.lowrank_dtype!r}")
        if u is None:
            return
        if u.ndim != 2 or v.ndim != 2 or u.shape[0] != out_f or v.shape[1] != in_f or u.shape[1] != v.shape[0]:
            raise QuantizedTensorError(f"low-rank factors {u.shape} x {v.shape} do not make a [{out_f}, {in_f}] correction")
        if not 1 <= u.shape[1] <= min(out_f, in_f):
            raise QuantizedTensorError(f"low-rank rank {u.shape[1]} outside 1..{min(out_f, in_f)}")
        if not (np.all(np.isfinite(u)) and np.all(np.isfinite(v))):
            raise QuantizedTensorError("low-rank factors contain NaN or inf")

    def validate(self, weight_shape: tuple[int, ...]) -> None:
        """Raise `QuantizedTensorError` unless this tensor can stand in for a weight of that shape."""
        self._check()
        if self.shape == tuple(weight_shape):
            return
        if self.vector_dim == 1:
            raise QuantizedTensorError(f"codes shape {self.codes.shape} != weight shape {tuple(weight_shape)}")
        divides = "" if len(weight_shape) != 2 or weight_shape[1] % self.vector_dim == 0 else (
            f"; in_features {weight_shape[1]} is not a multiple of vector_dim")
        raise QuantizedTensorError(f"codes shape {self.codes.shape} with vector_dim={self.vector_dim} stand for a "
                                   f"{self.shape} weight, not the weight shape {tuple(weight_shape)}{divides}")

    @property
    def shape(self) -> tuple[int, int]:
        """The weight's `(out, in)`: `codes.shape`, with each code spanning `vector_dim` columns."""
        out_f, n_codes = self.codes.shape
        return int(out_f), int(n_codes) * self.vector_dim

    @property
    def lowrank_rank(self) -> int:
        return 0 if self.lowrank_u is None else int(self.lowrank_u.shape[1])


def codebook_values(codebook: np.ndarray, codes: np.ndarray, group_size: int | None,
                    rows: np.ndarray | slice | None = None, vector_dim: int = 1) -> np.ndarray:
    """float32 `codebook[row, group, code]` for a block of `codes` `[n, in]`.

    `rows` says which rows of the tensor the block holds (a slice or row indices; None = all),
    for codebooks with one entry per row (`[rows, K]`) or per group (`[rows, n_groups, K]`).
    With `vector_dim = d > 1` the codebook is `[K, d]` and `codes` `[n, in / d]`: each code's
    row of the codebook fills its `d` columns, giving `[n, in]`.
    """
    codebook = np.asarray(codebook)
    codes = np.asarray(codes)
    if vector_dim > 1:
        return codebook[codes].reshape(codes.shape[0], codes.shape[1] * vector_dim)
    if codebook.ndim == 1:
        return codebook[codes]
    if codebook.shape[0] != 1 and rows is not None:
        codebook = codebook[rows]
    k = codebook.shape[-1]
    if codebook.ndim == 2:
        # one lookup table per row: flatten to [rows * K] and offset each row's codes
        base = (np.arange(codebook.shape[0]) * k)[:, None] if codebook.shape[0] != 1 else 0
        return codebook.reshape(-1)[codes.astype(np.intp) + base]
    n_rows, n_groups = codebook.shape[0], codebook.shape[1]
    in_f = codes.shape[1]
    col_group = np.zeros(in_f, dtype=np.intp) if group_size is None else np.arange(in_f) // group_size
    row_base = (np.arange(n_rows) * n_groups * k)[:, None] if n_rows != 1 else 0
    return codebook.reshape(-1)[codes.astype(np.intp) + row_base + (col_group * k)[None, :]]


def to_original_space(q: np.ndarray, input_scales: np.ndarray | None, hadamard_signs: np.ndarray | None) -> np.ndarray:
    """Rows of `q` (the dequantized codes, in the layer's input space) mapped back to rows of
    `W`: `(q H^T) / input_scales`."""
    from qbench.quant.hadamard import inverse_hadamard_transform

    if hadamard_signs is not None:
        q = inverse_hadamard_transform(q, hadamard_signs)
    if input_scales is not None:
        q = np.asarray(q / input_scales.astype(np.float32), dtype=np.float32)
    return q


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


def dequantize_codes(qt: QuantizedTensor) -> np.ndarray:
    """float32 `(v - zeros) * scales`: the matrix the layer's (transformed) input is multiplied
    by, before input scales, transform and low-rank correction are undone or added."""
    if qt.codebook is not None:
        values = codebook_values(qt.codebook, qt.codes, qt.group_size, vector_dim=qt.vector_dim)
    else:
        values = qt.codes.astype(np.float32)
    return apply_scales(values, qt.scales, qt.zeros, qt.group_size)


def dequantize(qt: QuantizedTensor) -> np.ndarray:
    """The float32 `[out, in]` weight a `QuantizedTensor` stands for (every declared part)."""
    w = to_original_space(dequantize_codes(qt), qt.input_scales, qt.hadamard_signs)
    if qt.lowrank_u is not None:
        w = w + qt.lowrank_u @ qt.lowrank_v
    return np.asarray(w, dtype=np.float32)


def validated_config(plugin: Any, config: BaseModel | dict[str, Any] | None) -> BaseModel:
    """A plugin object's `Config` from None (the defaults), a dict, or a `Config` itself."""
    if config is None:
        return plugin.Config()
    if isinstance(config, dict):
        return plugin.Config.model_validate(config)
    if not isinstance(config, plugin.Config):
        raise TypeError(f"{type(plugin).__name__} expects a {plugin.Config.__qualname__}, got {type(config).__name__}")
    return config


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
    #: True if `quantize` uses `LayerStats.dxtx`: the harness then runs the float model beside
    #: the quantized one through the calibration pass (twice its cost). A property may read the
    #: config; it is asked once, after the quantizer is built.
    wants_float_inputs: bool = False

    config: BaseModel

    def __init__(self, config: BaseModel | dict[str, Any] | None = None):
        self.config = validated_config(self, config)

    @abstractmethod
    def quantize(self, weight: np.ndarray, stats: LayerStats | None) -> QuantizedTensor:
        """Quantize one float32 weight `[out, in]`; `stats` is None unless `needs_calibration`."""
