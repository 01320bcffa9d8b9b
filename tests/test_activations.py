"""The float32 erf/GELU both models use, against math.erf in float64."""

from __future__ import annotations

import math

import numpy as np

from qbench.models.activations import erf, gelu, layer_norm, softmax


def test_erf_within_a_few_ulp_of_math_erf():
    x = np.linspace(-6, 6, 20001, dtype=np.float32)
    ref = np.array([math.erf(float(v)) for v in x])
    assert np.abs(erf(x) - ref).max() < 1e-6


def test_gelu_is_the_exact_erf_gelu():
    x = np.linspace(-8, 8, 10001, dtype=np.float32)
    ref = np.array([v * 0.5 * (1 + math.erf(v / math.sqrt(2))) for v in x.astype(np.float64)])
    np.testing.assert_allclose(gelu(x), ref, atol=2e-6)
    y = x.copy()
    assert gelu(y, out=y) is y and np.array_equal(y, gelu(x))  # in place gives the same bits


def test_softmax_and_layer_norm():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 7)).astype(np.float32)
    s = softmax(x.copy())
    np.testing.assert_allclose(s.sum(-1), 1, rtol=1e-6)
    ln = layer_norm(x, np.ones(7, np.float32), np.zeros(7, np.float32))
    np.testing.assert_allclose(ln.mean(-1), 0, atol=1e-6)
    np.testing.assert_allclose(ln.std(-1), 1, rtol=1e-3)


def test_gelu_on_threads_is_bit_identical() -> None:
    from qbench.models.activations import _BLOCK, gelu

    x = (3 * np.random.default_rng(7).standard_normal(5 * _BLOCK + 17)).astype(np.float32)
    one = gelu(x)
    for threads in (2, 3, 8):
        np.testing.assert_array_equal(gelu(x, threads=threads), one)
    y = x.copy()
    assert gelu(y, out=y, threads=2) is y
    np.testing.assert_array_equal(y, one)
    assert gelu(np.zeros(0, np.float32), threads=2).shape == (0,)
