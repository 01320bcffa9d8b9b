import numpy as np
import pytest

qbench_nonuniform = pytest.importorskip("qbench_nonuniform", reason="pip install -e plugins/nonuniform")
from qbench_nonuniform.squeezellm import (  # noqa: E402
    SortedRows,
    SqueezeLLMQuantizer,
    weighted_kmeans_rows,
)

from qbench import LayerStats, dequantize  # noqa: E402
from qbench.quant.contract import dequantize as contract_dequantize  # noqa: E402
from qbench.quant.packing import pack_quantized  # noqa: E402
from qbench.quant.settings import parse_settings  # noqa: E402

SQ = SqueezeLLMQuantizer


def diag_stats(diag) -> LayerStats:
    """Statistics whose `diag(X^T X) / n_rows` is `diag` (off-diagonal terms are unused)."""
    return LayerStats(xtx=np.diag(np.asarray(diag, np.float64) * 10), n_rows=10)


def test_two_clusters_by_hand() -> None:
    # start at the row quantiles (1, 12); midpoint 6.5 splits {-1, 1} | {10, 12}; weight 3 on
    # the 1 pulls its centroid from 0 to (-1 * 1 + 1 * 3) / 4 = 0.5; the second stays 11
    x = np.array([[-1.0, 1.0, 10.0, 12.0]])
    weighted, rounds = weighted_kmeans_rows(x, np.array([[1.0, 3.0, 1.0, 1.0]]), 2, 50)
    np.testing.assert_allclose(weighted, [[0.5, 11.0]])
    assert rounds == 1  # the first update is already the fixed point
    plain, _ = weighted_kmeans_rows(x, np.ones((1, 4)), 2, 50)
    np.testing.assert_allclose(plain, [[0.0, 11.0]])


def test_quantizer_by_hand_weights_from_xtx_and_zero_mask() -> None:
    # 2 bits = 4 centroids; quantile start -4, 1, 6, 11 gives pairs; columns 3 and 5 weigh 3
    w = np.array([[-5.0, -4.0, -1.0, 1.0, 4.0, 6.0, 10.0, 11.0]], np.float32)
    stats = diag_stats([1, 1, 1, 3, 1, 3, 1, 1])
    qt = SQ({"bits": 2}).quantize(w, stats)
    np.testing.assert_allclose(qt.codebook, [[-4.5, 0.5, 5.5, 10.5]])
    assert qt.codes.tolist() == [[0, 0, 1, 1, 2, 2, 3, 3]]
    plain = SQ({"bits": 2, "weighted": False}).quantize(w, stats)
    np.testing.assert_allclose(plain.codebook, [[-4.5, 0.0, 5.0, 10.5]])
    # an exact zero weighs nothing when fitting (nuq.py's mask) but still gets the nearest code:
    # clusters {-4, -1} {0, 1} {4, 6} {10, 11}; the second is 1, not (0 * 1 + 1 * 3) / 4 = 0.75
    wz = np.array([[0.0, -4.0, -1.0, 1.0, 4.0, 6.0, 10.0, 11.0]], np.float32)
    qz = SQ({"bits": 2}).quantize(wz, stats)
    np.testing.assert_allclose(qz.codebook, [[-2.5, 1.0, 5.5, 10.5]])
    assert qz.codes.tolist() == [[1, 0, 0, 1, 2, 2, 3, 3]]


def test_weighting_lowers_the_weighted_error_with_one_dominant_column() -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_t(4, size=(64, 256)).astype(np.float32)
    d = np.ones(256)
    d[7] = 1000.0  # one input channel with a massive activation (Whisper has such channels)
    stats = diag_stats(d)
    for bits in (2, 3):
        errors = {}
        for weighted in (True, False):
            q = dequantize(SQ({"bits": bits, "weighted": weighted}).quantize(w, stats))
            errors[weighted] = float(((w - q) ** 2 * d).sum())
        assert errors[True] < 0.5 * errors[False], (bits, errors)


def test_weighted_never_loses_to_plain_kmeans_on_its_own_objective() -> None:
    # heavy-tailed weights and column energies spread over three decades (fc2 inputs in Whisper
    # span ~100x): weighted Lloyd started at the quantiles lost to plain k-means on about half
    # of such rows; warm-started at plain k-means it cannot
    rng = np.random.default_rng(5)
    w = (rng.standard_t(4, size=(300, 384)) * 0.05).astype(np.float32)
    d = rng.lognormal(0.0, 1.5, size=384)
    stats = diag_stats(d)
    for bits in (3, 4):
        err = {}
        for weighted in (True, False):
            q = dequantize(SQ({"bits": bits, "weighted": weighted}).quantize(w, stats))
            err[weighted] = ((w - q) ** 2 * d).sum(axis=1)
        assert np.all(err[True] <= err[False] * (1 + 1e-3)), bits  # float16 codebook rounding aside
        assert err[True].sum() < 0.8 * err[False].sum()


def test_per_row_codebooks_through_the_harness() -> None:
    w = np.random.default_rng(1).normal(size=(48, 384)).astype(np.float32) * 0.05
    qt = SQ({"bits": 4}).quantize(w, diag_stats(np.random.default_rng(2).gamma(1.0, size=384)))
    assert qt.codebook.shape == (48, 16) and qt.scales.shape == (1, 1) and qt.scales[0, 0] == 1
    assert qt.codebook.dtype == np.float32 and not qt.signed and qt.group_size is None
    # the codebook is already float16-exact, so storing it changes nothing
    np.testing.assert_array_equal(qt.codebook, qt.codebook.astype(np.float16).astype(np.float32))
    expected = qt.codebook[np.arange(48)[:, None], qt.codes]
    np.testing.assert_array_equal(contract_dequantize(qt), expected)
    pt = pack_quantized(qt)
    np.testing.assert_array_equal(pt.dequantize(), expected)
    # codes + one float16 scale + a float16 codebook of 16 per row: 4 + 0.67 bits per weight
    assert pt.nbytes == 48 * 384 // 2 + 2 + 48 * 16 * 2
    assert 8 * pt.nbytes / w.size == pytest.approx(4 + 16 * 16 / 384, abs=1e-3)
    # every code is the nearest entry of its row's stored codebook
    dist = np.abs(w[:, :, None] - qt.codebook[:, None, :])
    np.testing.assert_allclose(np.abs(w - expected), dist.min(axis=2), atol=0)


def test_kmeans_is_a_fixed_point_and_beats_its_start() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(200, 128)).astype(np.float32)
    h = rng.gamma(1.0, size=(200, 128))
    c, rounds = weighted_kmeans_rows(x, h, 8, 200)
    assert 1 < rounds < 200  # converged (every row) before the cap
    assert np.all(np.diff(c, axis=1) >= 0)
    code = np.abs(x[:, :, None] - c[:, None, :]).argmin(axis=2)
    for j in range(8):  # each centroid is the weighted mean of the weights nearest to it
        member = code == j
        mass = (h * member).sum(axis=1)
        ok = mass > 0
        np.testing.assert_allclose(c[ok, j], ((h * x * member).sum(axis=1) / np.where(ok, mass, 1))[ok], rtol=1e-9, atol=1e-12)
    c1, _ = weighted_kmeans_rows(x, h, 8, 1)
    err = lambda cent: (h * (x - np.take_along_axis(cent, np.abs(x[:, :, None] - cent[:, None, :]).argmin(2), 1)) ** 2).sum()  # noqa: E731
    assert err(c) < err(c1)


def test_count_below_is_exact_per_row() -> None:
    rng = np.random.default_rng(4)
    rows = (rng.normal(size=(30, 50)) * 10.0 ** rng.integers(-8, 3, size=(30, 1))).astype(np.float32)
    rows[0, :5] = -0.0  # equal to +0.0
    rows[0, 5:10] = 0.0
    rows = np.sort(rows, axis=1)
    thresholds = np.concatenate([rows[:, ::7].astype(np.float64) + 1e-12 * np.abs(rows[:, ::7]), np.zeros((30, 1)),
                                 rows[:, 3::9],  # exactly equal: not below
                                 rng.normal(size=(30, 3))], axis=1)
    got = SortedRows(rows[:, ::-1]).count_below(thresholds)  # sorts them back itself
    want = np.stack([np.searchsorted(rows[r].astype(np.float64), thresholds[r], side="left") for r in range(30)])
    np.testing.assert_array_equal(got, want)


def test_settings() -> None:
    cfg = parse_settings(["bits=3", "iterations=10", "weighted=false"], SQ.Config, "squeezellm")
    assert (cfg.bits, cfg.iterations, cfg.weighted) == (3, 10, False)
    with pytest.raises(ValueError, match="'iterations'"):
        parse_settings(["iterations=0"], SQ.Config, "squeezellm")
    assert SQ.needs_calibration
