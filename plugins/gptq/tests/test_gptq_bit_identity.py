"""GPTQ on the shared `qbench.uniform_grid` helpers and the shared sweep
`qbench.quant.error_feedback` gives exactly the codes and scales of qbench-gptq 0.1.0, whose code
is frozen below, at 0.1.0's settings: the committed leaderboard entries were made with them, and
GPTQ's error feedback would turn any rounding difference in the grid into different codes
further along the row. 0.1.0 had neither `full_range` (its grid is `full_range=false`) nor `mse`
(off, still the default), and its default grid was symmetric (0.2.0's is asymmetric)."""

from __future__ import annotations

import numpy as np
import pytest

qbench_gptq = pytest.importorskip("qbench_gptq", reason="pip install -e plugins/gptq")
from qbench import LayerStats  # noqa: E402
from qbench.quant.apply import layer_stats  # noqa: E402

GPTQ = qbench_gptq.GPTQQuantizer
#: 0.1.0's defaults (symmetric, restricted grid, no clipping search, no act_order), pinned so the
#: comparison does not follow later defaults
OLD_DEFAULTS = {"symmetric": True, "full_range": False, "mse": False, "act_order": False}


def gptq_0_1_0(weight: np.ndarray, stats: LayerStats, cfg):
    """qbench-gptq 0.1.0's `GPTQQuantizer.quantize`, verbatim but for names: (codes, scales, zeros, group_size)."""

    def grid(w, bits, symmetric):
        if symmetric:
            scale = np.abs(w).max(axis=1) / ((1 << (bits - 1)) - 1)
            scale[scale == 0] = 1.0
            return scale, None
        maxq = (1 << bits) - 1
        lo = np.minimum(w.min(axis=1), 0.0)
        hi = np.maximum(w.max(axis=1), 0.0)
        scale = (hi - lo) / maxq
        scale[scale == 0] = 1.0
        return scale, np.clip(np.rint(-lo / scale), 0, maxq)

    def quantize_column(w, scale, zero, bits):
        q = np.rint(w / scale)
        if zero is None:
            qmax = (1 << (bits - 1)) - 1
            codes = np.clip(q, -qmax, qmax)
            return codes, codes * scale
        codes = np.clip(q + zero, 0, (1 << bits) - 1)
        return codes, (codes - zero) * scale

    def inverse_hessian_factor(h):
        lower = np.linalg.cholesky(h)
        lower_inv = np.linalg.inv(lower)
        h_inv = lower_inv.T @ lower_inv
        h_inv = (h_inv + h_inv.T) / 2
        return np.linalg.cholesky(h_inv).T

    bits, symmetric = cfg.bits, cfg.symmetric
    W = weight.astype(np.float64)
    out_f, in_f = W.shape
    H = 2.0 * np.asarray(stats.xtx, dtype=np.float64) / max(stats.n_rows, 1)
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    g = cfg.group_size if cfg.group_size is not None and cfg.group_size < in_f else None
    n_groups = 1 if g is None else -(-in_f // g)
    scales = np.ones((out_f, n_groups))
    zeros = None if symmetric else np.zeros((out_f, n_groups))
    static = g is None or cfg.static_groups or cfg.act_order

    def set_group(j, cols):
        scale, zero = grid(cols, bits, symmetric)
        scales[:, j] = scale
        if zeros is not None:
            zeros[:, j] = zero

    if g is None:
        set_group(0, W)
    elif static:
        for j in range(n_groups):
            set_group(j, W[:, j * g : (j + 1) * g])

    if cfg.act_order:
        perm = np.argsort(-np.diag(H), kind="stable")
        W = W[:, perm]
        H = H[perm][:, perm]
    else:
        perm = np.arange(in_f)

    H[np.diag_indices(in_f)] += cfg.percdamp * np.mean(np.diag(H))
    Hinv = inverse_hessian_factor(H)

    codes = np.zeros((out_f, in_f), dtype=np.int16)
    bs = cfg.block_size
    for i1 in range(0, in_f, bs):
        i2 = min(i1 + bs, in_f)
        W1 = W[:, i1:i2].copy()
        Err1 = np.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if not static and col % g == 0:
                end = min(col + g, in_f)
                current = W1[:, i : min(end, i2) - i1]
                if end > i2:
                    pending = W[:, i2:end] - Err1[:, :i] @ Hinv[i1 : i1 + i, i2:end]
                    current = np.hstack([current, pending])
                set_group(col // g, current)
            j = 0 if g is None else int(perm[col]) // g
            w = W1[:, i]
            c, q = quantize_column(w, scales[:, j], None if zeros is None else zeros[:, j], bits)
            codes[:, col] = c
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= np.outer(err, Hinv1[i, i:])
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    if cfg.act_order:
        codes = codes[:, np.argsort(perm)]
    return codes, scales.astype(np.float32), None if zeros is None else zeros.astype(np.float32), g


@pytest.fixture(scope="module")
def problems() -> list[tuple[np.ndarray, LayerStats]]:
    """Seeded weights with correlated, unevenly scaled inputs; one has a dead input and an odd width."""
    rng = np.random.default_rng(7)
    out = []
    for out_f, in_f, dead in ((48, 256, None), (24, 150, 17)):
        mix = rng.normal(size=(in_f, in_f)) / np.sqrt(in_f)
        x = (rng.normal(size=(600, in_f)) @ mix) * np.exp(rng.normal(scale=0.7, size=in_f))
        if dead is not None:
            x[:, dead] = 0.0
        w = rng.normal(size=(out_f, in_f)).astype(np.float32)
        w[3] = 0.0  # an all-zero row
        out.append((w, layer_stats(x.astype(np.float32), in_f)))
    return out


@pytest.mark.parametrize(
    "cfg",
    [
        {},
        dict(bits=3),
        dict(bits=8, group_size=None),
        dict(bits=4, group_size=64, symmetric=False),
        dict(bits=2, group_size=32, static_groups=True, symmetric=False),
        dict(bits=3, group_size=64, act_order=True),
        dict(bits=3, group_size=None, act_order=True),
        dict(bits=3, group_size=40, block_size=48),  # groups straddling blocks: the pending update
        dict(bits=5, group_size=100, block_size=7, symmetric=False, percdamp=0.1),
    ],
    ids=repr,
)
def test_codes_and_scales_are_bit_identical_to_0_1_0(problems, cfg: dict) -> None:
    config = GPTQ.Config(**{**OLD_DEFAULTS, **cfg})
    for w, stats in problems:
        qt = GPTQ(config).quantize(w, stats)
        codes, scales, zeros, g = gptq_0_1_0(w, stats, config)
        assert qt.group_size == g and qt.signed == config.symmetric and qt.code_bits == config.bits
        assert qt.codes.dtype == codes.dtype
        np.testing.assert_array_equal(qt.codes, codes)
        np.testing.assert_array_equal(qt.scales, scales)
        if zeros is None:
            assert qt.zeros is None
        else:
            np.testing.assert_array_equal(qt.zeros, zeros)


def test_the_frozen_reference_feeds_errors_back(problems) -> None:
    """Guards the comparison above: the reference is GPTQ, not plain rounding."""
    w, stats = problems[0]
    cfg = GPTQ.Config(bits=3, group_size=None, **OLD_DEFAULTS)
    identity = LayerStats(xtx=np.eye(w.shape[1]), n_rows=1)
    assert not np.array_equal(gptq_0_1_0(w, stats, cfg)[0], gptq_0_1_0(w, identity, cfg)[0])


def test_the_new_default_grid_differs_from_0_1_0(problems) -> None:
    """Guards the settings above: the full-range grid gives other codes than 0.1.0's."""
    w, stats = problems[0]
    qt = GPTQ(GPTQ.Config(bits=3, symmetric=True)).quantize(w, stats)
    codes, scales, _, _ = gptq_0_1_0(w, stats, GPTQ.Config(bits=3, **OLD_DEFAULTS))
    assert qt.codes.min() == -4 and not np.array_equal(qt.codes, codes)
