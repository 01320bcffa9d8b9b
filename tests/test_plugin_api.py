"""What a plugin author imports from `qbench`: the names, their cost, and the grid helpers'
semantics (groups of input columns, the restricted symmetric range, integer zero points)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from pydantic import ValidationError

import qbench
from qbench import (
    LayerStats,
    QuantizedTensor,
    Quantizer,
    QuantizerConfig,
    column_groups,
    dequantize,
    expand_groups,
    grid_codes,
    grid_values,
    group_reduce,
    hookimpl,
    uniform_grid,
)


def test_the_plugin_api_is_importable_from_qbench() -> None:
    from qbench.hookspecs import hookimpl as spec_hookimpl
    from qbench.quant import contract

    assert hookimpl is spec_hookimpl and Quantizer is contract.Quantizer and LayerStats is contract.LayerStats
    assert set(qbench.__all__) <= set(dir(qbench)) and qbench.__version__


def test_importing_qbench_stays_cheap() -> None:
    """No plugin manager, hookspecs (whose annotations reach the whole package), model, rich or
    torch behind `import qbench`: a plugin imports it at load time."""
    code = "import json, sys, qbench; print(json.dumps(sorted(sys.modules)))"
    modules = set(json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout))
    assert {m for m in modules if m.startswith("qbench")} == {
        "qbench", "qbench.errors", "qbench.hook_markers", "qbench.quant", "qbench.quant.contract", "qbench.quant.grids"}
    assert not modules & {"torch", "scipy", "rich"}


def test_config_forbids_unknown_keys_and_a_quantizer_may_have_none() -> None:
    class Knobs(QuantizerConfig):
        bits: int = 4

    with pytest.raises(ValidationError, match="bitz"):
        Knobs(bitz=3)

    class Bare(Quantizer):
        name = "bare"

        def quantize(self, weight, stats):
            return QuantizedTensor(codes=np.zeros(weight.shape, np.int8), code_bits=2, scales=[[1.0]], signed=True)

    assert Bare.Config is QuantizerConfig and Bare.version is None and not Bare.needs_calibration
    assert Bare().config == QuantizerConfig() and Bare({}).config.model_dump() == {}
    with pytest.raises(ValidationError):
        Bare({"bits": 4})


def test_column_groups_count_a_partial_last_group() -> None:
    assert column_groups(10, 4) == [slice(0, 4), slice(4, 8), slice(8, 10)]
    assert column_groups(8, 4) == [slice(0, 4), slice(4, 8)]
    assert column_groups(10, None) == [slice(0, 10)]
    assert column_groups(3, 128) == [slice(0, 3)]


def test_group_reduce_and_expand_groups_are_inverse_shapes() -> None:
    w = np.arange(20, dtype=np.float64).reshape(2, 10)
    np.testing.assert_array_equal(group_reduce(w, 4, np.max), [[3, 7, 9], [13, 17, 19]])
    np.testing.assert_array_equal(group_reduce(w, 4, np.sum), [[6, 22, 17], [46, 62, 37]])
    np.testing.assert_array_equal(group_reduce(w, None, np.min), [[0], [10]])
    per_col = expand_groups(np.array([[1.0, 2.0, 3.0]]), 4, 10)
    np.testing.assert_array_equal(per_col, [[1, 1, 1, 1, 2, 2, 2, 2, 3, 3]])
    np.testing.assert_array_equal(expand_groups(np.array([[5.0], [6.0]]), None, 3), [[5, 5, 5], [6, 6, 6]])
    assert expand_groups(None, 4, 10) is None
    with pytest.raises(ValueError, match="2 groups do not cover 10 columns"):
        expand_groups(np.ones((1, 2)), 4, 10)


def test_symmetric_grid_is_the_restricted_range_per_group() -> None:
    w = np.array([[0.7, -0.35, 0.1, 0.0, 2.0, -1.0], [0.0] * 6])
    scales, zeros = uniform_grid(w, 4, True, group_size=4)
    assert zeros is None
    np.testing.assert_allclose(scales, [[0.1, 2.0 / 7], [1.0, 1.0]])  # an all-zero group: scale 1
    codes = grid_codes(w, expand_groups(scales, 4, 6), None, 4)
    assert codes.dtype == np.int16
    assert codes.tolist() == [[7, -4, 1, 0, 7, -4], [0] * 6]  # -3.5 rounds half to even; -7..7 only
    assert grid_codes(np.array([-5.0, 5.0]), np.array(1.0), None, 3).tolist() == [-3, 3]


def test_asymmetric_grid_includes_zero_with_an_integer_zero_point() -> None:
    w = np.array([[0.5, 1.0, 2.0, 3.0], [-3.0, -1.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    scales, zeros = uniform_grid(w, 2, False)
    np.testing.assert_allclose(scales[:, 0], [1.0, 4.0 / 3, 1.0])  # lo = min(w, 0), hi = max(w, 0); all zero: 1
    np.testing.assert_array_equal(zeros[:, 0], [0.0, 2.0, 0.0])  # round(3 / (4/3)) = 2
    codes = grid_codes(w, scales, zeros, 2)
    assert codes.min() >= 0 and codes.max() <= 3
    values = grid_values(codes, scales, zeros)
    assert values[1, 2] == 0.0 and np.all(values[2] == 0.0)  # an exact zero stays exact
    qt = QuantizedTensor(codes=codes, code_bits=2, scales=scales, zeros=zeros)
    np.testing.assert_allclose(dequantize(qt), values, rtol=1e-6)  # the harness reads them the same way


def test_grid_values_match_the_harness_dequantization_for_groups() -> None:
    rng = np.random.default_rng(0)
    w = rng.normal(size=(6, 50))
    for symmetric in (True, False):
        scales, zeros = uniform_grid(w, 3, symmetric, group_size=16)
        scale, zero = expand_groups(scales, 16, 50), expand_groups(zeros, 16, 50)
        codes = grid_codes(w, scale, zero, 3)
        qt = QuantizedTensor(codes=codes, code_bits=3, scales=scales, zeros=zeros, group_size=16, signed=symmetric)
        np.testing.assert_allclose(dequantize(qt), grid_values(codes, scale, zero), rtol=1e-6, atol=1e-7)
        if symmetric:  # |w| <= max|w| is inside the range: nearest point, half a step at most
            assert np.all(np.abs(w - grid_values(codes, scale, zero)) <= scale / 2 + 1e-12)
