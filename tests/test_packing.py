import math

import numpy as np
import pytest

from qbench.quant.packing import (
    PackedTensor,
    pack_bits,
    pack_quantized,
    pack_trits,
    packed_code_bytes,
    unpack_bits,
    unpack_trits,
)
from qbench.quant.contract import QuantizedTensor, QuantizedTensorError, dequantize


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 63, 1001])
def test_pack_bits_roundtrip_and_size(bits: int, n: int) -> None:
    rng = np.random.default_rng(bits * 1000 + n)
    codes = rng.integers(0, 1 << bits, n)
    buf = pack_bits(codes, bits)
    assert buf.dtype == np.uint8
    assert buf.size == math.ceil(n * bits / 8)
    np.testing.assert_array_equal(unpack_bits(buf, bits, n), codes)


def test_pack_bits_layout_is_little_endian_stream() -> None:
    # 4 bits: two per byte, low nibble first; 3 bits: contiguous, crossing byte boundaries.
    assert pack_bits(np.array([1, 2]), 4).tolist() == [0x21]
    assert pack_bits(np.array([7, 0, 5]), 3).tolist() == [0b01000111, 0b1]
    assert pack_bits(np.array([200, 3]), 8).tolist() == [200, 3]


def test_pack_bits_rejects_out_of_range() -> None:
    with pytest.raises(ValueError):
        pack_bits(np.array([16]), 4)
    with pytest.raises(ValueError):
        pack_bits(np.array([-1]), 4)


@pytest.mark.parametrize("n", [0, 1, 4, 5, 6, 999])
def test_trits_roundtrip_and_size(n: int) -> None:
    codes = np.random.default_rng(n).integers(-1, 2, n)
    buf = pack_trits(codes)
    assert buf.size == math.ceil(n / 5)
    assert int(buf.max(initial=0)) < 243
    np.testing.assert_array_equal(unpack_trits(buf, n), codes)


def test_trits_reject_non_ternary() -> None:
    with pytest.raises(ValueError):
        pack_trits(np.array([2]))


@pytest.mark.parametrize(
    ("bits", "packing", "expected"),
    [(4, "int", 73728), (8, "int", 147456), (2, "int", 36864), (3, "int", math.ceil(384 * 384 * 3 / 8)),
     (5, "int", math.ceil(384 * 384 * 5 / 8)), (2, "trit5", math.ceil(384 * 384 / 5))],
)
def test_exact_code_bytes_384(bits: int, packing: str, expected: int) -> None:
    rng = np.random.default_rng(0)
    if packing == "trit5":
        codes = rng.integers(-1, 2, (384, 384))
    else:
        codes = rng.integers(-(1 << (bits - 1)), 1 << (bits - 1), (384, 384))
    qt = QuantizedTensor(codes=codes, code_bits=bits, scales=np.ones((384, 1)), signed=True, packing=packing)
    pt = pack_quantized(qt)
    assert pt.code_nbytes == expected == packed_code_bytes(384 * 384, bits, packing)
    # per-channel float16 scales, no zeros/codebook
    assert pt.nbytes == expected + 384 * 2
    np.testing.assert_array_equal(pt.dequantize(), dequantize(qt))


def test_packed_tensor_matches_dequantize_with_groups_zeros_and_rows() -> None:
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 8, (10, 13))
    scales = rng.random((10, 2)).astype(np.float32)
    zeros = rng.integers(0, 8, (10, 2)).astype(np.float32)
    qt = QuantizedTensor(codes=codes, code_bits=3, scales=scales, zeros=zeros, group_size=7)
    pt = pack_quantized(qt, scale_dtype=np.float32)
    assert pt.zeros is not None and pt.zeros.dtype == np.uint8
    assert pt.nbytes == math.ceil(130 * 3 / 8) + scales.nbytes + 20
    full = pt.dequantize()
    np.testing.assert_allclose(full, dequantize(qt), rtol=1e-6)
    # group g covers columns [7g, 7g+7): check one value by hand
    assert full[3, 9] == pytest.approx((codes[3, 9] - zeros[3, 1]) * scales[3, 1])
    rows = np.array([9, 0, 9, 4])
    np.testing.assert_array_equal(pt.dequantize_rows(rows), full[rows])


def test_signed_codes_are_offset_and_codebook_is_applied() -> None:
    codes = np.array([[-8, 7, 0, -1]])
    pt = pack_quantized(QuantizedTensor(codes=codes, code_bits=4, scales=[[0.5]], signed=True))
    assert pt.offset == 8
    assert unpack_bits(pt.codes, 4, 4).tolist() == [0, 15, 8, 7]
    np.testing.assert_array_equal(pt.dequantize(), [[-4.0, 3.5, 0.0, -0.5]])
    book = np.array([0.0, 1.0, -1.0, 0.25], dtype=np.float32)
    qt = QuantizedTensor(codes=np.array([[3, 2, 1, 0]]), code_bits=2, scales=[[2.0]], codebook=book)
    pt = pack_quantized(qt)
    assert pt.nbytes == 1 + 2 + book.nbytes
    np.testing.assert_array_equal(pt.dequantize(), [[0.5, -2.0, 2.0, 0.0]])


def test_scale_overflow_in_float16_is_an_error() -> None:
    qt = QuantizedTensor(codes=np.zeros((1, 4), int), code_bits=4, scales=[[1e6]], signed=True)
    with pytest.raises(ValueError, match="float16"):
        pack_quantized(qt)
    assert isinstance(pack_quantized(qt, scale_dtype=np.float32), PackedTensor)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(codes=np.full((2, 4), 8), code_bits=4, scales=np.ones((2, 1)), signed=True), "outside"),
        (dict(codes=np.full((2, 4), -1), code_bits=4, scales=np.ones((2, 1))), "outside"),
        (dict(codes=np.zeros((2, 4), int), code_bits=4, scales=np.ones((3, 1))), "scales shape"),
        (dict(codes=np.zeros((2, 4), int), code_bits=4, scales=np.ones((2, 1)), group_size=2), "scales shape"),
        (dict(codes=np.zeros((2, 4), int), code_bits=4, scales=[[np.nan]]), "NaN"),
        (dict(codes=np.zeros((2, 4)), code_bits=4, scales=[[1.0]]), "integer"),
        (dict(codes=np.zeros((2, 4), int), code_bits=9, scales=[[1.0]]), "code_bits"),
        (dict(codes=np.full((2, 4), 2), code_bits=2, scales=[[1.0]], signed=True, packing="trit5"), "outside"),
        (dict(codes=np.full((2, 4), 3), code_bits=2, scales=[[1.0]], codebook=[0.0, 1.0]), "outside"),
        (dict(codes=np.zeros((2, 4), int), code_bits=4, scales=[[1.0]], zeros=np.ones((2, 1))), "zeros shape"),
    ],
)
def test_quantized_tensor_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(QuantizedTensorError, match=match):
        QuantizedTensor(**kwargs)


def test_validate_checks_weight_shape() -> None:
    qt = QuantizedTensor(codes=np.zeros((2, 4), int), code_bits=4, scales=[[1.0]])
    qt.validate((2, 4))
    with pytest.raises(QuantizedTensorError, match="weight shape"):
        qt.validate((4, 2))


@pytest.mark.parametrize("bits", [2, 3, 5, 7])
def test_chunked_packing_matches_across_chunk_boundaries(bits: int, monkeypatch: pytest.MonkeyPatch) -> None:
    import qbench.quant.packing as packing

    codes = np.random.default_rng(bits).integers(0, 1 << bits, 1003)
    reference = pack_bits(codes, bits)
    monkeypatch.setattr(packing, "_CHUNK_CODES", 16)
    np.testing.assert_array_equal(pack_bits(codes, bits), reference)
    np.testing.assert_array_equal(unpack_bits(reference, bits, codes.size), codes)
    pt = pack_quantized(QuantizedTensor(codes=codes.reshape(17, 59), code_bits=bits, scales=[[1.0]]))
    np.testing.assert_array_equal(pt.dequantize_rows(np.array([16, 3])), codes.reshape(17, 59)[[16, 3]])


@pytest.mark.parametrize("scale", [1e-9, 2e-8])
def test_scale_underflow_in_float16_is_an_error(scale: float) -> None:
    # below half float16's smallest subnormal (6e-8): stored as 0, the weights would vanish
    qt = QuantizedTensor(codes=np.array([[1, -2, 0, 3]]), code_bits=4, scales=[[scale]], signed=True)
    with pytest.raises(ValueError, match=rf"scales underflow float16 \(1 nonzero scale\(s\) would be stored as 0, min \|scale\| {scale:.3g}"):
        pack_quantized(qt)
    assert pack_quantized(qt, scale_dtype=np.float32).scales[0, 0] == np.float32(scale)


@pytest.mark.parametrize("scale", [2.0**-20, 1e-6, 5.32e-6, 3e-5])
def test_subnormal_scales_are_stored(scale: float) -> None:
    # 8-bit RTN of a near-zero group gives such scales; a subnormal keeps them nonzero
    qt = QuantizedTensor(codes=np.array([[1, -2, 0, 3]]), code_bits=4, scales=[[scale]], signed=True)
    stored = float(pack_quantized(qt).scales[0, 0])
    assert stored != 0 and abs(stored - scale) <= float(np.finfo(np.float16).smallest_subnormal) / 2


def test_scales_that_lose_nothing_are_stored() -> None:
    exact_subnormal = 2.0**-20  # representable in float16 exactly
    qt = QuantizedTensor(codes=np.array([[1, -2, 0, 3]]), code_bits=4, scales=[[exact_subnormal]], signed=True)
    assert pack_quantized(qt).scales[0, 0] == exact_subnormal
    # an all-zero row given an epsilon scale (as the template plugin does): nothing it scales changes
    qt = QuantizedTensor(codes=np.array([[0, 0, 0, 0], [1, 2, 3, 4]]), code_bits=4, scales=[[1e-12], [0.5]], signed=True)
    np.testing.assert_array_equal(pack_quantized(qt).dequantize(), [[0, 0, 0, 0], [0.5, 1, 1.5, 2]])
    # but a zero point makes the "zero" codes nonzero values: then the lost scale matters
    qt = QuantizedTensor(codes=np.zeros((1, 4), int), code_bits=4, scales=[[1e-12]], zeros=np.full((1, 1), 8.0))
    with pytest.raises(ValueError, match="underflow"):
        pack_quantized(qt)
