"""Applying a quantizer plugin to a model: policy, calibration, packing, and the report.

The plugin only sees one float matrix at a time (and, for calibrated methods, `LayerStats`).
Everything around it is done here, the same way for every plugin: choosing the layers, running
calibration audio, validating and packing the output, swapping the packed weights into the
model, and measuring what it cost (bytes, bits per weight, reconstruction error).
"""

from __future__ import annotations

import fnmatch
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Literal, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_serializer

from qbench.errors import QBenchError, describe, one_line
from qbench.models.speech_model import SpeechModel
from qbench.models.weight_store import WeightInfo, WeightStore
from qbench.plugin_manager import entry_for_class
from qbench.quant.contract import LayerStats, QuantizedTensor, Quantizer
from qbench.quant.lowrank import LowRankCorrection, add_lowrank_correction
from qbench.quant.packing import PackedTensor, pack_quantized
from qbench.quant.plugin_process import PluginProcess, PluginProcessError

#: `progress(layer_name, done, total)`, called after each layer is quantized.
Progress = Callable[[str, int, int], None]

ConfigT = TypeVar("ConfigT", bound=BaseModel)

# Rows of calibration input upcast to float64 at a time: bounds the extra memory of LayerStats.
_STATS_CHUNK_ROWS = 8192


class PluginError(QBenchError, RuntimeError):
    """A quantizer plugin raised, or returned something unusable, on a specific layer."""


class QuantizationError(QBenchError, ValueError):
    """A model that cannot be quantized as asked (already packed, no calibration audio)."""


class CalibrationPassError(QBenchError, RuntimeError):
    """The model's calibration pass did not reach every layer it was to quantize (a model bug)."""


# -- which weights --------------------------------------------------------------------------


class QuantizationPolicy(BaseModel):
    """Which weight matrices get quantized; recorded with every result.

    Embeddings (the token table, which Whisper also uses as its tied output projection) are
    opt-in because they are both the largest matrix and the most sensitive one, and results
    with and without them are not comparable.
    """

    model_config = ConfigDict(extra="forbid")

    include_kinds: list[Literal["linear", "conv"]] = Field(default_factory=lambda: ["linear", "conv"])
    quantize_embeddings: bool = False
    #: fnmatch globs on layer names (without `.weight`), e.g. "encoder.conv*", "*.cross_attn.*"
    exclude: list[str] = Field(default_factory=list)
    #: a low-rank correction of every quantized layer's error, computed by the harness
    #: (`qbench.quant.lowrank`), or None
    lowrank: LowRankCorrection | None = None

    @model_serializer(mode="wrap")
    def _without_unset_lowrank(self, handler: Any) -> dict[str, Any]:
        # a policy without a correction serializes as before the field existed, so the digests
        # of artifacts (and entries) quantized without one do not change
        data = handler(self)
        if data.get("lowrank") is None:
            data.pop("lowrank", None)
        return data

    def excluded_by(self, name: str) -> str | None:
        return next((pat for pat in self.exclude if fnmatch.fnmatchcase(name, pat)), None)

    def wants(self, info: WeightInfo) -> bool:
        if info.kind == "embedding":
            kind_ok = self.quantize_embeddings
        else:
            kind_ok = info.kind in self.include_kinds
        return kind_ok and self.excluded_by(info.name) is None

    def select(self, weight_infos: Iterable[WeightInfo]) -> list[WeightInfo]:
        """The weights to quantize, in the given (execution) order."""
        return [info for info in weight_infos if self.wants(info)]


# -- one layer ------------------------------------------------------------------------------


class LayerReport(BaseModel):
    name: str
    #: the quantizer that quantized this layer (a plan may use several)
    quantizer: str | None = None
    kind: str
    shape: tuple[int, int]
    code_bits: int
    packing: str
    #: every stored buffer of the layer: codes + scales + zeros + codebook
    packed_bytes: int
    code_bytes: int
    bits_per_weight: float
    #: ||W - Wq||_F / ||W||_F with Wq exactly as the packed layer dequantizes
    rel_error: float
    #: weights per code: d for a vector codebook (its code_bits span d weights), else 1
    vector_dim: int = 1

    @model_serializer(mode="wrap")
    def _without_scalar_vector_dim(self, handler: Any) -> dict[str, Any]:
        # a scalar layer's report serializes as before vector codebooks existed
        data = handler(self)
        if data.get("vector_dim") == 1:
            data.pop("vector_dim")
        return data


def layer_stats(x: np.ndarray, in_features: int, x_float: np.ndarray | None = None) -> LayerStats:
    """`sum x^T x` over all rows of a layer input, accumulated in float64; with `x_float` (the
    same rows as the float model computes them) also `sum (x_float - x)^T x`."""
    x2 = x.reshape(-1, in_features)
    xf2 = None if x_float is None else x_float.reshape(-1, in_features)
    if xf2 is not None and xf2.shape != x2.shape:
        raise ValueError(f"float rows {xf2.shape} do not pair with quantized rows {x2.shape}")
    xtx = np.zeros((in_features, in_features), dtype=np.float64)
    dxtx = None if xf2 is None else np.zeros_like(xtx)
    for start in range(0, x2.shape[0], _STATS_CHUNK_ROWS):
        chunk = x2[start : start + _STATS_CHUNK_ROWS].astype(np.float64)
        xtx += chunk.T @ chunk
        if xf2 is not None:
            dxtx += (xf2[start : start + _STATS_CHUNK_ROWS].astype(np.float64) - chunk).T @ chunk
    return LayerStats(xtx=xtx, n_rows=int(x2.shape[0]), dxtx=dxtx)


def counted_rows(name: str, x: np.ndarray, mask: np.ndarray | None, paired: bool = False) -> np.ndarray:
    """The rows of layer `name`'s input `x` that `mask` (over its leading axes) counts, as a
    `[rows, in]` array; all of `x` without a mask. `paired`: `x` is one half of a paired pass,
    whose two halves the mask covers alike (the same audio twice)."""
    if mask is None:
        return x
    if paired:
        mask = mask[mask.shape[0] // 2 :]
    if x.shape[:-1] != mask.shape:
        raise CalibrationPassError(f"calibration pass: layer {name} got input of shape {x.shape}, "
                                   f"not the {mask.shape} rows its counted-rows mask covers")
    return x[mask]


class RowCountingStore:
    """`WeightStore.counting_rows` for a store that gathers calibration statistics: the mask
    in force is `self._rows` (None: every row counts), for `counted_rows`."""

    _rows: np.ndarray | None = None

    @contextmanager
    def counting_rows(self, mask: np.ndarray | None) -> Iterator[None]:
        outer, self._rows = self._rows, None if mask is None else np.asarray(mask, dtype=bool)
        try:
            yield
        finally:
            self._rows = outer


def _plugin_name(quantizer: Quantizer) -> str:
    return getattr(quantizer, "name", type(quantizer).__name__)


def _quantize_layer(
    quantizer: Quantizer, info: WeightInfo, weight: np.ndarray, stats: LayerStats | None, scale_dtype: np.dtype,
    lowrank: LowRankCorrection | None = None,
) -> tuple[PackedTensor, np.ndarray, LayerReport]:
    """Quantize, validate and pack one layer (with the policy's low-rank correction, if any);
    returns the packed layer and its dequantized weight."""
    where = f"plugin '{_plugin_name(quantizer)}' failed on layer '{info.name}'"
    weight = np.ascontiguousarray(weight, dtype=np.float32)
    try:
        # The plugin gets a copy: one that edits its input in place must not corrupt the model.
        qt = quantizer.quantize(weight.copy(), stats)
    except PluginProcessError as exc:  # already worded: exited, timed out, raised X
        raise PluginError(f"{where}: {one_line(exc)}") from None
    except Exception as exc:
        raise PluginError(f"{where}: {describe(exc)}") from exc
    if not isinstance(qt, QuantizedTensor):
        raise PluginError(f"{where}: quantize returned {type(qt).__name__}, not a QuantizedTensor")
    try:
        qt.validate(weight.shape)
        if lowrank is not None:
            qt = add_lowrank_correction(qt, weight, stats, lowrank)
        packed = pack_quantized(qt, scale_dtype)
    except Exception as exc:
        raise PluginError(f"{where}: {one_line(exc)}") from exc
    deq = packed.dequantize()
    if not np.all(np.isfinite(deq)):
        raise PluginError(f"{where}: dequantized weight contains NaN or inf")
    return packed, deq, layer_report(info, weight, packed, deq)


def layer_report(info: WeightInfo, weight: np.ndarray, packed: PackedTensor, deq: np.ndarray | None = None) -> LayerReport:
    """Size and reconstruction error of one packed layer against its float weight."""
    deq = packed.dequantize() if deq is None else deq
    norm = float(np.linalg.norm(weight))
    diff = float(np.linalg.norm(weight - deq))
    rel = diff / norm if norm > 0 else (0.0 if diff == 0 else float("inf"))
    return LayerReport(
        name=info.name,
        kind=info.kind,
        shape=info.shape,
        code_bits=packed.code_bits,
        packing=packed.packing,
        packed_bytes=packed.nbytes,
        code_bytes=packed.code_nbytes,
        bits_per_weight=packed.bits_per_weight,
        rel_error=rel,
        vector_dim=packed.vector_dim,
    )


# -- stores ---------------------------------------------------------------------------------


class PackedWeightStore(WeightStore):
    """A model's parameters with the quantized layers held packed, as a device would hold them.

    The float originals of packed layers are not kept. A packed layer is dequantized when it
    runs; `cache_bytes` is the budget for an LRU of dequantized (transposed) matrices, and 0
    keeps at most the one float matrix in use resident, so peak memory stays close to what
    the packed model needs on the target.
    """

    def __init__(
        self,
        params: Mapping[str, np.ndarray],
        matrices: Iterable[WeightInfo],
        packed: Mapping[str, PackedTensor],
        cache_bytes: int = 0,
    ):
        self.packed: dict[str, PackedTensor] = dict(packed)
        self.params = {k: v for k, v in params.items() if not (k.endswith(".weight") and k[: -len(".weight")] in self.packed)}
        self.infos = {info.name: info for info in matrices}
        for name, pt in self.packed.items():
            info = self.infos.get(name)
            if info is None or tuple(info.shape) != tuple(pt.shape):
                raise ValueError(f"packed layer {name} {pt.shape} does not match a matrix of the model")
        for info in self.infos.values():
            if info.name in self.packed:
                continue
            w = self.params[info.name + ".weight"]
            if int(np.prod(w.shape[1:])) != info.shape[1] or w.shape[0] != info.shape[0]:
                raise ValueError(f"{info.name}: weight shape {w.shape} does not match {info.shape}")
        self.cache_bytes = int(cache_bytes)
        self._param_cache: dict[str, np.ndarray] = {}
        self._wt_cache: dict[str, np.ndarray] = {}
        self._lru: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lru_bytes = 0
        self._lru_lock = threading.Lock()  # encoder windows may dequantize from two threads

    def has(self, name: str) -> bool:
        return name in self.params or (name.endswith(".weight") and name[: -len(".weight")] in self.packed)

    def matrix(self, name: str) -> np.ndarray:
        pt = self.packed.get(name)
        if pt is not None:
            return pt.dequantize()
        return super().matrix(name)

    def matrix_t(self, name: str) -> np.ndarray:
        """The right-hand side of the layer's product: `matrix(name).T`, or for a packed layer
        its dequantized codes transposed (equal unless it declares an input transform or a
        low-rank correction, which `linear` applies around it)."""
        if name not in self.packed:
            return super().matrix_t(name)
        with self._lru_lock:
            wt = self._lru.get(name)
            if wt is not None:
                self._lru.move_to_end(name)
                return wt
        w = self.packed[name].dequantize_codes()
        if not 0 < w.nbytes <= self.cache_bytes:
            # used once: BLAS reads the transposed view as it is, where a contiguous copy
            # would cost more than the dequantization itself (23 vs 9 ms per tiny.en step)
            return w.T
        wt = np.ascontiguousarray(w.T)
        with self._lru_lock:
            if name not in self._lru:
                while self._lru and self._lru_bytes + wt.nbytes > self.cache_bytes:
                    _, old = self._lru.popitem(last=False)
                    self._lru_bytes -= old.nbytes
                self._lru[name] = wt
                self._lru_bytes += wt.nbytes
        return wt

    def linear(self, name: str, x: np.ndarray) -> np.ndarray:
        """`x @ W.T + b`, run as the layer is stored: for a packed layer that declares them,
        `((x / s) H) q^T + (x V^T) U^T + b` (`matrix_t` is then `q^T`, the dequantized codes)."""
        pt = self.packed.get(name)
        if pt is None or not (pt.transforms_input or pt.lowrank_u is not None):
            return super().linear(name, x)
        y = super().linear(name, pt.transform_input(x) if pt.transforms_input else x)
        correction = pt.lowrank_product(x)
        if correction is not None:
            y += correction
        return y

    def embedding(self, name: str, ids: np.ndarray) -> np.ndarray:
        """Rows of an embedding table; a packed one dequantizes only the rows asked for."""
        pt = self.packed.get(name)
        if pt is None:
            return WeightStore.embedding(self, name, ids)
        ids = np.asarray(ids)
        return pt.dequantize_rows(ids.reshape(-1)).reshape(*ids.shape, pt.shape[1])

    def cached_bytes(self) -> int:
        """Float bytes currently held by the dequantization cache."""
        return self._lru_bytes

    def stored_bytes(self) -> int:
        """Packed layers' buffers plus every other parameter at its stored precision."""
        return int(sum(np.asarray(p).nbytes for p in self.params.values()) + sum(p.nbytes for p in self.packed.values()))


class CalibratingQuantizingStore(RowCountingStore, WeightStore):
    """Quantizes each selected layer, with its own quantizer, the first time the calibration
    pass reaches it.

    The layer's input is turned into `LayerStats` (if the quantizer wants them), the layer is
    quantized and packed, and its output is computed with the dequantized packed weight, so
    every later layer is calibrated on the outputs of the already-quantized layers before it
    (GPTQ's sequential mode) within a single forward pass.

    `paired`: the pass runs every calibration audio twice, `audios + audios`, and the first
    half of the rows of every input (the models stack rows in audio order) is the float model:
    it always goes through the float weights, so a layer's quantizer can be given
    `LayerStats.dxtx`, how far its quantized-path input has drifted from the float one.

    Statistics count only the rows the pass marks with `counting_rows` (every row where it
    marks none); outputs are computed for every row.
    """

    thread_safe = False  # layers must be reached in execution order

    def __init__(
        self,
        inner: WeightStore,
        quantizers: Mapping[str, Quantizer],
        selected: Iterable[WeightInfo],
        scale_dtype: np.dtype | type = np.float16,
        progress: Progress | None = None,
        lowrank: LowRankCorrection | None = None,
        paired: bool = False,
    ):
        super().__init__(inner.params, inner.weight_infos())
        self.paired = paired
        self.quantizers = dict(quantizers)  # layer name -> its quantizer (a plan may mix several)
        self.lowrank = lowrank
        self.selected: dict[str, WeightInfo] = {info.name: info for info in selected}
        self.scale_dtype = np.dtype(scale_dtype)
        self.progress = progress
        self.packed: dict[str, PackedTensor] = {}
        self.reports: dict[str, LayerReport] = {}

    def _quantize(self, name: str, x: np.ndarray, x_float: np.ndarray | None = None) -> np.ndarray:
        info = self.selected[name]
        quantizer = self.quantizers[name]
        wants_float = bool(getattr(quantizer, "wants_float_inputs", False))
        x = counted_rows(name, x, self._rows, self.paired)
        x_float = None if x_float is None else counted_rows(name, x_float, self._rows, self.paired)
        stats = layer_stats(x, info.shape[1], x_float if wants_float else None) if quantizer.needs_calibration else None
        packed, deq, report = _quantize_layer(quantizer, info, self.matrix(name), stats, self.scale_dtype, self.lowrank)
        self.packed[name] = packed
        self.reports[name] = report
        # The float transposed copy would otherwise stay cached for the whole pass.
        self._wt_cache.pop(name, None)
        if self.progress is not None:
            self.progress(name, len(self.packed), len(self.selected))
        return deq

    def linear(self, name: str, x: np.ndarray) -> np.ndarray:
        if name not in self.selected:
            return super().linear(name, x)
        x_float, y_float = None, None
        if self.paired:
            x_float, x = self._halves(name, x)
            y_float = super().linear(name, x_float)  # before _quantize drops the float copy
        deq = self._quantize(name, x, x_float) if name not in self.packed else self.packed[name].dequantize()
        y = x @ deq.T
        bias_name = name + ".bias"
        if bias_name in self.params:
            y += self.param(bias_name)
        return y if y_float is None else np.concatenate([y_float, y.astype(y_float.dtype, copy=False)])

    def embedding(self, name: str, ids: np.ndarray) -> np.ndarray:
        # a layer quantized so far is looked up packed (on the quantized half only, if paired)
        if not self.paired or name not in self.packed:
            return PackedWeightStore.embedding(self, name, ids)
        ids_float, ids = self._halves(name, np.asarray(ids))
        return np.concatenate([WeightStore.embedding(self, name, ids_float), PackedWeightStore.embedding(self, name, ids)])

    @staticmethod
    def _halves(name: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if x.shape[0] % 2:
            raise CalibrationPassError(f"paired calibration: layer {name} got {x.shape[0]} leading rows, not an even number")
        return x[: x.shape[0] // 2], x[x.shape[0] // 2 :]

    def missing(self) -> list[str]:
        """Selected layers the calibration pass has not reached (yet)."""
        return [name for name in self.selected if name not in self.packed]


# -- the whole model ------------------------------------------------------------------------


class QuantizerIdentity(BaseModel):
    """Which code quantized a model, with which settings: what results, entries and artifacts record."""

    model_config = ConfigDict(extra="forbid")

    name: str
    version: str
    distribution: str | None = None
    distribution_version: str | None = None
    config: dict[str, Any]
    needs_calibration: bool


class QuantizationReport(BaseModel):
    """What was done to a model and what it cost in size and reconstruction error."""

    quantizer: str
    quantizer_version: str
    distribution: str | None = None
    distribution_version: str | None = None
    config: dict[str, Any]
    policy: QuantizationPolicy
    needs_calibration: bool
    n_calibration_audios: int = 0
    #: set when a calibrated quantizer ran without audio (`quantize_without_audio`): the sizes
    #: are exact, the codes are not the ones a calibrated run would choose
    calibration_note: str | None = None
    #: for a plan: the identity of every quantizer it ran, in rule order
    plan_quantizers: list[QuantizerIdentity] | None = None
    scale_dtype: str
    layers: list[LayerReport]
    #: quantizable weights the policy left in float
    skipped: list[str]
    #: every parameter as loaded
    float_model_bytes: int
    #: every parameter as stored after quantization (packed layers + the rest)
    model_bytes: int
    #: quantized weights / all parameters, counted in elements
    quantized_fraction: float
    #: 8 * packed bytes (codes + scales + zeros + codebook) / weights, over quantized layers
    mean_bits_per_weight: float
    seconds: float


def packed_model_report(
    model: SpeechModel,
    identity: QuantizerIdentity,
    policy: QuantizationPolicy,
    packed: Mapping[str, PackedTensor],
    reports: list[LayerReport] | None = None,
    scale_dtype: np.dtype | type = np.float16,
    n_calibration_audios: int = 0,
    cache_bytes: int = 0,
) -> tuple[PackedWeightStore, QuantizationReport]:
    """The store of `model` (float) with `packed` layers swapped in, and its report. `reports`
    are the layers' reports when just quantized; without them (an artifact read back) they are
    computed again from the float weights."""
    store = model.store
    infos = {info.name: info for info in model.quantizable_weights()}
    selected = [infos[name] for name in packed]
    if reports is None:
        reports = [layer_report(info, store.matrix(info.name), packed[info.name]) for info in selected]
    new_store = PackedWeightStore(store.params, store.weight_infos(), packed, cache_bytes=cache_bytes)
    n_params = sum(int(np.asarray(p).size) for p in store.params.values())
    n_quant = sum(info.numel for info in selected)
    packed_bytes = sum(pt.nbytes for pt in packed.values())
    report = QuantizationReport(
        quantizer=identity.name,
        quantizer_version=identity.version,
        distribution=identity.distribution,
        distribution_version=identity.distribution_version,
        config=identity.config,
        policy=policy,
        needs_calibration=identity.needs_calibration,
        n_calibration_audios=n_calibration_audios,
        scale_dtype=np.dtype(scale_dtype).name,
        layers=reports,
        skipped=[name for name in infos if name not in packed],
        float_model_bytes=store.stored_bytes(),
        model_bytes=new_store.stored_bytes(),
        quantized_fraction=n_quant / n_params if n_params else 0.0,
        mean_bits_per_weight=8.0 * packed_bytes / n_quant if n_quant else 0.0,
        seconds=0.0,
    )
    return new_store, report


def quantize_model(
    model: SpeechModel,
    quantizer: Quantizer,
    policy: QuantizationPolicy | None = None,
    calibration_audios: list[np.ndarray] | None = None,
    progress: Progress | None = None,
    scale_dtype: np.dtype | type = np.float16,
    cache_bytes: int = 0,
    without_audio: bool = False,
    count_padding: bool = True,
) -> tuple[SpeechModel, QuantizationReport]:
    """Quantize the model's selected weights with `quantizer`; return the packed model and report.

    Quantizers that need calibration get one `calibration_forward` over `calibration_audios`
    (sequential, see `CalibratingQuantizingStore`); others are applied matrix by matrix with
    no audio, and so are calibrated ones with `without_audio` (see `quantize_without_audio`).
    Plugin failures surface as `PluginError` naming the plugin and layer.
    """
    policy = policy or QuantizationPolicy()
    assignment = {info.name: quantizer for info in policy.select(model.quantizable_weights())}
    model, report = quantize_layers(model, assignment, policy, calibration_audios, progress, scale_dtype, cache_bytes,
                                    without_audio, count_padding)
    identity = quantizer_identity(quantizer)
    report.quantizer, report.quantizer_version = identity.name, identity.version
    report.distribution, report.distribution_version = identity.distribution, identity.distribution_version
    report.config, report.needs_calibration = identity.config, identity.needs_calibration
    return model, report


def quantizer_identity(quantizer: Quantizer) -> QuantizerIdentity:
    """Which code `quantizer` is, as results and artifacts record it."""
    if isinstance(quantizer, PluginProcess):
        # the plugin's own process said which distribution it is; nothing is imported here
        distribution, distribution_version = quantizer.distribution, quantizer.distribution_version
        version = quantizer.version
    else:
        entry = entry_for_class(type(quantizer))
        distribution, distribution_version = (entry.distribution, entry.distribution_version) if entry else (None, None)
        # a class without its own `version` is versioned by its distribution, as discovery recorded
        version = entry.version if entry else getattr(quantizer, "version", None) or "unknown"
    return QuantizerIdentity(
        name=_plugin_name(quantizer), version=version, distribution=distribution,
        distribution_version=distribution_version, config=quantizer.config.model_dump(mode="json"),
        needs_calibration=bool(quantizer.needs_calibration),
    )


def quantize_layers(
    model: SpeechModel,
    assignment: Mapping[str, Quantizer],
    policy: QuantizationPolicy,
    calibration_audios: list[np.ndarray] | None = None,
    progress: Progress | None = None,
    scale_dtype: np.dtype | type = np.float16,
    cache_bytes: int = 0,
    without_audio: bool = False,
    count_padding: bool = True,
) -> tuple[SpeechModel, QuantizationReport]:
    """Quantize each layer named in `assignment` with its quantizer (a plan, or one quantizer
    for every selected layer); the report's quantizer fields are the caller's to fill.

    If any of the quantizers needs calibration (and `without_audio` is not set), one calibration
    pass quantizes every layer as it is reached, so each is calibrated on the outputs of the
    already-quantized layers before it whatever quantizer those had; otherwise the layers are
    quantized matrix by matrix with no audio. `count_padding`: the pass's padded rows count
    as calibration data too (`SpeechModel.calibration_forward`); False counts only fed rows.
    """
    store = model.store
    if isinstance(store, PackedWeightStore):
        raise QuantizationError("model is already quantized (its store is a PackedWeightStore)")
    t0 = time.perf_counter()
    selected = [info for info in model.quantizable_weights() if info.name in assignment]
    scale_dtype = np.dtype(scale_dtype)
    n_audios = 0
    calibrated = any(q.needs_calibration for q in assignment.values())

    if calibrated and not without_audio:
        if not calibration_audios:
            needy = next(q for q in assignment.values() if q.needs_calibration)
            raise QuantizationError(f"quantizer '{_plugin_name(needy)}' needs calibration audio")
        n_audios = len(calibration_audios)
        paired = any(getattr(q, "wants_float_inputs", False) for q in assignment.values())
        cal = CalibratingQuantizingStore(store, assignment, selected, scale_dtype, progress, policy.lowrank, paired)
        audios = calibration_audios + calibration_audios if paired else calibration_audios
        # only asked of a model when not the default: a model that stacks without padding need not know it
        model.with_store(cal).calibration_forward(audios, **({} if count_padding else {"count_padding": False}))
        missing = cal.missing()
        if missing:
            shown = ", ".join(missing[:8]) + (f", ... ({len(missing)} in all)" if len(missing) > 8 else "")
            raise CalibrationPassError(f"the calibration pass of {model.name} never reached layer(s) {shown}")
        packed, reports = cal.packed, [cal.reports[info.name] for info in selected]
    else:
        packed, reports = {}, []
        for i, info in enumerate(selected):
            quantizer = assignment[info.name]
            stats = neutral_layer_stats(info.shape[1]) if quantizer.needs_calibration else None
            pt, _, report = _quantize_layer(quantizer, info, store.matrix(info.name), stats, scale_dtype, policy.lowrank)
            packed[info.name] = pt
            reports.append(report)
            if progress is not None:
                progress(info.name, i + 1, len(selected))
    for report in reports:
        report.quantizer = _plugin_name(assignment[report.name])

    placeholder = QuantizerIdentity(name="?", version="?", config={}, needs_calibration=calibrated)
    new_store, report = packed_model_report(model, placeholder, policy, packed, reports, scale_dtype, n_audios, cache_bytes)
    report.seconds = time.perf_counter() - t0
    if calibrated and without_audio:
        names = sorted({_plugin_name(q) for q in assignment.values() if q.needs_calibration})
        report.calibration_note = (
            f"'{', '.join(names)}' {'needs' if len(names) == 1 else 'need'} calibration audio and got none: it ran on neutral statistics "
            "(x^T x = I), so the sizes are exact but the codes are not what a calibrated run chooses"
        )
    return model.with_store(new_store), report


def neutral_layer_stats(in_features: int) -> LayerStats:
    """Calibration statistics that favour no input direction: `x^T x = I` over one row.

    GPTQ's Hessian is then a multiple of the identity, so it has no error to feed back and
    rounds to nearest on its usual grid: same code widths and scale layout, no calibration.
    """
    return LayerStats(xtx=np.eye(in_features), n_rows=1)


def quantize_without_audio(
    model: SpeechModel,
    quantizer: Quantizer,
    policy: QuantizationPolicy | None = None,
    progress: Progress | None = None,
    scale_dtype: np.dtype | type = np.float16,
) -> tuple[SpeechModel, QuantizationReport]:
    """Quantize with any quantizer and no audio at all, to size the result (`qbench fit`).

    A quantizer that needs calibration gets `neutral_layer_stats` for every layer instead. What
    a packed layer costs depends on the code widths and the scale layout, which a quantizer
    such as GPTQ derives from its settings alone, not on which codes calibration picks: then
    `model_bytes` and every layer's `packed_bytes` are those of a calibrated run. The codes,
    and so the accuracy, are not, which the report's `calibration_note` says.
    """
    return quantize_model(model, quantizer, policy, None, progress, scale_dtype, without_audio=True)
