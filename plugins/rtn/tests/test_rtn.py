import math

import numpy as np
import pytest

qbench_rtn = pytest.importorskip("qbench_rtn", reason="pip install -e plugins/rtn")
from qbench import dequantize  # noqa: E402
from qbench.plugin_manager import get_quantizer  # noqa: E402
from qbench.quant.packing import pack_quantized  # noqa: E402
from qbench.quant.settings import parse_settings  # noqa: E402

RTN = qbench_rtn.RTNQuantizer


def rel_error(w: np.ndarray, wq: np.ndarray) -> float:
    return float(np.linalg.norm(w - wq) / np.linalg.norm(w))


@pytest.fixture
def weight() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(384, 384)).astype(np.float32)


def test_registered_under_its_name() -> None:
    assert get_quantizer("rtn") is RTN


def test_rtn8_is_nearly_lossless(weight: np.ndarray) -> None:
    for group_size in (None, 128):
        qt = RTN(RTN.Config(bits=8, group_size=group_size)).quantize(weight, None)
        assert rel_error(weight, dequantize(qt)) < 0.01


@pytest.mark.parametrize("symmetric", [True, False])
def test_error_decreases_with_bits(weight: np.ndarray, symmetric: bool) -> None:
    errors = [
        rel_error(weight, dequantize(RTN(RTN.Config(bits=b, symmetric=symmetric)).quantize(weight, None)))
        for b in range(2, 9)
    ]
    assert all(a > b for a, b in zip(errors, errors[1:]))
    # each extra bit roughly halves the step (allowing for the coarse 2-bit end)
    assert errors[-1] < errors[2] / 16


@pytest.mark.parametrize("bits", range(2, 9))
def test_symmetric_codes_are_restricted_signed_range(weight: np.ndarray, bits: int) -> None:
    qt = RTN(RTN.Config(bits=bits, group_size=None)).quantize(weight, None)
    qmax = 2 ** (bits - 1) - 1
    assert qt.signed and qt.zeros is None and qt.code_bits == bits
    assert qt.codes.min() == -qmax and qt.codes.max() == qmax  # both row extremes hit exactly
    np.testing.assert_allclose(qt.scales[:, 0], np.abs(weight).max(axis=1) / qmax, rtol=1e-6)
    # the row's max-magnitude weight is reproduced exactly
    rows = np.arange(weight.shape[0])
    cols = np.abs(weight).argmax(axis=1)
    np.testing.assert_allclose(dequantize(qt)[rows, cols], weight[rows, cols], rtol=1e-6)


@pytest.mark.parametrize("bits", range(2, 9))
def test_asymmetric_codes_and_zero_points(weight: np.ndarray, bits: int) -> None:
    qt = RTN(RTN.Config(bits=bits, symmetric=False, group_size=64)).quantize(weight, None)
    maxq = 2**bits - 1
    assert not qt.signed and qt.zeros is not None
    assert qt.codes.min() >= 0 and qt.codes.max() <= maxq
    assert qt.scales.shape == qt.zeros.shape == (384, 6)
    assert np.all(qt.zeros == np.round(qt.zeros)) and qt.zeros.min() >= 0 and qt.zeros.max() <= maxq
    # zero is exactly representable: code == zero point dequantizes to 0
    w = np.zeros((2, 64), np.float32)
    w[:, 3] = [1.0, -2.0]
    qz = RTN(RTN.Config(bits=bits, symmetric=False, group_size=None)).quantize(w, None)
    assert np.count_nonzero(dequantize(qz)) == 2


def test_hand_checked_4bit_symmetric() -> None:
    w = np.array([[0.7, -0.35, 0.1, 0.0]], np.float32)
    qt = RTN(RTN.Config(bits=4, group_size=None)).quantize(w, None)
    assert qt.scales[0, 0] == pytest.approx(0.1)
    assert qt.codes.tolist() == [[7, -4, 1, 0]]  # -3.5 rounds half to even


def test_all_zero_rows_and_groups_wider_than_row() -> None:
    w = np.zeros((3, 10), np.float32)
    qt = RTN(RTN.Config(bits=4, group_size=128)).quantize(w, None)
    assert qt.group_size is None and qt.scales.shape == (3, 1)
    assert np.all(np.isfinite(qt.scales)) and not dequantize(qt).any()


@pytest.mark.parametrize("bits", range(2, 9))
def test_exact_packed_sizes(weight: np.ndarray, bits: int) -> None:
    pt = pack_quantized(RTN(RTN.Config(bits=bits, group_size=128)).quantize(weight, None))
    assert pt.code_nbytes == math.ceil(384 * 384 * bits / 8)
    assert pt.nbytes == pt.code_nbytes + 384 * 3 * 2
    if bits == 4:
        assert pt.code_nbytes == 73728
    pa = pack_quantized(RTN(RTN.Config(bits=bits, group_size=128, symmetric=False)).quantize(weight, None))
    assert pa.nbytes == pt.code_nbytes + 384 * 3 * 2 + 384 * 3  # uint8 zero points


def test_settings() -> None:
    cfg = parse_settings(["bits=3", "group_size=null", "symmetric=false"], RTN.Config, "rtn")
    assert (cfg.bits, cfg.group_size, cfg.symmetric) == (3, None, False)
    with pytest.raises(ValueError, match="'bits'"):
        parse_settings(["bits=1"], RTN.Config, "rtn")
