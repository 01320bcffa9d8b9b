import numpy as np
import pytest

qbench_logscale = pytest.importorskip("qbench_logscale", reason="pip install -e plugins/logscale")
from qbench.quant.packing import pack_quantized  # noqa: E402
from qbench.plugin_manager import get_quantizer  # noqa: E402
from qbench import dequantize  # noqa: E402

LogScale = qbench_logscale.LogScaleQuantizer


def test_registered() -> None:
    assert get_quantizer("logscale") is LogScale


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("zero_code", [True, False])
def test_values_are_signed_powers_of_two_of_the_row_max(bits: int, zero_code: bool) -> None:
    w = np.random.default_rng(bits).normal(size=(16, 64)).astype(np.float32)
    qt = LogScale(LogScale.Config(bits=bits, zero_code=zero_code)).quantize(w, None)
    assert qt.codebook is not None and qt.codebook.size == 2**bits and not qt.signed
    m = np.abs(w).max(axis=1, keepdims=True)
    np.testing.assert_allclose(qt.scales, m, rtol=1e-6)
    ratio = dequantize(qt) / m
    nonzero = ratio != 0
    e = -np.log2(np.abs(ratio[nonzero]))
    e_max = 2 ** (bits - 1) - (2 if zero_code else 1)
    np.testing.assert_allclose(e, np.round(e), atol=1e-5)
    assert e.min() >= 0 and e.max() <= e_max + 1e-5
    assert np.all(np.sign(ratio[nonzero]) == np.sign(w[nonzero]))
    if not zero_code:
        assert nonzero.all()


def test_log_domain_rounding_by_hand() -> None:
    # max 1.0; 0.72 > 2^-0.5 = 0.707 -> 1; 0.7 and 0.6 < 0.707 -> 0.5; 0.3 -> 0.25 (2^-1.5 = 0.354); tiny -> 0
    w = np.array([[1.0, -0.72, 0.6, 0.3, -0.3, 0.01, 0.7]], np.float32)
    qt = LogScale(LogScale.Config(bits=3, zero_code=True)).quantize(w, None)
    np.testing.assert_allclose(dequantize(qt), [[1.0, -1.0, 0.5, 0.25, -0.25, 0.0, 0.5]])
    # codes: sign bit on top (4), exponent field below; field 3 is the zero code
    assert qt.codes.tolist() == [[0, 4, 1, 2, 6, 3, 1]]


def test_group_granularity_and_packed_size() -> None:
    w = np.random.default_rng(0).normal(size=(384, 384)).astype(np.float32)
    qt = LogScale(LogScale.Config(bits=4, granularity="group", group_size=128)).quantize(w, None)
    assert qt.scales.shape == (384, 3)
    np.testing.assert_allclose(qt.scales[:, 2], np.abs(w[:, 256:]).max(axis=1), rtol=1e-6)
    pt = pack_quantized(qt)
    assert pt.code_nbytes == 73728
    assert pt.nbytes == 73728 + 384 * 3 * 2 + 16 * 4
    np.testing.assert_allclose(pt.dequantize(), dequantize(qt), rtol=1e-3)


def test_group_scales_are_those_of_0_1_0() -> None:
    """The group maxima now come from `qbench.group_reduce`; 0.1.0 reduced with `np.maximum.at`.
    Both are exact, so scales and codes must match bit for bit (partial last group included)."""
    w = np.random.default_rng(3).standard_t(3, size=(20, 300)).astype(np.float32)
    w[4, 256:] = 0.0  # an all-zero (partial) group
    absw = np.abs(w.astype(np.float64))
    col_group = np.arange(300) // 128
    m = np.zeros((20, 3))
    np.maximum.at(m.T, col_group, absw.T)
    qt = LogScale(LogScale.Config(granularity="group", group_size=128, bits=3)).quantize(w, None)
    np.testing.assert_array_equal(qt.scales, m.astype(np.float32))
    safe = np.where(m[:, col_group] > 0, m[:, col_group], 1.0)
    with np.errstate(divide="ignore"):
        e = np.clip(np.rint(-np.log2(absw / safe)), 0, 2).astype(np.int16)
    e[absw / safe < 2.0**-3] = 3
    np.testing.assert_array_equal(qt.codes, ((w < 0) * 4 + e).astype(np.uint8))
