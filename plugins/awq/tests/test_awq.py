"""AWQ's scale and clip searches: a hand-computed case, the calibration-error guarantees the
method rests on, and the contract of what it returns."""

from __future__ import annotations

import numpy as np
import pydantic
import pytest

qbench_awq = pytest.importorskip("qbench_awq", reason="pip install -e plugins/awq")
from qbench import LayerStats, dequantize, expand_groups, group_reduce, uniform_grid  # noqa: E402
from qbench.quant.apply import layer_stats  # noqa: E402

AWQ = qbench_awq.AWQQuantizer
Grid = qbench_awq.Grid
output_error = qbench_awq.output_error
group_errors = qbench_awq.group_errors


def rtn_error(w: np.ndarray, stats: LayerStats, grid: Grid) -> float:
    """Calibration output error of plain round-to-nearest (s = 1) on the same grid."""
    w64 = w.astype(np.float64)
    return output_error(w64 - grid.fake_quantize(w64), stats.xtx)


def awq_error(w: np.ndarray, stats: LayerStats, **cfg) -> float:
    qt = AWQ(AWQ.Config(**cfg)).quantize(w, stats)
    return output_error(w.astype(np.float64) - dequantize(qt).astype(np.float64), stats.xtx)


def outlier_problem(seed: int, out_f: int = 48, in_f: int = 128, rows: int = 512) -> tuple[np.ndarray, LayerStats]:
    """Gaussian weights and inputs in which a few channels are ~30x larger, as in real activations."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, in_f))
    x[:, rng.choice(in_f, size=4, replace=False)] *= 30.0
    w = rng.normal(size=(out_f, in_f)).astype(np.float32)
    return w, layer_stats(x.astype(np.float32), in_f)


# --- a hand-computed case -------------------------------------------------------------------


def test_hand_computed_scale_search() -> None:
    # Channels 0 and 2 have RMS 4, channels 1 and 3 RMS 1, so s = a^alpha / sqrt(4^alpha) is
    # 2^alpha on the loud channels and 2^-alpha on the quiet ones. 2-bit symmetric per-channel is
    # the ternary grid {-m, 0, m}, m = max |row|.
    n = 10
    stats = LayerStats(xtx=n * np.diag([16.0, 1.0, 16.0, 1.0]), n_rows=n)
    w = np.array([[0.5, 1.0, 0.5, 1.0], [-1.0, -2.0, 1.0, 2.0]], dtype=np.float32)
    grid = Grid(bits=2, symmetric=True, group_size=None)
    s, alpha, losses = qbench_awq.search_scales(w.astype(np.float64), stats.xtx, qbench_awq.activation_rms(stats), grid, 20)

    # alpha = 0 (s = 1): row 0 rounds to [0, 1, 0, 1] (0.5 rounds to even), error 0.5 on both loud
    # channels; row 1 / 2 = [-0.5, -1, 0.5, 1] rounds to [0, -1, 0, 1] * 2, error 1 on both.
    # Loss = n * 16 * (2 * 0.5^2 + 2 * 1^2) = 40 n.
    assert losses[0] == pytest.approx(40 * n)
    # alpha = 1/2: the scaled rows are 2^-1/2 [1, 1, 1, 1] and 2^1/2 [-1, -1, 1, 1], both exact on
    # the ternary grid, so the loss is 0 and alpha = 0.5 wins; every other alpha leaves an error.
    assert alpha == 0.5
    assert losses[10] == pytest.approx(0.0, abs=1e-9)
    assert min(losses[:10] + losses[11:]) > 0.01
    np.testing.assert_allclose(s, [2**0.5, 2**-0.5, 2**0.5, 2**-0.5], rtol=1e-7)

    qt = AWQ(AWQ.Config(bits=2, symmetric=True, group_size=None, clip=False)).quantize(w, stats)
    np.testing.assert_allclose(qt.input_scales, s, rtol=1e-7)
    np.testing.assert_array_equal(qt.codes, [[1, 1, 1, 1], [-1, -1, 1, 1]])
    np.testing.assert_allclose(dequantize(qt), w, rtol=1e-6)  # W recovered exactly


def test_output_error_is_the_exact_calibration_output_error() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(200, 16))
    d = rng.normal(size=(5, 16))
    stats = layer_stats(x, 16)
    assert output_error(d, stats.xtx) == pytest.approx(float(np.sum((x @ d.T) ** 2)), rel=1e-10)
    per_group = group_errors(d, stats.xtx, 8)
    for j, cols in enumerate((slice(0, 8), slice(8, 16))):
        np.testing.assert_allclose(per_group[:, j], np.sum((x[:, cols] @ d[:, cols].T) ** 2, axis=0), rtol=1e-10)


# --- the property AWQ exists for ------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg",
    [
        dict(bits=4, group_size=32),
        dict(bits=3, group_size=None),
        dict(bits=3, group_size=48),  # a partial last group
        dict(bits=2, group_size=64, symmetric=True),
        dict(bits=3, group_size=32, symmetric=True, full_range=True),
    ],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_scales_never_lose_to_s_equal_one(cfg: dict, seed: int) -> None:
    # alpha = 0 is a candidate, so on the calibration loss AWQ's scales are at most RTN's error
    # (relative slack only for the float32 the tensor is stored in); on plain Gaussian inputs too.
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(24, 128)).astype(np.float32)
    stats = layer_stats(rng.normal(size=(300, 128)) * rng.uniform(0.5, 2.0, size=128), 128)
    grid = Grid(cfg["bits"], cfg.get("symmetric", False), cfg["group_size"], cfg.get("full_range", False))
    assert awq_error(w, stats, clip=False, **cfg) <= rtn_error(w, stats, grid) * (1 + 1e-5)


@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("clip", [False, True])
def test_scales_strictly_lower_the_error_with_outlier_channels(bits: int, clip: bool) -> None:
    w, stats = outlier_problem(seed=bits)
    e_rtn = rtn_error(w, stats, Grid(bits, False, 64))
    e_awq = awq_error(w, stats, bits=bits, group_size=64, clip=clip)
    assert e_awq < 0.7 * e_rtn, (e_awq, e_rtn)
    s, alpha, _ = qbench_awq.search_scales(w.astype(np.float64), stats.xtx, qbench_awq.activation_rms(stats),
                                           Grid(bits, False, 64), 20)
    assert alpha > 0
    # the loud channels are the ones scaled up
    assert set(np.argsort(s)[-4:]) == set(np.argsort(np.diag(stats.xtx))[-4:])


# --- the clip search ------------------------------------------------------------------------


@pytest.mark.parametrize("bits,symmetric,group_size", [(3, False, 32), (2, True, None), (4, False, 40)])
def test_clipping_never_raises_a_groups_error(bits: int, symmetric: bool, group_size: int | None) -> None:
    rng = np.random.default_rng(7)
    ws = rng.standard_t(df=3, size=(32, 96))  # heavy tails: clipping the extremes pays somewhere
    stats = layer_stats(rng.normal(size=(256, 96)), 96)
    grid = Grid(bits, symmetric, group_size)
    bound = expand_groups(qbench_awq.search_clip(ws, stats.xtx, grid, 20, 0.5), group_size, 96)
    clipped = group_errors(ws - grid.fake_quantize(np.clip(ws, -bound, bound)), stats.xtx, group_size)
    unclipped = group_errors(ws - grid.fake_quantize(ws), stats.xtx, group_size)
    assert np.all(clipped <= unclipped)
    assert np.any(clipped < 0.95 * unclipped)  # and it does clip
    # the bounds are among the candidates 1, 0.95, ..., 0.55 of each group's max |w|
    org_max = group_reduce(np.abs(ws), group_size, np.max)
    ratios = qbench_awq.search_clip(ws, stats.xtx, grid, 20, 0.5) / org_max
    assert np.all(np.isclose(ratios[..., None], 1 - np.arange(10) / 20).any(axis=-1))


def test_quantize_clips_after_scaling() -> None:
    # the result is the rounding of W diag(s) clamped to the bounds searched with x / s's statistics
    rng = np.random.default_rng(9)
    w = rng.standard_t(df=3, size=(16, 64)).astype(np.float32)
    stats = layer_stats(rng.normal(size=(256, 64)) * rng.uniform(0.2, 5.0, size=64), 64)
    qt = AWQ(AWQ.Config(bits=3, group_size=32)).quantize(w, stats)
    s = qt.input_scales.astype(np.float64)
    ws, xtx_s = w * s, stats.xtx / np.outer(s, s)
    grid = Grid(3, False, 32)
    bound = expand_groups(qbench_awq.search_clip(ws, xtx_s, grid, 20, 0.5), 32, 64)
    assert np.any(np.abs(ws) > bound)
    np.testing.assert_array_equal(qt.codes, grid.fit(np.clip(ws, -bound, bound))[2])
    unclipped = AWQ(AWQ.Config(bits=3, group_size=32, clip=False)).quantize(w, stats)
    np.testing.assert_array_equal(unclipped.input_scales, qt.input_scales)  # clipping does not move s
    assert np.any(unclipped.codes != qt.codes)


def test_max_shrink_zero_is_no_clipping() -> None:
    w, stats = outlier_problem(seed=5)
    a = AWQ(AWQ.Config(bits=3, group_size=64, clip=True, max_shrink=0.0)).quantize(w, stats)
    b = AWQ(AWQ.Config(bits=3, group_size=64, clip=False)).quantize(w, stats)
    np.testing.assert_array_equal(a.codes, b.codes)


# --- what the plugin returns ----------------------------------------------------------------


def test_tensor_follows_the_contract() -> None:
    w, stats = outlier_problem(seed=2, in_f=160)
    qt = AWQ(AWQ.Config(bits=4, group_size=64)).quantize(w, stats)
    assert qt.codes.shape == w.shape and qt.group_size == 64 and qt.scales.shape == (48, 3)
    assert not qt.signed and qt.zeros is not None and 0 <= qt.codes.min() and qt.codes.max() <= 15
    assert qt.input_scales.dtype == np.float32 and qt.input_scales.shape == (160,) and np.all(qt.input_scales > 0)
    # the codes are an RTN of the scaled (and clipped) weights: recomputing their grid agrees
    ws = dequantize(qt) * qt.input_scales
    scales, _ = uniform_grid(ws.astype(np.float64), 4, False, 64)
    np.testing.assert_allclose(scales, qt.scales, rtol=1e-4)


def test_group_as_wide_as_the_row_is_per_channel() -> None:
    w, stats = outlier_problem(seed=4)
    qt = AWQ(AWQ.Config(bits=4, group_size=128)).quantize(w, stats)
    assert qt.group_size is None and qt.scales.shape == (48, 1)


def test_without_activation_information_it_is_rtn() -> None:
    # all-equal channel magnitudes (the harness's neutral statistics for `qbench fit`) give s = 1
    rng = np.random.default_rng(6)
    w = rng.normal(size=(8, 64)).astype(np.float32)
    qt = AWQ(AWQ.Config(bits=3, group_size=32, clip=False)).quantize(w, LayerStats(xtx=np.eye(64), n_rows=1))
    np.testing.assert_array_equal(qt.input_scales, np.ones(64, np.float32))
    np.testing.assert_allclose(dequantize(qt), Grid(3, False, 32).fake_quantize(w.astype(np.float64)), rtol=1e-6)


def test_dead_input_channels_stay_finite() -> None:
    rng = np.random.default_rng(8)
    x = rng.normal(size=(100, 32))
    x[:, [3, 17]] = 0.0
    w = rng.normal(size=(6, 32)).astype(np.float32)
    qt = AWQ(AWQ.Config(bits=4, group_size=16)).quantize(w, layer_stats(x, 32))
    assert np.all(np.isfinite(dequantize(qt))) and np.all(qt.input_scales > 0)


def test_bad_settings_and_missing_stats_are_errors() -> None:
    with pytest.raises(pydantic.ValidationError, match="symmetric"):
        AWQ.Config(full_range=True)
    with pytest.raises(pydantic.ValidationError):
        AWQ.Config(bits=9)
    with pytest.raises(pydantic.ValidationError):
        AWQ.Config(max_shrink=1.0)
    with pytest.raises(pydantic.ValidationError):
        AWQ.Config(clip_ratio=0.5)
    assert AWQ.needs_calibration
    with pytest.raises(ValueError, match="calibration"):
        AWQ().quantize(np.ones((2, 4), np.float32), None)
    with pytest.raises(ValueError, match="shape"):
        AWQ().quantize(np.ones((2, 4), np.float32), LayerStats(xtx=np.eye(3), n_rows=1))
