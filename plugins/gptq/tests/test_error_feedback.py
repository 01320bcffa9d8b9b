"""`qbench.quant.error_feedback`: GPTQ's sweep over any grid, checked by hand and by its purpose."""

from __future__ import annotations

import numpy as np
import pytest

from qbench import LayerStats, expand_groups, grid_codes, grid_values, uniform_grid
from qbench.quant.apply import layer_stats
from qbench.quant.error_feedback import (
    MSEClip,
    UniformGrid,
    error_feedback_quantize,
    gptq_hessian,
)


class IntegerGrid:
    """Scale 1, no zero point: codes are the weights rounded to integers (hand-checkable)."""

    def fit(self, w: np.ndarray) -> tuple[np.ndarray, None]:
        return np.ones(w.shape[0]), None

    def round(self, w: np.ndarray, scale: np.ndarray, zero: None) -> tuple[np.ndarray, np.ndarray]:
        codes = np.rint(w / scale).astype(np.int16)
        return codes, codes * scale


def output_error(w: np.ndarray, q: np.ndarray, h: np.ndarray) -> float:
    """GPTQ's objective on the calibration data: trace(D H D^T) with D = W - Q."""
    d = np.asarray(w, np.float64) - q
    return float(np.trace(d @ h @ d.T))


@pytest.mark.parametrize("block_size", [1, 2])
def test_two_columns_by_hand(block_size: int) -> None:
    # H = [[2, 1], [1, 2]]: rounding column 0 leaves the error e0 = w0 - q0, and the optimal
    # update of column 1 is w1 += e0 * H01 / H11 = e0 / 2 (from H^-1: -(H^-1)01 / (H^-1)00).
    # w = [0.4, 0.35]: q0 = 0, e0 = 0.4, w1 -> 0.35 + 0.2 = 0.55 -> q1 = 1 (RTN would give 0).
    w = np.array([[0.4, 0.35]])
    h = np.array([[2.0, 1.0], [1.0, 2.0]])
    r = error_feedback_quantize(w, h, IntegerGrid(), block_size=block_size, percdamp=0.0)
    assert r.codes.tolist() == [[0, 1]] and r.group_size is None and r.zeros is None
    np.testing.assert_array_equal(r.scales, [[1.0]])
    # trace(D H D^T) by hand: GPTQ D = [0.4, -0.65] -> 0.645; RTN D = [0.4, 0.35] -> 0.845
    assert output_error(w, r.codes, h) == pytest.approx(0.645)
    assert output_error(w, np.rint(w), h) == pytest.approx(0.845)


def test_the_caller_hessian_is_not_changed() -> None:
    h = np.array([[2.0, 1.0, 0.0], [1.0, 2.0, 0.0], [0.0, 0.0, 0.0]])
    before = h.copy()
    error_feedback_quantize(np.ones((2, 3)), h, IntegerGrid(), percdamp=0.1)
    np.testing.assert_array_equal(h, before)


@pytest.fixture(scope="module")
def correlated() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    n = 96
    mix = rng.normal(size=(n, n)) / np.sqrt(n)
    x = (rng.normal(size=(800, n)) @ mix + 0.1 * rng.normal(size=(800, n))) * np.exp(rng.normal(scale=0.5, size=n))
    w = rng.normal(size=(32, n))
    return w, gptq_hessian(layer_stats(x.astype(np.float32), n))


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("full_range", [False, True])
def test_output_error_below_rtn_on_the_same_grid(correlated, bits: int, full_range: bool) -> None:
    # Per-channel grids are fitted before the sweep, so both use exactly the same grid.
    w, h = correlated
    grid = UniformGrid(bits, symmetric=True, full_range=full_range)
    r = error_feedback_quantize(w, h, grid, percdamp=0.0)
    scale, _ = uniform_grid(w, bits, True, None, full_range)
    np.testing.assert_array_equal(r.scales, scale)
    q_gptq = grid_values(r.codes, r.scales, None)
    q_rtn = grid_values(grid_codes(w, scale, None, bits, full_range), scale, None)
    assert output_error(w, q_gptq, h) < 0.8 * output_error(w, q_rtn, h)


def test_identity_hessian_is_rtn(correlated) -> None:
    w, _ = correlated
    r = error_feedback_quantize(w, np.eye(w.shape[1]), UniformGrid(3), group_size=32, percdamp=0.0)
    scales, _ = uniform_grid(w, 3, True, 32)
    np.testing.assert_array_equal(r.codes, grid_codes(w, expand_groups(scales, 32, w.shape[1]), None, 3))


@pytest.mark.parametrize("static_groups", [False, True])
def test_act_order_keeps_groups_in_the_original_column_order(correlated, static_groups: bool) -> None:
    w, h = correlated
    r = error_feedback_quantize(w, h, UniformGrid(3), group_size=32, act_order=True, static_groups=static_groups)
    scales, _ = uniform_grid(w, 3, True, 32)
    np.testing.assert_array_equal(r.scales, scales)  # fitted before the sweep, original order
    deq = grid_values(r.codes, expand_groups(r.scales, 32, w.shape[1]), None)
    plain = error_feedback_quantize(w, h, UniformGrid(3), group_size=32, static_groups=True)
    deq_plain = grid_values(plain.codes, expand_groups(plain.scales, 32, w.shape[1]), None)
    # a different order gives different codes, but still far better than rounding
    rtn = grid_values(grid_codes(w, expand_groups(scales, 32, w.shape[1]), None, 3), expand_groups(scales, 32, w.shape[1]), None)
    assert not np.array_equal(r.codes, plain.codes)
    assert output_error(w, deq, h) < 0.8 * output_error(w, rtn, h)
    assert output_error(w, deq_plain, h) < 0.8 * output_error(w, rtn, h)


def test_shared_scales_stay_one_row() -> None:
    # a grid with one scale for every row (ternary per tensor) gives scales [1, n_groups]
    class TensorGrid(IntegerGrid):
        def fit(self, w: np.ndarray) -> tuple[np.ndarray, None]:
            return np.array([0.5]), None

    r = error_feedback_quantize(np.ones((4, 6)), np.eye(6), TensorGrid(), group_size=3, static_groups=True)
    assert r.scales.shape == (1, 2) and r.group_size == 3


def test_mse_clip_by_hand() -> None:
    # one row [1, 0.45 x 4, -0.45] at 2 bits restricted (codes -1..1): the max-based scale 1
    # rounds the five small weights to 0 (sum |err|^2.4 = 5 * 0.45^2.4 = 0.74); scale 0.6 costs
    # the 1 an error of 0.4 and the others 0.15 each (0.111 + 5 * 0.0105 = 0.16). The search picks the scale
    # with the least sum |err|^2.4 among 1 - i/100, i < 80.
    w = np.array([[1.0, 0.45, 0.45, 0.45, 0.45, -0.45]])
    grid = UniformGrid(2, symmetric=True, mse=MSEClip())
    scale, zero = grid.fit(w)
    assert zero is None
    candidates = 1 - np.arange(80) / 100
    errs = [np.sum(np.abs(np.clip(np.rint(w / p), -1, 1) * p - w) ** 2.4) for p in candidates]
    assert scale[0] == pytest.approx(candidates[int(np.argmin(errs))])
    assert 0.55 <= scale[0] <= 0.65


@pytest.mark.parametrize("symmetric,full_range", [(True, False), (True, True), (False, False)])
def test_mse_clip_never_worse_in_weight_space(symmetric: bool, full_range: bool) -> None:
    rng = np.random.default_rng(4)
    w = rng.standard_t(df=3, size=(16, 64))  # heavy tails: clipping pays
    plain = UniformGrid(3, symmetric, full_range)
    clipped = UniformGrid(3, symmetric, full_range, MSEClip())

    def err(grid: UniformGrid) -> np.ndarray:
        scale, zero = grid.fit(w)
        _, q = grid.round(w, scale[:, None], None if zero is None else zero[:, None])
        return np.sum(np.abs(q - w) ** 2.4, axis=1)

    assert np.all(err(clipped) <= err(plain)) and np.mean(err(clipped)) < 0.9 * np.mean(err(plain))


def test_gptq_hessian() -> None:
    stats = LayerStats(xtx=np.array([[4.0, 2.0], [2.0, 8.0]]), n_rows=4)
    np.testing.assert_array_equal(gptq_hessian(stats), [[2.0, 1.0], [1.0, 4.0]])
