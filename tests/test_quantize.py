from __future__ import annotations

import numpy as np
import pytest
from pydantic import BaseModel, ConfigDict, Field

from qbench.models.weight_store import WeightInfo, WeightStore
from qbench.quant.apply import (
    CalibratingQuantizingStore,
    PackedWeightStore,
    PluginError,
    QuantizationPolicy,
    quantize_model,
)
from qbench.quant.contract import LayerStats, QuantizedTensor, Quantizer
from qbench.quant.packing import PackedTensor
from qbench.quant.settings import SettingsError, parse_settings

# -- a tiny model satisfying the SpeechModel protocol ---------------------------------------


class TinyModel:
    """tok (embedding, tied as output) -> l1 (linear, bias) -> relu -> conv (as linear) -> l2."""

    name = "tiny"
    sample_rate = 16000
    INFOS = [
        WeightInfo("l1", (8, 6), "linear"),
        WeightInfo("conv", (8, 8), "conv"),
        WeightInfo("l2", (6, 8), "linear"),
        WeightInfo("tok", (5, 6), "embedding"),
    ]

    def __init__(self, store: WeightStore, skip_l2: bool = False):
        self.store = store
        self.skip_l2 = skip_l2

    @classmethod
    def create(cls, seed: int = 0) -> TinyModel:
        rng = np.random.default_rng(seed)
        params = {
            "l1.weight": rng.normal(size=(8, 6)).astype(np.float32),
            "l1.bias": rng.normal(size=8).astype(np.float32),
            "conv.weight": rng.normal(size=(8, 4, 2)).astype(np.float32),
            "l2.weight": rng.normal(size=(6, 8)).astype(np.float32),
            "tok.weight": rng.normal(size=(5, 6)).astype(np.float16),
            "ln.weight": np.ones(6, np.float32),
        }
        return cls(WeightStore(params, cls.INFOS))

    def quantizable_weights(self) -> list[WeightInfo]:
        return list(self.INFOS)

    def with_store(self, store: WeightStore) -> TinyModel:
        return TinyModel(store, self.skip_l2)

    def _forward(self, x: np.ndarray) -> np.ndarray:
        h = np.maximum(self.store.linear("l1", x), 0)
        h = self.store.linear("conv", h)
        # skip_l2 breaks the calibration contract on purpose (shapes kept consistent)
        h = h[..., :6] if self.skip_l2 else self.store.linear("l2", h)
        return self.store.linear("tok", h * self.store.param("ln.weight"))

    def calibration_forward(self, audios: list[np.ndarray]) -> None:
        self._forward(np.stack([a.reshape(-1, 6) for a in audios]))

    def transcribe(self, audios: list[np.ndarray]) -> list[str]:
        return [str(int(self._forward(a.reshape(-1, 6)).argmax())) for a in audios]


class Coarse(Quantizer):
    """Per-tensor 4-bit signed grid; records what it was given."""

    name = "coarse"
    version = "1.0"
    description = "test quantizer"
    needs_calibration = False

    def __init__(self, config=None):
        super().__init__(config)
        self.seen: list[tuple[tuple[int, int], LayerStats | None]] = []

    def quantize(self, weight: np.ndarray, stats: LayerStats | None) -> QuantizedTensor:
        self.seen.append((weight.shape, stats))
        scale = float(np.abs(weight).max()) / 7
        codes = np.clip(np.rint(weight / scale), -7, 7).astype(np.int8)
        return QuantizedTensor(codes=codes, code_bits=4, scales=[[scale]], signed=True)


class CalibratedCoarse(Coarse):
    name = "calibrated-coarse"
    needs_calibration = True


def audios(n: int = 3, seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(4, 6)).astype(np.float32) for _ in range(n)]


# -- policy ---------------------------------------------------------------------------------


def test_policy_defaults_skip_embeddings() -> None:
    names = [i.name for i in QuantizationPolicy().select(TinyModel.INFOS)]
    assert names == ["l1", "conv", "l2"]


def test_policy_kinds_embeddings_and_exclude() -> None:
    pol = QuantizationPolicy(include_kinds=["linear"], quantize_embeddings=True, exclude=["l2*"])
    assert [i.name for i in pol.select(TinyModel.INFOS)] == ["l1", "tok"]
    assert pol.excluded_by("l2") == "l2*"
    with pytest.raises(ValueError):
        QuantizationPolicy(include_kinds=["embedding"])
    assert QuantizationPolicy.model_validate(pol.model_dump(mode="json")) == pol


# -- settings -------------------------------------------------------------------------------


class Knobs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    bits: int = Field(4, ge=2, le=8)
    group_size: int | None = 128
    symmetric: bool = True
    mode: str = "a"


def test_parse_settings_values_are_json_else_strings() -> None:
    cfg = parse_settings(["bits=3", "group_size=null", "symmetric=false", "mode=fast"], Knobs, "rtn")
    assert cfg == Knobs(bits=3, group_size=None, symmetric=False, mode="fast")
    assert parse_settings([], Knobs) == Knobs()


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        (["bitz=3"], r"plugin 'rtn': unknown setting 'bitz' \(known: bits, group_size, symmetric, mode\)"),
        (["bits=9"], r"plugin 'rtn': bad value for 'bits': .*less than or equal to 8 \(got '9'\)"),
        (["symmetric=maybe"], r"plugin 'rtn': bad value for 'symmetric'"),
        (["bits"], r"plugin 'rtn': setting 'bits' is not of the form key=value"),
        (["bits=3", "bits=4"], r"plugin 'rtn': setting 'bits' given twice"),
    ],
)
def test_parse_settings_errors_name_key_and_plugin(settings: list[str], match: str) -> None:
    with pytest.raises(SettingsError, match=match) as info:
        parse_settings(settings, Knobs, "rtn")
    assert "\n" not in str(info.value)


# -- direct (no calibration) ----------------------------------------------------------------


def test_quantize_model_direct_end_to_end() -> None:
    model = TinyModel.create()
    q = Coarse()
    qmodel, report = quantize_model(model, q, QuantizationPolicy(quantize_embeddings=True))
    assert all(stats is None for _, stats in q.seen)
    assert [shape for shape, _ in q.seen] == [(8, 6), (8, 8), (6, 8), (5, 6)]
    store = qmodel.store
    assert isinstance(store, PackedWeightStore)
    # float originals of packed layers are gone, everything else is kept as it was
    assert not any(name.endswith(".weight") and name != "ln.weight" for name in store.params)
    assert store.params["l1.bias"] is model.store.params["l1.bias"]
    assert store.has("l1.weight") and store.has("l1.bias")
    # matrices run dequantized from the packed codes
    for info in TinyModel.INFOS:
        w = model.store.matrix(info.name)
        wq = store.matrix(info.name)
        assert np.abs(w - wq).max() <= np.abs(w).max() / 14 * 1.01
    x = audios(1)[0]
    expected = x @ store.packed["l1"].dequantize().T + model.store.param("l1.bias")
    np.testing.assert_allclose(store.linear("l1", x), expected, rtol=1e-6)
    ids = np.array([[4, 0], [2, 2]])
    np.testing.assert_array_equal(store.embedding("tok", ids), store.matrix("tok")[ids])

    assert report.quantizer == "coarse" and report.quantizer_version == "1.0"
    assert [layer.name for layer in report.layers] == ["l1", "conv", "l2", "tok"]
    assert report.skipped == []
    assert report.layers[0].packed_bytes == 24 + 2  # 48 4-bit codes + one float16 scale
    assert 0 < report.layers[0].rel_error < 0.2
    packed_total = sum(p.nbytes for p in store.packed.values())
    assert report.model_bytes == store.stored_bytes() == packed_total + 8 * 4 + 6 * 4
    assert report.float_model_bytes == model.store.stored_bytes()
    n_quant = 48 + 64 + 48 + 30
    assert report.quantized_fraction == pytest.approx(n_quant / (n_quant + 8 + 6))
    assert report.mean_bits_per_weight == pytest.approx(8 * packed_total / n_quant)
    assert report.policy.quantize_embeddings
    assert qmodel.transcribe(audios(2))  # runs end to end on packed weights


def test_default_policy_leaves_embedding_float_and_reports_it() -> None:
    model = TinyModel.create()
    qmodel, report = quantize_model(model, Coarse())
    assert report.skipped == ["tok"]
    assert qmodel.store.params["tok.weight"].dtype == np.float16
    assert "tok" not in qmodel.store.packed


def test_packed_store_cache_budget() -> None:
    model = TinyModel.create()
    qmodel, _ = quantize_model(model, Coarse())
    store = qmodel.store
    store.linear("l1", audios(1)[0])
    assert store.cached_bytes() == 0  # default: nothing kept beyond the call
    big = PackedWeightStore(model.store.params, model.store.weight_infos(), store.packed, cache_bytes=48 * 4 + 64 * 4)
    big.matrix_t("l1")
    big.matrix_t("conv")
    assert big.cached_bytes() == 48 * 4 + 64 * 4
    assert big.matrix_t("l1") is big.matrix_t("l1")
    big.matrix_t("l2")  # evicts the least recently used (conv)
    assert list(big._lru) == ["l1", "l2"]


# -- calibration ----------------------------------------------------------------------------


def test_calibration_is_sequential_on_quantized_outputs() -> None:
    model = TinyModel.create()
    q = CalibratedCoarse()
    cal_audios = audios(3)
    qmodel, report = quantize_model(model, q, QuantizationPolicy(quantize_embeddings=True), cal_audios)
    assert report.n_calibration_audios == 3 and report.needs_calibration
    stats = {name: s for (shape, s), name in zip(q.seen, ["l1", "conv", "l2", "tok"])}
    assert all(isinstance(s, LayerStats) for s in stats.values())
    x = np.stack(cal_audios).reshape(-1, 6).astype(np.float64)
    assert stats["l1"].n_rows == 12
    np.testing.assert_allclose(stats["l1"].xtx, x.T @ x, rtol=1e-10)

    packed = qmodel.store.packed
    h_q = np.maximum(x @ packed["l1"].dequantize().T + model.store.param("l1.bias"), 0)
    np.testing.assert_allclose(stats["conv"].xtx, h_q.T @ h_q, rtol=1e-5, atol=1e-4)
    h_float = np.maximum(x @ model.store.matrix("l1").T + model.store.param("l1.bias"), 0)
    assert not np.allclose(stats["conv"].xtx, h_float.T @ h_float, rtol=1e-3)
    h2_q = h_q @ packed["conv"].dequantize().T
    np.testing.assert_allclose(stats["l2"].xtx, h2_q.T @ h2_q, rtol=1e-5, atol=1e-4)


def test_calibration_reports_layers_never_reached() -> None:
    model = TinyModel.create()
    model.skip_l2 = True
    with pytest.raises(RuntimeError, match="never reached layer.*l2"):
        quantize_model(model, CalibratedCoarse(), calibration_audios=audios())


def test_calibration_requires_audio() -> None:
    with pytest.raises(ValueError, match="needs calibration audio"):
        quantize_model(TinyModel.create(), CalibratedCoarse())


def test_calibrating_store_passes_unselected_layers_through() -> None:
    model = TinyModel.create()
    store = CalibratingQuantizingStore(model.store, {TinyModel.INFOS[0].name: CalibratedCoarse()}, [TinyModel.INFOS[0]])
    x = audios(1)[0]
    np.testing.assert_array_equal(store.linear("l2", np.ones((2, 8), np.float32)), model.store.linear("l2", np.ones((2, 8), np.float32)))
    store.linear("l1", x)
    assert list(store.packed) == ["l1"] and store.missing() == []
    assert isinstance(store.packed["l1"], PackedTensor)


# -- plugin failures ------------------------------------------------------------------------


class NaNQuantizer(Coarse):
    name = "nan-maker"

    def quantize(self, weight, stats):
        qt = super().quantize(weight, stats)
        if weight.shape == (8, 8):
            qt.scales[...] = np.nan  # bypasses __post_init__, caught by validate()
        return qt


class Crashing(Coarse):
    name = "crasher"

    def quantize(self, weight, stats):
        raise ZeroDivisionError("oops\n  more")


class WrongShape(Coarse):
    name = "wrong-shape"

    def quantize(self, weight, stats):
        return QuantizedTensor(codes=np.zeros((1, 1), int), code_bits=4, scales=[[1.0]])


class Returns64BitNaN(Coarse):
    name = "nan-ctor"

    def quantize(self, weight, stats):
        return QuantizedTensor(codes=np.zeros(weight.shape, int), code_bits=4, scales=np.full((weight.shape[0], 1), np.nan))


@pytest.mark.parametrize(
    ("quantizer", "match"),
    [
        (NaNQuantizer(), r"^plugin 'nan-maker' failed on layer 'conv': scales contain NaN or inf$"),
        (Crashing(), r"^plugin 'crasher' failed on layer 'l1': ZeroDivisionError: oops more$"),
        (WrongShape(), r"^plugin 'wrong-shape' failed on layer 'l1': codes shape \(1, 1\) != weight shape \(8, 6\)$"),
        (Returns64BitNaN(), r"^plugin 'nan-ctor' failed on layer 'l1': QuantizedTensorError: scales contain NaN"),
    ],
)
def test_plugin_failures_name_plugin_and_layer(quantizer: Quantizer, match: str) -> None:
    with pytest.raises(PluginError, match=match):
        quantize_model(TinyModel.create(), quantizer)


def test_plugin_failure_during_calibration_names_layer() -> None:
    class CalNaN(NaNQuantizer):
        name = "cal-nan"
        needs_calibration = True

    with pytest.raises(PluginError, match="plugin 'cal-nan' failed on layer 'conv'"):
        quantize_model(TinyModel.create(), CalNaN(), calibration_audios=audios())


def test_plugin_gets_a_copy_of_the_weight() -> None:
    class Vandal(Coarse):
        name = "vandal"

        def quantize(self, weight, stats):
            qt = super().quantize(weight, stats)
            weight[...] = 1e9
            return qt

    model = TinyModel.create()
    before = model.store.matrix("l1").copy()
    quantize_model(model, Vandal())
    np.testing.assert_array_equal(model.store.matrix("l1"), before)
