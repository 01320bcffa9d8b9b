import math

import numpy as np
import pytest

qbench_ternary = pytest.importorskip("qbench_ternary", reason="pip install -e plugins/ternary")
from qbench import LayerStats, dequantize  # noqa: E402
from qbench.plugin_manager import discover_quantizers, get_quantizer  # noqa: E402
from qbench.quant.apply import layer_stats  # noqa: E402
from qbench.quant.packing import pack_quantized  # noqa: E402

Ternary = qbench_ternary.TernaryQuantizer


def test_registered() -> None:
    assert get_quantizer("ternary") is Ternary


def test_bitnet_absmean_by_hand() -> None:
    w = np.array([[0.9, -0.1, 0.3, 0.0], [-1.5, 0.45, 0.05, 0.1]], np.float32)
    qt = Ternary().quantize(w, None)
    gamma = np.abs(w).mean()  # 3.4 / 8 = 0.425
    assert gamma == pytest.approx(0.425)
    # w / gamma = [2.12, -0.24, 0.71, 0], [-3.53, 1.06, 0.12, 0.24]
    assert qt.codes.tolist() == [[1, 0, 1, 0], [-1, 1, 0, 0]]
    assert qt.scales.shape == (1, 1) and qt.scales[0, 0] == pytest.approx(gamma)
    np.testing.assert_allclose(dequantize(qt), qt.codes * gamma, rtol=1e-6)


@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
def test_codes_are_exactly_ternary_and_gamma_is_mean_abs(granularity: str) -> None:
    w = np.random.default_rng(0).normal(size=(48, 100)).astype(np.float32)
    cfg = Ternary.Config(granularity=granularity, group_size=32) if granularity == "group" else Ternary.Config(granularity=granularity)
    qt = Ternary(cfg).quantize(w, None)
    assert set(np.unique(qt.codes).tolist()) == {-1, 0, 1}
    if granularity == "tensor":
        np.testing.assert_allclose(qt.scales, [[np.abs(w).mean()]], rtol=1e-6)
    elif granularity == "channel":
        np.testing.assert_allclose(qt.scales[:, 0], np.abs(w).mean(axis=1), rtol=1e-6)
    else:
        assert qt.scales.shape == (48, 4) and qt.group_size == 32
        np.testing.assert_allclose(qt.scales[:, 3], np.abs(w[:, 96:]).mean(axis=1), rtol=1e-6)
        gamma = np.abs(w[:, 32:64]).mean(axis=1, keepdims=True)
        expected = np.clip(np.rint(w[:, 32:64] / (gamma + 1e-5)), -1, 1)
        np.testing.assert_array_equal(qt.codes[:, 32:64], expected)
    assert np.linalg.norm(w - dequantize(qt)) / np.linalg.norm(w) < 0.6


def test_packed_sizes() -> None:
    w = np.random.default_rng(1).normal(size=(384, 384)).astype(np.float32)
    trit = pack_quantized(Ternary().quantize(w, None))
    assert trit.code_nbytes == math.ceil(384 * 384 / 5) and trit.nbytes == trit.code_nbytes + 2
    assert trit.bits_per_weight == pytest.approx(1.6, abs=0.01)
    two = pack_quantized(Ternary(Ternary.Config(packing="2bit")).quantize(w, None))
    assert two.code_nbytes == 384 * 384 // 4
    np.testing.assert_array_equal(trit.dequantize(), two.dequantize())


def test_group_size_requires_group_granularity() -> None:
    with pytest.raises(ValueError):
        Ternary.Config(granularity="channel", group_size=64)


def test_zero_weight_is_finite() -> None:
    qt = Ternary().quantize(np.zeros((3, 5), np.float32), None)
    assert not qt.codes.any() and np.isfinite(qt.scales).all()


def test_a_recorded_full_config_validates_again() -> None:
    # results record the whole config; `qbench verify` reruns from it
    for cfg in (Ternary.Config(), Ternary.Config(granularity="channel"), Ternary.Config(granularity="group", group_size=32)):
        assert Ternary.Config.model_validate(cfg.model_dump()) == cfg


# -- ternary-gptq: the same grid with GPTQ's error feedback ------------------------------------

TernaryGPTQ = qbench_ternary.TernaryGPTQQuantizer


def correlated_problem(seed: int = 0, out_f: int = 48, in_f: int = 160) -> tuple[np.ndarray, np.ndarray, LayerStats]:
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(in_f, in_f)) / np.sqrt(in_f)
    x = (rng.normal(size=(1200, in_f)) @ mix + 0.2 * rng.normal(size=(1200, in_f))) * np.exp(rng.normal(scale=0.5, size=in_f))
    w = rng.normal(size=(out_f, in_f))
    x, w = x.astype(np.float32), w.astype(np.float32)
    return w, x, layer_stats(x, in_f)


def output_error(w: np.ndarray, wq: np.ndarray, x: np.ndarray) -> float:
    return float(np.linalg.norm(x @ w.T - x @ wq.T) / np.linalg.norm(x @ w.T))


def test_ternary_gptq_registered_and_calibrated() -> None:
    entries, _ = discover_quantizers()
    assert entries["ternary-gptq"].cls is TernaryGPTQ and entries["ternary-gptq"].needs_calibration
    assert not entries["ternary"].needs_calibration and entries["ternary-gptq"].distribution == "qbench-ternary"


def test_error_feedback_by_hand() -> None:
    # one row [0.9, 0.2], gamma = mean|w| = 0.55 (per tensor), H = [[2, 1], [1, 2]], no damping:
    # column 0: 0.9 / 0.55 = 1.64 -> code 1 (value 0.55), error 0.35; column 1 gets
    # 0.35 * H01 / H11 = 0.175: 0.375 / 0.55 = 0.68 -> code 1, where plain absmean gives 0.
    w = np.array([[0.9, 0.2]], np.float32)
    stats = LayerStats(xtx=np.array([[2.0, 1.0], [1.0, 2.0]]) / 2, n_rows=1)  # H = 2 xtx / n
    qt = TernaryGPTQ(TernaryGPTQ.Config(percdamp=0.0)).quantize(w, stats)
    assert qt.codes.tolist() == [[1, 1]] and qt.scales.shape == (1, 1)
    assert qt.scales[0, 0] == pytest.approx(0.55)
    assert Ternary().quantize(w, None).codes.tolist() == [[1, 0]]


@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
def test_identity_hessian_gives_plain_absmean(granularity: str) -> None:
    w, _, _ = correlated_problem(1)
    kw = dict(granularity=granularity) | (dict(group_size=32) if granularity == "group" else {})
    plain = Ternary(Ternary.Config(**kw)).quantize(w, None)
    ef = TernaryGPTQ(TernaryGPTQ.Config(**kw, static_groups=True)).quantize(w, LayerStats(xtx=np.eye(160), n_rows=2))
    np.testing.assert_array_equal(ef.codes, plain.codes)
    np.testing.assert_allclose(ef.scales, plain.scales, rtol=1e-6)
    assert ef.group_size == plain.group_size and ef.packing == plain.packing == "trit5"


@pytest.mark.parametrize(
    "kw",
    [dict(granularity="tensor"), dict(granularity="channel"), dict(granularity="group", group_size=32),
     dict(granularity="group", group_size=32, static_groups=True), dict(granularity="channel", act_order=True)],
    ids=repr,
)
def test_error_feedback_lowers_calibration_output_error(kw: dict) -> None:
    w, x, stats = correlated_problem()
    base = {k: v for k, v in kw.items() if k in ("granularity", "group_size")}
    plain = dequantize(Ternary(Ternary.Config(**base)).quantize(w, None))
    qt = TernaryGPTQ(TernaryGPTQ.Config(**kw)).quantize(w, stats)
    assert set(np.unique(qt.codes).tolist()) <= {-1, 0, 1}
    e_ef, e_plain = output_error(w, dequantize(qt), x), output_error(w, plain, x)
    assert e_ef < 0.92 * e_plain, (e_ef, e_plain)  # the grid is coarse: error feedback helps less than at 3 bits


def test_ternary_gptq_needs_stats_and_validates_config_again() -> None:
    with pytest.raises(ValueError, match="calibration"):
        TernaryGPTQ().quantize(np.ones((2, 2), np.float32), None)
    with pytest.raises(ValueError):
        TernaryGPTQ.Config(granularity="channel", group_size=64)
    cfg = TernaryGPTQ.Config(granularity="group", group_size=64, act_order=True)
    assert TernaryGPTQ.Config.model_validate(cfg.model_dump()) == cfg


def test_ternary_gptq_wav2vec2_run_end_to_end(run_seeded_wav2vec2) -> None:
    r = run_seeded_wav2vec2("--calibration-limit", "2", "--plugin", "ternary-gptq", "--set", "granularity=channel")
    assert r["status"] == "complete" and r["quantization"]["quantizer"] == "ternary-gptq"
    assert r["metrics"]["model_bytes"] < r["quantization"]["float_model_bytes"]
