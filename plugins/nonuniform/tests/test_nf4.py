import numpy as np
import pytest

qbench_nonuniform = pytest.importorskip("qbench_nonuniform", reason="pip install -e plugins/nonuniform")
from qbench_nonuniform.nf4 import (  # noqa: E402
    NF4Quantizer,
    normal_float_codebook,
    normal_float_offset,
)

from qbench import dequantize  # noqa: E402
from qbench.quant.packing import pack_quantized  # noqa: E402
from qbench.quant.settings import parse_settings  # noqa: E402

#: bitsandbytes' published NF4 table (functional.py, `get_4bit_type("nf4")`; QLoRA appendix E)
NF4_PUBLISHED = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
]


def test_4bit_table_is_the_published_nf4() -> None:
    assert normal_float_offset(4) == pytest.approx(0.9677083, abs=1e-7)
    np.testing.assert_allclose(normal_float_codebook(4), NF4_PUBLISHED, rtol=0, atol=1e-6)
    # and with bitsandbytes' literal offset too
    np.testing.assert_allclose(normal_float_codebook(4, offset=0.9677083), NF4_PUBLISHED, rtol=0, atol=1e-6)


@pytest.mark.parametrize("bits", range(2, 9))
def test_k_bit_tables_have_exact_zero_and_one_more_positive_level(bits: int) -> None:
    table = normal_float_codebook(bits)
    assert table.shape == (1 << bits,)
    assert np.all(np.diff(table) > 0) and table[0] == -1.0 and table[-1] == 1.0
    zero = int(np.flatnonzero(table == 0.0)[0])
    assert zero == (1 << (bits - 1)) - 1  # 2^(b-1) - 1 negative levels, 2^(b-1) positive ones


def test_hand_checked_block_absmax_and_nearest_level() -> None:
    # one block of 4; absmax 2.0 -> scaled [1, -0.35, 0.03, 0]: nearest NF4 levels 15, 3, 7 (0.0), 7
    w = np.array([[2.0, -0.7, 0.06, 0.0]], np.float32)
    qt = NF4Quantizer(NF4Quantizer.Config(group_size=64)).quantize(w, None)
    assert qt.group_size is None and qt.scales.tolist() == [[2.0]]  # block wider than the row = per row
    assert qt.codes.tolist() == [[15, 3, 7, 7]]
    np.testing.assert_allclose(dequantize(qt), [[2.0, 2 * NF4_PUBLISHED[3], 0.0, 0.0]], atol=2e-7)


def test_blocks_of_64_columns_and_harness_round_trip() -> None:
    w = np.random.default_rng(0).normal(size=(384, 384)).astype(np.float32)
    w[5, 64:128] = 0.0  # an all-zero block
    qt = NF4Quantizer().quantize(w, None)
    assert qt.group_size == 64 and qt.scales.shape == (384, 6) and qt.codebook.shape == (16,)
    np.testing.assert_allclose(qt.scales[:, 1][6:], np.abs(w[6:, 64:128]).max(axis=1), rtol=1e-3)  # float16 scales
    assert qt.scales[5, 1] == 1.0 and not dequantize(qt)[5, 64:128].any()
    pt = pack_quantized(qt)
    assert pt.code_nbytes == 384 * 384 // 2 and pt.nbytes == pt.code_nbytes + 384 * 6 * 2 + 16 * 4
    np.testing.assert_array_equal(pt.dequantize(), dequantize(qt))  # scales were already float16-exact
    # every weight took its nearest level of the stored scale
    q = dequantize(qt)
    levels = normal_float_codebook(4)[None, None, :] * np.repeat(qt.scales, 64, axis=1)[:, :, None]
    best = np.abs(w[:, :, None] - levels).min(axis=2)
    assert np.all(np.abs(w - q) <= best + 1e-6)


def test_error_decreases_with_bits() -> None:
    w = np.random.default_rng(1).normal(size=(64, 256)).astype(np.float32)
    err = [np.linalg.norm(dequantize(NF4Quantizer({"bits": b}).quantize(w, None)) - w) for b in range(2, 9)]
    assert all(a > b for a, b in zip(err, err[1:]))


def test_settings() -> None:
    cfg = parse_settings(["bits=3", "group_size=null"], NF4Quantizer.Config, "nf4")
    assert (cfg.bits, cfg.group_size) == (3, None)
    with pytest.raises(ValueError, match="'bits'"):
        parse_settings(["bits=9"], NF4Quantizer.Config, "nf4")
