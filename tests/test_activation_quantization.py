"""Quantized activations: the rule, the exact integer product, the schemes as isolated plugins,
the lean embedded memory model and its budget, and runs that reproduce on any thread count."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from qbench.embedded.device_store import DeviceWeightStore
from qbench.embedded.devices import DeviceProfile
from qbench.embedded.session import DeviceSession, estimate_memory
from qbench.quant.activation_scheme import (
    ActivationRecord,
    ActivationScheme,
    StaticActivationScale,
    collect_stats,
    quantize_activations,
)
from qbench.quant.activation_store import ActivationQuantizingStore
from qbench.quant.apply import quantize_model
from qbench.quant.contract import QuantizedTensor
from qbench.quant.integer_matmul import (
    F32_EXACT,
    integer_accumulators,
    integer_linear,
    integer_weights,
)
from qbench.quant.packing import pack_quantized
from qbench.quant.plugin_process import ActivationSchemeProcess, PluginProcessError

A8 = ActivationScheme(bits=8, granularity="token")


def _record(scheme: ActivationScheme = A8, kv_cache: bool = False, static=None) -> ActivationRecord:
    return ActivationRecord(name="absmax", version="1.0", config={}, scheme=scheme, kv_cache=kv_cache,
                            static_scales=static)


# -- the rule ---------------------------------------------------------------------------------


def test_per_token_absmax_is_bitnets_rule_by_hand():
    # BitNet b1.58: s = absmax / 127 per token, q = round(x / s) clipped to +-127
    x = np.array([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0]], dtype=np.float32)
    a, s = quantize_activations(x, A8)
    assert s[0, 0] == np.float32(2.0) / np.float32(127) and s[1, 0] == 1.0
    # 1 / (2/127) = 63.5 rounds half to even: 64; 0.5 / (2/127) = 31.75: 32
    assert a[0].tolist() == [64.0, -127.0, 32.0] and a[1].tolist() == [0.0, 0.0, 0.0]
    away = quantize_activations(np.array([[2.5, -127.0]], np.float32), A8.model_copy(update={"rounding": "half_away"}))[0]
    assert away.tolist() == [[3.0, -127.0]]  # 2.5 half away from zero, where half-even gives 2


def test_static_asymmetric_codes_clip_and_carry_the_zero_point():
    scheme = ActivationScheme(bits=8, granularity="tensor", symmetric=False, dynamic=False)
    a, s = quantize_activations(np.array([[-1.0, 0.0, 24.5, -5.0]], np.float32), scheme,
                                StaticActivationScale(scale=0.1, zero=10))
    # q = clip(round(x / 0.1) + 10, 0, 255), a = q - 10
    assert a.tolist() == [[-10.0, 0.0, 245.0, -10.0]] and s.item() == np.float32(0.1)


def test_a_static_scheme_cannot_be_per_token():
    with pytest.raises(ValueError, match="per token"):
        ActivationScheme(bits=8, granularity="token", dynamic=False)


def test_per_tensor_dynamic_scales_are_per_batch_row():
    x = np.stack([np.full((3, 4), 1.0), np.full((3, 4), 10.0)]).astype(np.float32)
    _, s = quantize_activations(x, ActivationScheme(bits=8, granularity="tensor"))
    assert s.shape == (2, 1, 1) and s[0].item() == np.float32(1 / 127) and s[1].item() == np.float32(10 / 127)


# -- the integer product ----------------------------------------------------------------------


def _layouts():
    rng = np.random.default_rng(0)
    out = 24
    # 4-bit asymmetric with integer zero points, groups of 128 over 300 columns (the last short)
    g = -(-300 // 128)
    yield "int4-asym-g128", QuantizedTensor(codes=rng.integers(0, 16, (out, 300)).astype(np.int8), code_bits=4,
                                            group_size=128, signed=False, scales=rng.uniform(0.01, 0.1, (out, g)),
                                            zeros=rng.integers(0, 16, (out, g)).astype(np.float32))
    # 8-bit symmetric per channel over 1536 columns: 127 x 127 x 1536 passes 2^24, so chunks
    yield "int8-per-channel", QuantizedTensor(codes=rng.integers(-127, 128, (out, 1536)).astype(np.int8), code_bits=8,
                                              signed=True, scales=rng.uniform(0.001, 0.01, (out, 1)))
    # ternary, one scale per tensor
    yield "ternary", QuantizedTensor(codes=rng.integers(-1, 2, (out, 256)).astype(np.int8), code_bits=2, signed=True,
                                     packing="trit5", scales=np.array([[0.05]]))
    # HQQ-style float zero points
    yield "int3-float-zeros", QuantizedTensor(codes=rng.integers(0, 8, (out, 128)).astype(np.int8), code_bits=3,
                                              group_size=64, signed=False, scales=rng.uniform(0.01, 0.1, (out, 2)),
                                              zeros=rng.uniform(0, 7, (out, 2)))


@pytest.mark.parametrize("label,qt", list(_layouts()), ids=[label for label, _ in _layouts()])
def test_integer_product_equals_a_plain_integer_reference(label, qt):
    pt = pack_quantized(qt)
    w = integer_weights(pt)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 5, pt.shape[1])).astype(np.float32) * 4
    a, s = quantize_activations(x, A8)
    a_int = a.reshape(-1, pt.shape[1]).astype(np.int64)
    codes = pt._codes_range(0, pt.numel).reshape(pt.shape).astype(np.int64)
    accs = integer_accumulators(a.reshape(-1, pt.shape[1]), w, 127)
    for (g0, g1), acc in zip(w.groups, accs, strict=True):
        assert np.array_equal(acc, (a_int[:, g0:g1] @ codes[:, g0:g1].T).astype(np.float64)), (label, g0)
    # the rescaled output: s_x * sum_g s_w (acc - z A), in float64 from the int64 sums
    ref = np.zeros((a_int.shape[0], pt.shape[0]))
    scales = np.broadcast_to(pt.scales.astype(np.float64), (pt.shape[0], len(w.groups)))
    zeros = None if pt.zeros is None else np.broadcast_to(pt.zeros.astype(np.float64), scales.shape)
    for i, (g0, g1) in enumerate(w.groups):
        acc = (a_int[:, g0:g1] @ codes[:, g0:g1].T).astype(np.float64)
        if zeros is not None:
            acc -= zeros[:, i] * a_int[:, g0:g1].sum(axis=1, keepdims=True)
        ref += acc * scales[:, i]
    ref *= s.reshape(-1, 1).astype(np.float64)
    y = integer_linear(a, s, w, 127)
    np.testing.assert_array_equal(y.reshape(-1, pt.shape[0]), ref.astype(np.float32))
    # and it is the product of the dequantized operands, up to float rounding
    np.testing.assert_allclose(y.reshape(-1, pt.shape[0]), (a * s).reshape(-1, pt.shape[1]) @ pt.dequantize().T,
                               rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))


def test_chunks_keep_every_partial_sum_below_two_to_the_24():
    qt = next(qt for label, qt in _layouts() if label == "int8-per-channel")
    w = integer_weights(pack_quantized(qt))
    # one float32 GEMM over 1536 columns could not be trusted to be exact; chunks are
    step = F32_EXACT // (127 * w.max_code)
    assert step < 1536 and 127 * w.max_code * step <= F32_EXACT


# -- the store --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_rtn4():
    from tests.test_memory_budget import _RTN4, W, random_params, tiny_vocab
    from tests.test_whisper_model import DIMS

    small = W.Whisper.from_params(DIMS, random_params(DIMS), tiny_vocab(DIMS.n_vocab))
    model, _ = quantize_model(small, _RTN4())
    return small, model


def test_the_store_quantizes_linear_inputs_and_the_kv_cache(small_rtn4):
    _, model = small_rtn4
    store = ActivationQuantizingStore(model.store, _record(kv_cache=True))
    name = "encoder.blocks.0.mlp.fc1"
    pt = model.store.packed[name]
    x = np.random.default_rng(2).standard_normal((1, 7, pt.shape[1])).astype(np.float32)
    a, s = quantize_activations(x, A8)
    expected = (a * s) @ pt.dequantize().T + model.store.param(name + ".bias")
    np.testing.assert_allclose(store.linear(name, x), expected, rtol=1e-5, atol=1e-5)
    assert not np.allclose(store.linear(name, x), model.store.linear(name, x), rtol=1e-7, atol=0)
    kv = np.random.default_rng(3).standard_normal((2, 3, 5, 8)).astype(np.float32)
    stored = store.kv_cache_value("cross", 0, kv)
    # one scale per (row, head, token): at most 255 levels, the largest magnitude exact
    q = stored / (np.abs(kv).max(axis=-1, keepdims=True) / 127)
    np.testing.assert_allclose(q, np.rint(q), atol=1e-3)
    assert ActivationQuantizingStore(model.store, _record()).kv_cache_value("cross", 0, kv) is kv


def test_a_static_scheme_needs_every_scale(small_rtn4):
    _, model = small_rtn4
    static = ActivationScheme(bits=8, granularity="tensor", dynamic=False)
    store = ActivationQuantizingStore(model.store, _record(static, static={}))
    with pytest.raises(KeyError, match="no static activation scale"):
        store.linear("encoder.conv1", np.zeros((1, 4, model.store.infos["encoder.conv1"].shape[1]), np.float32))


# -- scheme plugins, in their own process -------------------------------------------------------


def test_builtin_static_schemes_calibrate_in_the_plugin_process():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(200_000).astype(np.float32)
    x[0] = 40.0  # one outlier: min/max follows it, the percentile does not
    stats = collect_stats([x])
    with ActivationSchemeProcess("static") as minmax:
        assert not minmax.scheme.dynamic and minmax.needs_calibration
        assert minmax.calibrate("layer", stats).scale == pytest.approx(40.0 / 127, rel=1e-6)
    with ActivationSchemeProcess("static", {"method": "percentile", "percentile": 99.9}) as pct:
        assert pct.calibrate("layer", stats).scale == pytest.approx(3.29 / 127, rel=0.03)
    with ActivationSchemeProcess("static", {"symmetric": False}) as asym:
        scale = asym.calibrate("layer", stats)
        assert scale.zero > 0 and scale.scale == pytest.approx((40.0 - x.min()) / 255, rel=1e-4)


def test_scheme_names_carry_their_bits():
    with ActivationSchemeProcess("absmax4") as p:
        assert p.name == "absmax" and p.scheme.bits == 4 and p.scheme.granularity == "token"
    with pytest.raises(PluginProcessError, match="unknown activation scheme 'nope'.*absmax"):
        ActivationSchemeProcess("nope").__enter__()


THIRD_PARTY = """
import os, pathlib
from qbench import hookimpl, QuantizerConfig
from qbench.quant.activation_scheme import ActivationQuantizer, ActivationScheme, StaticActivationScale

pathlib.Path(os.environ.get("TMPDIR", "/tmp"), "qbench_act_imported_{tag}").write_text(str(os.getpid()))

class Broken(ActivationQuantizer):
    name = "{tag}-crash"
    def scheme(self):
        return ActivationScheme(bits=8, granularity="tensor", dynamic=False)
    def calibrate(self, layer, stats):
        raise RuntimeError("boom in " + layer)

class Liar(ActivationQuantizer):
    name = "{tag}-liar"
    def scheme(self):
        return {{"bits": 8}}

class Asym(ActivationQuantizer):
    name = "{tag}-zero"
    def scheme(self):
        return ActivationScheme(bits=8, granularity="tensor", dynamic=False)
    def calibrate(self, layer, stats):
        return StaticActivationScale(scale=0.5, zero=3)  # a zero point in a symmetric scheme

@hookimpl
def qbench_register_activation_schemes():
    return [Broken, Liar, Asym]
"""


def test_third_party_schemes_are_discovered_and_run_only_in_their_process(install_plugin, tmp_path, monkeypatch):
    tag = "actplug"
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    install_plugin("qbench-actplug", THIRD_PARTY.format(tag=tag))
    stats = collect_stats([np.ones(10, np.float32)])
    with ActivationSchemeProcess(f"{tag}-crash") as crash:
        assert crash.distribution == "qbench-actplug"
        with pytest.raises(PluginProcessError, match=rf"'{tag}-crash' raised RuntimeError: boom in encoder.conv1"):
            crash.calibrate("encoder.conv1", stats)
    with pytest.raises(PluginProcessError, match="not an ActivationScheme"):
        ActivationSchemeProcess(f"{tag}-liar").__enter__()
    with ActivationSchemeProcess(f"{tag}-zero") as liar, pytest.raises(PluginProcessError, match="symmetric"):
        liar.calibrate("x", stats)
    # the plugin ran (its import left a marker) but never in this process
    assert (tmp_path / f"qbench_act_imported_{tag}").read_text() != str(__import__("os").getpid())
    assert "qbench_actplug" not in sys.modules


# -- memory: the lean runtime at stored precision, and the budget -----------------------------


def test_lean_memory_counts_activations_and_cache_at_their_precision(small_rtn4):
    _, model = small_rtn4
    store = DeviceWeightStore.from_store(model.store)
    f32 = model.lean_memory(store, 1, 30.0, 4.0, 4.0)
    a8 = model.lean_memory(store, 1, 30.0, 1.0, 4.0)
    a8kv8 = model.lean_memory(store, 1, 30.0, 1.0, 1.0)
    dims = model.dims
    cross = dims.n_text_layer * 2 * dims.n_audio_ctx * dims.n_text_state
    assert f32.phases["decode"].kv_cache_bytes == a8.phases["decode"].kv_cache_bytes > a8kv8.phases["decode"].kv_cache_bytes
    assert f32.phases["decoder-start"].kv_cache_bytes - a8kv8.phases["decoder-start"].kv_cache_bytes >= 3 * cross - \
        4 * dims.n_text_head * 2 * dims.n_text_layer * (dims.n_audio_ctx + dims.n_text_ctx)
    for phase in ("conv", "encoder-attention", "decoder-start"):
        assert a8.phases[phase].activations_bytes < f32.phases[phase].activations_bytes, phase
    # one window at a time, whatever the batch and however long the utterance
    assert model.lean_memory(store, 8, 35.0, 1.0, 1.0) == a8kv8
    # a shorter encoder window holds proportionally fewer positions
    short = model.with_encoder_seconds(10.0).lean_memory(store, 1, 10.0, 1.0, 1.0)
    assert short.phases["decoder-start"].kv_cache_bytes < a8kv8.phases["decoder-start"].kv_cache_bytes / 2


def test_a_device_budgets_quantized_activations_by_the_lean_runtime(small_rtn4):
    _, model = small_rtn4
    store = DeviceWeightStore.from_store(model.store)
    record = _record(kv_cache=True)
    lean = estimate_memory(model, store, None, activations=record)
    numpy_float = estimate_memory(model, store, None)
    assert lean.total_ram_bytes < numpy_float.total_ram_bytes
    between = DeviceProfile(name="between", ram_bytes=(lean.total_ram_bytes + numpy_float.total_ram_bytes) // 2,
                            storage_bytes=2**30, part="test", note="test")
    assert not DeviceSession(model, between).fits
    assert DeviceSession(model, between, activations=record).fits
    below = DeviceProfile(name="below", ram_bytes=lean.total_ram_bytes - 1, storage_bytes=2**30, part="t", note="t")
    session = DeviceSession(model, below, activations=record)
    assert not session.fits and "does not fit on below" in session.report.reason


# -- whole runs --------------------------------------------------------------------------------


def _run(tmp_path, name, tiny_en, data_dir, threads, **kw):
    from qbench.run import RunSpec, run_benchmark

    spec = RunSpec(limit=2, data_dir=str(data_dir), threads=threads, batch_size=2, output=str(tmp_path / f"{name}.json"), **kw)
    return run_benchmark(spec)


def test_a_w8a8_run_is_bit_identical_on_one_and_two_threads(tmp_path, tiny_en, data_dir):
    from qbench.leaderboard.entry import entry_from_result
    from qbench.quant.activation_scheme import ActivationChoice
    from qbench.run import RunSpec

    choice = ActivationChoice(name="absmax8", kv_cache=True)
    one = _run(tmp_path, "one", tiny_en, data_dir, 1, plugin="rtn", config={"bits": 8}, activations=choice)
    two = _run(tmp_path, "two", tiny_en, data_dir, 2, plugin="rtn", config={"bits": 8}, activations=choice)
    assert one.status == two.status == "complete"
    assert one.hypotheses_sha256 == two.hypotheses_sha256
    assert one.activations["scheme"]["bits"] == 8 and one.activations["kv_cache"]
    ops = one.device["compute"]["operations"]
    assert ops["int8xint8_mac"] > 0 and ops["act_quantize"] > 0 and ops["int8xfp16_mac"] > 0  # the fp16 embedding
    entry = entry_from_result(one, [])
    from qbench.leaderboard.validate import _compute_problems

    assert _compute_problems(entry) == [] and entry.compute.attention_bits == 32
    assert entry.activations.name == "absmax" and entry.label.endswith("-a-absmax-bits8-roundinghalfeven-kv")
    again = RunSpec.from_entry(entry)
    assert again.activations == ActivationChoice(name="absmax", config={"bits": 8, "rounding": "half_even"}, kv_cache=True)
    assert json.loads(entry.model_dump_json())["activations"]["scheme"]["granularity"] == "token"


def test_a_spec_without_activations_keeps_its_identity():
    from qbench.quant.activation_scheme import ActivationChoice
    from qbench.run import RunSpec

    plain = RunSpec(plugin="rtn", config={"bits": 4})
    assert "activations" not in plain.identity_fields() and "encoder_seconds" not in plain.identity_fields()
    assert RunSpec(plugin="rtn", config={"bits": 4}, activations=ActivationChoice(name="absmax8")).identity() != plain.identity()
    assert RunSpec(plugin="rtn", config={"bits": 4}, encoder_seconds=10).label == "rtn_bits4_enc10s"


def test_wav2vec2_runs_with_quantized_activations_and_in_chunks():
    from tests.test_wav2vec2_memory import BASE, _audio, _one_layer

    model = _one_layer(BASE)
    record = _record()
    audio = _audio(3.0)
    quantized = model.with_store(ActivationQuantizingStore(model.store, record))
    float_logits, a8_logits = model.logits(audio), quantized.logits(audio)
    assert float_logits.shape == a8_logits.shape and not np.array_equal(float_logits, a8_logits)
    # A8 on the real base widths stays close to float (the seeded model's logits are small)
    assert np.abs(a8_logits - float_logits).max() < 0.1 * np.abs(float_logits).max()
    with_attention = model.with_store(ActivationQuantizingStore(model.store, _record().model_copy(update={"attention": True})))
    att_logits = with_attention.logits(audio)
    assert not np.array_equal(att_logits, a8_logits) and np.abs(att_logits - float_logits).max() < 0.2 * np.abs(float_logits).max()
    chunked = model.with_encoder_seconds(1.0)
    assert chunked.chunked_logits(audio).shape[0] == 3 * model.logits(audio[:16000]).shape[0]
    store = DeviceWeightStore.from_store(model.store)
    lean = model.lean_memory(store, 1, 3.0, 1.0, 4.0)
    assert lean.peak.total_bytes < model.lean_memory(store, 1, 3.0, 4.0, 4.0).peak.total_bytes


def test_the_fit_ladder_finds_the_best_configuration_and_what_binds(small_rtn4):
    from qbench.embedded.fit_ladder import (
        CONFIGURATIONS,
        configuration_fit,
        ladder_fits,
        weights_bytes,
    )

    small, _ = small_rtn4
    matrices = sum(info.numel for info in small.store.weight_infos())
    rest = small.store.stored_bytes() - sum(np.asarray(small.store.params[i.name + ".weight"]).nbytes
                                            for i in small.store.weight_infos())
    assert weights_bytes(small, 4.0) == rest + matrices // 2
    by_label = {c.label: c for c in CONFIGURATIONS}
    a32 = configuration_fit(small, DeviceProfile(name="big", ram_bytes=2**40, storage_bytes=2**40, part="t", note="t"),
                            by_label["W4.25 A32"])
    a8kv8 = configuration_fit(small, DeviceProfile(name="big", ram_bytes=2**40, storage_bytes=2**40, part="t", note="t"),
                              by_label["W4.25 A8 KV8"])
    assert a8kv8.working_peak_bytes < a32.working_peak_bytes and a8kv8.weights_bytes == a32.weights_bytes
    # RAM between the two, flash for 4.25 bits but not 8.25: the best is W4.25 with quantized activations
    w8 = weights_bytes(small, 8.25)
    device = DeviceProfile(name="mcu", ram_bytes=(a8kv8.working_peak_bytes + a32.working_peak_bytes) // 2,
                           storage_bytes=w8 - 1, weights_execute_in_place=True, part="t", note="t")
    (rung,) = ladder_fits(small, [device])
    assert rung.best is not None and rung.best.configuration.weight_bits == 4.25
    assert rung.best.configuration.activation_bits is not None and "RAM" in rung.binding
    (nothing,) = ladder_fits(small, [device.model_copy(update={"storage_bytes": 1000})])
    assert nothing.best is None and nothing.fitting == 0 and "storage" in nothing.binding


def test_attention_on_quantized_operands_matches_its_definition():
    from qbench.models.attention import attention
    from qbench.quant.integer_attention import integer_attention

    rng = np.random.default_rng(4)
    b, tq, tk, h, dh = 2, 5, 7, 2, 8
    q = rng.standard_normal((b, tq, h * dh)).astype(np.float32)
    k = rng.standard_normal((b, h, tk, dh)).astype(np.float32)
    v = rng.standard_normal((b, h, tk, dh)).astype(np.float32)
    out = integer_attention(q, k, v, h, A8, causal_offset=2)
    # the reference, written out: dequantized Q and K, float softmax, 8-bit probabilities
    a_q, s_q = quantize_activations(q.reshape(b, tq, h, dh), A8)
    a_k, s_k = quantize_activations(k, A8)
    a_v, s_v = quantize_activations(v, A8)
    for i in range(b):
        for j in range(h):
            scores = (a_q[i, :, j].astype(np.int64) @ a_k[i, j].astype(np.int64).T) * s_q[i, :, j] * s_k[i, j, :, 0] / np.sqrt(dh)
            scores[np.arange(tk)[None, :] > 2 + np.arange(tq)[:, None]] = -np.inf
            p = np.exp(scores - scores.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
            ref = np.rint(p * 255) @ (a_v[i, j] * s_v[i, j]) / 255
            np.testing.assert_allclose(out[i, :, j * dh:(j + 1) * dh], ref, rtol=1e-4, atol=1e-5)
    # and close to float attention, which it approximates
    np.testing.assert_allclose(out, attention(q, k, v, h, causal_offset=2), atol=0.05)
    with pytest.raises(ValueError, match="not be exact"):
        integer_attention(np.zeros((1, 1, 2048), np.float32), np.zeros((1, 1, 1, 2048), np.float32),
                          np.zeros((1, 1, 1, 2048), np.float32), 1, A8)


def test_an_entry_s_activations_must_agree_with_their_scheme():
    from pydantic import ValidationError

    from qbench.leaderboard.entry import EntryActivations

    good = {"name": "static", "version": "1.0", "config": {"bits": 8}, "kv_cache": False,
            "scheme": {"bits": 8, "granularity": "tensor", "symmetric": True, "rounding": "half_even", "dynamic": False},
            "static_scales": {"encoder.conv1": {"scale": 0.01, "zero": 0}}}
    assert EntryActivations.model_validate(good).label == "a-static-bits8"
    for change, message in (({"static_scales": None}, "needs a scale"),
                            ({"static_scales": {"encoder.conv1": {"scale": 0.01, "zero": 3}}}, "zero point 3"),
                            ({"scheme": {**good["scheme"], "dynamic": True, "granularity": "token"}}, "no static scales")):
        with pytest.raises(ValidationError, match=message):
            EntryActivations.model_validate({**good, **change})
