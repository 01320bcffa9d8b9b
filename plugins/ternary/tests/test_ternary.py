import math

import numpy as np
import pytest

qbench_ternary = pytest.importorskip("qbench_ternary", reason="pip install -e plugins/ternary")
from qbench.quant.packing import pack_quantized  # noqa: E402
from qbench.plugin_manager import get_quantizer  # noqa: E402
from qbench import dequantize  # noqa: E402

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
