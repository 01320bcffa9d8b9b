import numpy as np
import pytest

qbench_hqq = pytest.importorskip("qbench_hqq", reason="pip install -e plugins/hqq")
from pydantic import ValidationError

from qbench import dequantize
from qbench.plugin_manager import discover_quantizers
from qbench.quant.packing import pack_quantized

HQQ = qbench_hqq.HQQQuantizer


def hqq(w: np.ndarray, **cfg):
    return HQQ(HQQ.Config(**cfg)).quantize(w, None)


def outlier_weights(seed: int = 0, shape: tuple[int, int] = (96, 320)) -> np.ndarray:
    """Gaussian weights with 1 % outliers 8x larger, the case HQQ's lp loss is for."""
    rng = np.random.default_rng(seed)
    w = rng.normal(scale=0.05, size=shape)
    w[rng.random(shape) < 0.01] *= 8
    return w.astype(np.float32)


def test_registered_through_the_entry_point() -> None:
    entries, _ = discover_quantizers()
    entry = entries["hqq"]
    assert entry.cls is HQQ and entry.distribution == "qbench-hqq" and entry.plugin == "hqq"
    assert not entry.needs_calibration


def test_shrinkage_by_hand() -> None:
    x = np.array([1.0, -1.0, 0.01, 0.0, 0.5])
    # p = 0.7, beta = 10: |x| - |x|^-0.3 / 10; 1 -> 0.9; 0.01 -> 0.01 - 0.398 < 0 -> 0; 0 stays 0
    np.testing.assert_allclose(qbench_hqq.shrink_lp(x, 10.0, 0.7)[:4], [0.9, -0.9, 0.0, 0.0])
    np.testing.assert_allclose(qbench_hqq.shrink_lp(x, 10.0, 0.7)[4], 0.5 - 0.5 ** -0.3 / 10)
    # p = 1 is the soft threshold at 1/beta
    np.testing.assert_allclose(qbench_hqq.shrink_lp(x, 4.0, 1.0), [0.75, -0.75, 0.0, 0.0, 0.25])


def test_one_proximal_step_by_hand() -> None:
    # One group of 4 at 2 bits: min 0, max 1 -> s = 3/1 = 3, z = 0.
    w = np.array([[0.0, 0.3, 1.0, 0.45]], dtype=np.float32)
    groups = qbench_hqq._Groups(w, 4)
    s, z = qbench_hqq.minmax_grid(groups, 3)
    assert float(s.squeeze()) == 3.0 and float(z.squeeze()) == 0.0
    # W s = [0, 0.9, 3, 1.35] -> W_q = [0, 1, 3, 1], W_r = [0, 1/3, 1, 1/3],
    # residual W - W_r = [0, -1/30, 0, 0.35/3]. With p = 1, beta = 20 (threshold 0.05) only
    # the last survives: W_e = [0, 0, 0, 0.35/3 - 0.05 = 0.2/3].
    # z = mean(W_q - (W - W_e) s) = mean([0, 1 - 0.9, 0, 1 - (1.35 - 0.2)]) = mean([0, 0.1, 0, -0.15])
    w_r, z_new = qbench_hqq.proximal_step(groups, s, z, 3, beta=20.0, lp_norm=1.0)
    np.testing.assert_allclose(w_r.reshape(-1), [0, 1 / 3, 1, 1 / 3], rtol=1e-6)
    np.testing.assert_allclose(float(z_new.squeeze()), -0.0125, atol=1e-6)
    # With beta = 5 (threshold 0.2) nothing survives: W_e = 0 and z is the least-squares zero
    # for the fixed codes, mean([0, 0.1, 0, -0.35]) = -0.0625.
    _, z_ls = qbench_hqq.proximal_step(groups, s, z, 3, beta=5.0, lp_norm=1.0)
    np.testing.assert_allclose(float(z_ls.squeeze()), -0.0625, atol=1e-6)


def test_minmax_grid_and_stored_float16_grid() -> None:
    w = outlier_weights()
    qt = hqq(w, bits=3, group_size=64, optimize=False)
    g = w.reshape(w.shape[0], -1, 64)
    lo, hi = g.min(axis=2), g.max(axis=2)
    np.testing.assert_allclose(qt.scales, (hi - lo) / 7, rtol=1e-3)  # float16 rounding
    np.testing.assert_allclose(qt.zeros, -lo / ((hi - lo) / 7), rtol=2e-3)
    assert qt.zeros.dtype == np.float32 and not np.all(qt.zeros == np.round(qt.zeros))  # float zero


@pytest.mark.parametrize("optimize", [False, True])
def test_codes_are_nearest_on_the_grid_the_harness_stores(optimize: bool) -> None:
    # Scales and zeros are float16 values already, and the codes are rounded on exactly them:
    # storing changes nothing.
    w = outlier_weights(1)
    qt = hqq(w, bits=8 if optimize else 4, group_size=64, optimize=optimize)
    for a in (qt.scales, qt.zeros):
        assert np.array_equal(a, a.astype(np.float16).astype(np.float32))
    scale, zero = np.repeat(qt.scales, 64, axis=1), np.repeat(qt.zeros, 64, axis=1)
    maxq = (1 << qt.code_bits) - 1
    assert np.array_equal(qt.codes, np.clip(np.rint(w / scale + zero), 0, maxq))
    packed = pack_quantized(qt)
    assert packed.zeros.dtype == np.float16
    np.testing.assert_array_equal(packed.dequantize(), dequantize(qt))


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [64, 128])
def test_optimised_grid_beats_its_minmax_start(bits: int, group_size: int) -> None:
    # The property HQQ exists for: the proximal zero lowers the reconstruction error of the
    # stored weights in the lp sense it minimises (and in L1, its stopping criterion), and in
    # practice in L2 too, against the min/max grid it starts from.
    w = outlier_weights(2)
    errors = {}
    for optimize in (False, True):
        e = np.abs(w - dequantize(hqq(w, bits=bits, group_size=group_size, optimize=optimize))).astype(np.float64)
        errors[optimize] = (np.mean(e ** 0.7), np.mean(e), np.mean(e ** 2))
    for opt, start in zip(errors[True], errors[False]):
        assert opt < start
    if bits == 2:
        assert errors[True][0] < 0.95 * errors[False][0]


def test_short_last_group_is_fitted_on_its_own_columns() -> None:
    # 240 columns, groups of 64: the last group holds 48 columns and its min/max is theirs.
    w = outlier_weights(3, (32, 240))
    qt = hqq(w, bits=4, group_size=64, optimize=False)
    assert qt.scales.shape == (32, 4) and qt.codes.shape == w.shape
    tail = w[:, 192:]
    np.testing.assert_allclose(qt.scales[:, 3], (tail.max(1) - tail.min(1)) / 15, rtol=1e-3)
    opt = hqq(w, bits=3, group_size=64)
    assert np.abs(w - dequantize(opt)).mean() < np.abs(w - dequantize(hqq(w, bits=3, group_size=64, optimize=False))).mean()


def test_per_channel_and_wide_groups_are_one_group_per_row() -> None:
    w = outlier_weights(4, (16, 96))
    a, b = hqq(w, bits=4, group_size=None), hqq(w, bits=4, group_size=128)
    assert a.group_size is None and b.group_size is None and a.scales.shape == (16, 1)
    np.testing.assert_array_equal(a.codes, b.codes)


def test_constant_and_zero_groups_are_exact() -> None:
    w = np.zeros((4, 128), dtype=np.float32)
    w[1] = 0.25
    w[2, :64] = -1.5
    qt = hqq(w, bits=3, group_size=64)
    np.testing.assert_array_equal(dequantize(qt), w)


def test_deterministic() -> None:
    w = outlier_weights(5)
    a, b = hqq(w, bits=3), hqq(w, bits=3)
    for name in ("codes", "scales", "zeros"):
        assert np.array_equal(getattr(a, name), getattr(b, name))


def test_bad_settings_are_refused() -> None:
    for bad in ({"bits": 1}, {"lp_norm": 1.5}, {"beta": 0}, {"kappa": 0.9}, {"iters": 0}, {"nbits": 4}):
        with pytest.raises(ValidationError):
            HQQ.Config(**bad)
