"""RTN on the shared `qbench.uniform_grid` helpers gives exactly the codes and scales of qbench-rtn
0.1.0, whose own grid code is frozen below: committed leaderboard entries must re-verify with the
same hypotheses, so "close" is not enough."""

from __future__ import annotations

import numpy as np
import pytest

qbench_rtn = pytest.importorskip("qbench_rtn", reason="pip install -e plugins/rtn")

RTN = qbench_rtn.RTNQuantizer


def rtn_0_1_0(weight: np.ndarray, bits: int, group_size: int | None, symmetric: bool):
    """qbench-rtn 0.1.0's `RTNQuantizer.quantize`, verbatim but for names: (codes, scales, zeros, group_size)."""

    def grid(w, bits, symmetric):
        w = w.astype(np.float64, copy=False)
        if symmetric:
            qmax = (1 << (bits - 1)) - 1
            scale = np.abs(w).max(axis=1) / qmax
            scale[scale == 0] = 1.0
            return scale, None
        maxq = (1 << bits) - 1
        lo = np.minimum(w.min(axis=1), 0.0)
        hi = np.maximum(w.max(axis=1), 0.0)
        scale = (hi - lo) / maxq
        scale[scale == 0] = 1.0
        zero = np.clip(np.rint(-lo / scale), 0, maxq)
        return scale, zero

    def to_codes(w, scale, zero, bits):
        q = np.rint(w / scale[:, None])
        if zero is None:
            qmax = (1 << (bits - 1)) - 1
            return np.clip(q, -qmax, qmax).astype(np.int16)
        return np.clip(q + zero[:, None], 0, (1 << bits) - 1).astype(np.int16)

    out_f, in_f = weight.shape
    g = group_size
    if g is not None and g >= in_f:
        g = None
    width = in_f if g is None else g
    n_groups = -(-in_f // width)
    codes = np.empty((out_f, in_f), dtype=np.int16)
    scales = np.empty((out_f, n_groups), dtype=np.float64)
    zeros = None if symmetric else np.empty((out_f, n_groups), dtype=np.float64)
    for j in range(n_groups):
        cols = slice(j * width, min((j + 1) * width, in_f))
        scale, zero = grid(weight[:, cols], bits, symmetric)
        codes[:, cols] = to_codes(weight[:, cols].astype(np.float64), scale, zero, bits)
        scales[:, j] = scale
        if zeros is not None:
            zeros[:, j] = zero
    return codes, scales.astype(np.float32), None if zeros is None else zeros.astype(np.float32), g


def seeded_weights() -> list[np.ndarray]:
    rng = np.random.default_rng(20240601)
    heavy = (rng.standard_t(3, size=(48, 300)) * 0.02).astype(np.float32)
    heavy[5] = 0.0  # an all-zero row
    heavy[7, :128] = 0.0  # an all-zero group
    positive = np.abs(rng.normal(size=(16, 130))).astype(np.float32)  # min > 0: lo clamps to 0
    ties = (rng.integers(-8, 9, size=(12, 64)) * 0.125).astype(np.float32)  # lands on .5 steps
    return [rng.normal(size=(64, 384)).astype(np.float32), heavy, positive, ties]


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("group_size", [None, 32, 100, 128, 4096])
@pytest.mark.parametrize("symmetric", [True, False])
def test_codes_and_scales_are_bit_identical_to_0_1_0(bits: int, group_size: int | None, symmetric: bool) -> None:
    for w in seeded_weights():
        qt = RTN(RTN.Config(bits=bits, group_size=group_size, symmetric=symmetric)).quantize(w, None)
        codes, scales, zeros, g = rtn_0_1_0(w, bits, group_size, symmetric)
        assert qt.group_size == g and qt.signed == symmetric and qt.code_bits == bits and qt.codebook is None
        assert qt.codes.dtype == codes.dtype
        np.testing.assert_array_equal(qt.codes, codes)
        np.testing.assert_array_equal(qt.scales, scales)
        if zeros is None:
            assert qt.zeros is None
        else:
            np.testing.assert_array_equal(qt.zeros, zeros)


def test_the_frozen_reference_is_not_trivially_equal() -> None:
    """Guards the comparison above: the reference does react to its settings."""
    w = seeded_weights()[0]
    a = rtn_0_1_0(w, 4, 128, True)[0]
    assert not np.array_equal(a, rtn_0_1_0(w, 3, 128, True)[0])
    assert not np.array_equal(a, rtn_0_1_0(w, 4, 32, True)[0])
    assert not np.array_equal(a, rtn_0_1_0(w, 4, 128, False)[0])
