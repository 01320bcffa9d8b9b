"""GPTAQ's asymmetric calibration: the paired calibration pass and the target it gives GPTQ.

A quantizer that sets `wants_float_inputs` gets `LayerStats.dxtx = sum (x_float - x)^T x`. The
harness computes it by running every calibration audio twice in one pass, the first copy through
the float weights only. These tests check that this copy really is the float model on both
architectures, and that `asymmetric_target` minimises the loss it is derived for.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest
from test_wav2vec2_parity import _random_model, _small_config
from test_whisper_model import DIMS, random_params, tiny_vocab

import qbench.quant.apply as apply
from qbench.models import whisper as W
from qbench.models.weight_store import WeightStore
from qbench.quant.apply import QuantizationPolicy, quantize_model
from qbench.quant.contract import LayerStats, QuantizedTensor, Quantizer
from qbench.quant.error_feedback import (
    UniformGrid,
    asymmetric_target,
    error_feedback_quantize,
)


class CoarseWantingFloat(Quantizer):
    """Per-row 2-bit grid (large errors, so the quantized path drifts); records its stats."""

    name = "coarse-float"
    version = "1.0"
    needs_calibration = True
    wants_float_inputs = True

    def __init__(self, config=None):
        super().__init__(config)
        self.seen: list[LayerStats] = []

    def quantize(self, weight: np.ndarray, stats: LayerStats | None) -> QuantizedTensor:
        self.seen.append(stats)
        scale = np.abs(weight).max(axis=1, keepdims=True) / 1.5 + 1e-12
        codes = np.clip(np.rint(weight / scale), -2, 1).astype(np.int8)
        return QuantizedTensor(codes=codes, code_bits=2, scales=scale, signed=True)


class FloatInputs(WeightStore):
    """Records the first input every layer gets, on the float weights, as `[rows, in]`: only
    the rows the pass counts."""

    thread_safe = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.inputs: dict[str, np.ndarray] = {}
        self.mask = None

    @contextmanager
    def counting_rows(self, mask):
        self.mask = mask
        yield
        self.mask = None

    def linear(self, name, x):
        self.inputs.setdefault(name, np.array(apply.counted_rows(name, x, self.mask), copy=True).reshape(-1, x.shape[-1]))
        return super().linear(name, x)


def whisper_model():
    return W.Whisper.from_params(DIMS, random_params(DIMS), tiny_vocab(DIMS.n_vocab))


def wav2vec2_model():
    return _random_model(_small_config("group"))


@pytest.mark.parametrize("make_model", [whisper_model, wav2vec2_model], ids=["whisper", "wav2vec2"])
def test_the_paired_pass_feeds_every_layer_the_float_models_input_beside_its_own(make_model, monkeypatch):
    model = make_model()
    rng = np.random.default_rng(5)
    audios = [0.1 * rng.standard_normal(16000 * s).astype(np.float32) for s in (1, 2)]
    float_store = FloatInputs(model.store.params, model.store.weight_infos())
    model.with_store(float_store).calibration_forward(audios)

    pairs: list[tuple[np.ndarray, np.ndarray]] = []
    real_layer_stats = apply.layer_stats

    def recording_layer_stats(x, in_features, x_float=None):
        pairs.append((np.array(x, copy=True), np.array(x_float, copy=True)))
        return real_layer_stats(x, in_features, x_float)

    monkeypatch.setattr(apply, "layer_stats", recording_layer_stats)
    quantizer = CoarseWantingFloat()
    quantize_model(model, quantizer, QuantizationPolicy(quantize_embeddings=True), audios)

    names = [info.name for info in model.quantizable_weights()]
    assert len(pairs) == len(names) == len(quantizer.seen)
    drifted = 0
    for name, (x, x_float), stats in zip(names, pairs, quantizer.seen, strict=True):
        expected = float_store.inputs[name]
        x, x_float = x.reshape(expected.shape), x_float.reshape(expected.shape)
        assert x_float.shape == x.shape, name
        # the first copy of the audio is the float model, whatever has been quantized so far
        np.testing.assert_allclose(x_float, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max(), err_msg=name)
        x2, xf2 = x.reshape(-1, x.shape[-1]).astype(np.float64), x_float.reshape(-1, x.shape[-1]).astype(np.float64)
        np.testing.assert_allclose(stats.xtx, x2.T @ x2, rtol=1e-6, atol=1e-6 * np.abs(stats.xtx).max())
        np.testing.assert_allclose(stats.dxtx, (xf2 - x2).T @ x2, rtol=1e-6, atol=1e-6 * np.abs(stats.xtx).max())
        drifted += bool(np.abs(x - x_float).max() > 1e-2 * np.abs(x_float).max())
    assert not np.any(pairs[0][1] - pairs[0][0])  # nothing quantized before the first layer
    assert drifted >= len(names) // 2  # and the second copy really runs the quantized layers


def test_a_quantizer_that_does_not_want_float_inputs_gets_no_dxtx_and_the_same_codes():
    model = whisper_model()
    audios = [0.1 * np.random.default_rng(6).standard_normal(16000).astype(np.float32)]

    class Plain(CoarseWantingFloat):
        wants_float_inputs = False

    plain, paired = Plain(), CoarseWantingFloat()
    qa, _ = quantize_model(model, plain, None, audios)
    qb, _ = quantize_model(model, paired, None, audios)
    assert all(s.dxtx is None for s in plain.seen) and all(s.dxtx is not None for s in paired.seen)
    # the quantized half of the paired pass computes what the plain pass does
    for a, b in zip(plain.seen, paired.seen, strict=True):
        np.testing.assert_allclose(a.xtx, b.xtx, rtol=1e-5, atol=1e-5 * np.abs(a.xtx).max())
    for name, pt in qa.store.packed.items():
        np.testing.assert_array_equal(pt.dequantize(), qb.store.packed[name].dequantize())


def drifted_inputs(n: int = 400, d: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x_float = rng.standard_normal((n, d)) @ rng.standard_normal((d, d))
    # an earlier quantized layer distorts its output mostly linearly, plus some noise
    x = x_float @ (np.eye(d) + 0.3 * rng.standard_normal((d, d)) / np.sqrt(d)) + 0.05 * rng.standard_normal((n, d))
    w = rng.standard_normal((6, d))
    return x_float, x, w


def stats_of(x_float: np.ndarray, x: np.ndarray) -> LayerStats:
    return LayerStats(xtx=x.T @ x, n_rows=len(x), dxtx=(x_float - x).T @ x)


def asymmetric_loss(x_float, x, w, w_q) -> float:
    return float(np.sum((x @ w_q.T - x_float @ w.T) ** 2))


def test_the_asymmetric_target_is_the_least_squares_fit_to_the_float_output():
    x_float, x, w = drifted_inputs()
    target = asymmetric_target(w, stats_of(x_float, x), alpha=1.0, percdamp=0.0)
    # normal equations of min ||x W*^T - x_float W^T||: x^T (x W*^T - x_float W^T) = 0
    residual = x.T @ (x @ target.T - x_float @ w.T)
    assert np.abs(residual).max() < 1e-6 * np.abs(x.T @ x_float @ w.T).max()
    assert asymmetric_loss(x_float, x, w, target) < 0.05 * asymmetric_loss(x_float, x, w, w)
    half = asymmetric_target(w, stats_of(x_float, x), alpha=0.5, percdamp=0.0)
    np.testing.assert_allclose(half, (w + target) / 2, rtol=1e-9, atol=1e-12)


def test_without_drift_or_alpha_the_target_is_the_weight_itself():
    x_float, _, w = drifted_inputs()
    np.testing.assert_array_equal(asymmetric_target(w, stats_of(x_float, x_float), 1.0, 0.01), w)
    np.testing.assert_array_equal(asymmetric_target(w, LayerStats(xtx=x_float.T @ x_float, n_rows=400), 0.0, 0.01), w)
    with pytest.raises(ValueError, match="dxtx"):
        asymmetric_target(w, LayerStats(xtx=x_float.T @ x_float, n_rows=400), 0.25, 0.01)
    with pytest.raises(ValueError, match="shape"):
        asymmetric_target(w, LayerStats(xtx=np.eye(12), n_rows=1, dxtx=np.eye(3)), 0.25, 0.01)


def test_gptq_on_the_asymmetric_target_matches_the_float_output_better_than_plain_gptq():
    x_float, x, w = drifted_inputs(d=64, seed=3)
    stats = stats_of(x_float, x)
    h = 2 * stats.xtx / stats.n_rows
    grid = UniformGrid(3, symmetric=True, full_range=True)

    def quantized(weight):
        r = error_feedback_quantize(weight, h, grid, group_size=32)
        return r.codes * np.repeat(r.scales, 32, axis=1)

    plain = asymmetric_loss(x_float, x, w, quantized(w))
    asym = asymmetric_loss(x_float, x, w, quantized(asymmetric_target(w, stats, 1.0, 0.01)))
    assert asym < 0.7 * plain


def test_refit_scales_recovers_exact_scales_and_never_raises_the_output_error():
    from qbench.quant.contract import apply_scales
    from qbench.quant.error_feedback import refit_scales

    rng = np.random.default_rng(8)
    codes = rng.integers(-2, 2, size=(5, 64)).astype(np.int16)
    true = rng.uniform(0.5, 2.0, size=(5, 4))
    x = rng.standard_normal((300, 64)) @ rng.standard_normal((64, 64))
    h = x.T @ x
    w = apply_scales(codes.astype(np.float32), true, None, 16).astype(np.float64)
    np.testing.assert_allclose(refit_scales(w, h, codes, np.ones((5, 4)), None, 16, ridge=0.0), true, rtol=1e-6)
    zeros = rng.integers(0, 3, size=(5, 4)).astype(np.float64)
    w_z = apply_scales(codes.astype(np.float32), true, zeros, 16).astype(np.float64)
    np.testing.assert_allclose(refit_scales(w_z, h, codes, np.ones((5, 4)), zeros, 16, ridge=0.0), true, rtol=1e-6)

    noisy = w + 0.3 * rng.standard_normal(w.shape)
    grid = UniformGrid(2, symmetric=True, full_range=True)
    r = error_feedback_quantize(noisy, 2 * h / 300, grid, group_size=16)
    refit = refit_scales(noisy, h, r.codes, r.scales, None, 16)

    def err(s):
        d = noisy - apply_scales(r.codes.astype(np.float32), s, None, 16).astype(np.float64)
        return np.einsum("ri,ij,rj->r", d, h, d)

    assert np.all(err(refit) <= err(r.scales) * (1 + 1e-9)) and err(refit).sum() < err(r.scales).sum()
    # a group of all-zero codes has no say in the output: its scale stays
    codes[0, :16] = 0
    kept = refit_scales(w, h, codes, np.full((5, 4), 7.0), None, 16)
    assert kept[0, 0] == 7.0
    with pytest.raises(ValueError, match="one scale per row"):
        refit_scales(w, h, codes, np.ones((1, 4)), None, 16)


@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "zero-points"])
def test_alternating_sweeps_and_refits_never_raise_the_output_error_and_zero_rounds_is_one_refit(symmetric):
    from qbench.quant.error_feedback import output_error, refit_alternating, refit_scales

    rng = np.random.default_rng(9)
    x = rng.standard_normal((400, 64)) @ rng.standard_normal((64, 64))
    h = 2 * x.T @ x / 400
    w = rng.standard_normal((12, 64)) * rng.uniform(0.2, 3.0, size=64)
    grid = UniformGrid(2, symmetric=symmetric, full_range=symmetric)
    first = error_feedback_quantize(w, h, grid, group_size=16)
    once = refit_alternating(w, h, grid, first, 0)
    np.testing.assert_array_equal(once.scales, refit_scales(w, h, first.codes, first.scales, first.zeros, 16))
    np.testing.assert_array_equal(once.codes, first.codes)
    errors = [output_error(w, h, r.codes, r.scales, r.zeros, 16)
              for r in (first, once, refit_alternating(w, h, grid, first, 4))]
    assert errors[2] <= errors[1] < errors[0]
    # a sweep on given scales rounds onto exactly those scales
    fixed = error_feedback_quantize(w, h, grid, group_size=16, fixed_grid=(once.scales, once.zeros))
    np.testing.assert_array_equal(fixed.scales, once.scales)
    with pytest.raises(ValueError, match="fixed grid scales of shape"):
        error_feedback_quantize(w, h, grid, group_size=16, fixed_grid=(once.scales[:, :2], None))


def test_refit_rounds_need_refit_scales_and_stay_out_of_labels_when_off():
    from qbench_gptq import GPTQQuantizer

    with pytest.raises(ValueError, match="refit_rounds needs refit_scales"):
        GPTQQuantizer({"refit_rounds": 2})
    assert "refit_rounds" not in GPTQQuantizer({"refit_scales": True}).config.model_dump()
    assert GPTQQuantizer({"refit_scales": True, "refit_rounds": 2}).config.model_dump()["refit_rounds"] == 2
