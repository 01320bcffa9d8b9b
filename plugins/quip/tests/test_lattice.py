"""qbench-quip's D4 lattice codebook and its block-LDLQ sweep (`codebook="d4"`)."""

from __future__ import annotations

import numpy as np
import pytest

qbench_quip = pytest.importorskip("qbench_quip", reason="pip install -e plugins/quip")
from qbench_quip.lattice import (  # noqa: E402
    D4_GAUSSIAN_SCALE,
    codeword_values,
    d4_codebook,
    nearest_codewords,
    vector_error_feedback,
)

from qbench import dequantize  # noqa: E402
from qbench.quant.apply import layer_stats  # noqa: E402
from qbench.quant.contract import QuantizedTensorError  # noqa: E402
from qbench.quant.error_feedback import gptq_hessian  # noqa: E402

QuIP = qbench_quip.QuIPQuantizer


def correlated_problem(seed: int = 0, out_f: int = 32, in_f: int = 64) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(in_f, in_f)) / np.sqrt(in_f)
    x = rng.normal(size=(2000, in_f)) @ mix + 0.2 * rng.normal(size=(2000, in_f))
    return rng.normal(size=(out_f, in_f)), x


def output_error(w: np.ndarray, q: np.ndarray, h: np.ndarray) -> float:
    e = w - q
    return float(np.trace(e @ h @ e.T) / np.trace(w @ h @ w.T))


def test_d4_codebook_is_quip_sharps_256_points() -> None:
    cb = d4_codebook().astype(np.float64)
    assert cb.shape == (256, 4) and len({tuple(p) for p in cb}) == 256
    assert np.all(np.abs(cb * 2) % 2 == 1)  # every coordinate a half-integer
    assert np.all(np.sum(cb, axis=1) % 2 == 0) and np.all(np.sum(cb * cb, axis=1) <= 9)
    # the shells quip-sharp's latticed4.py lists, by sorted absolute value
    shells: dict[tuple[float, ...], int] = {}
    for p in cb:
        key = tuple(sorted(np.abs(p)))
        shells[key] = shells.get(key, 0) + 1
    assert shells == {(0.5,) * 4: 8, (1.5,) * 4: 8, (0.5, 0.5, 1.5, 1.5): 48, (0.5, 0.5, 0.5, 1.5): 32,
                      (0.5, 1.5, 1.5, 1.5): 32, (0.5, 0.5, 0.5, 2.5): 32, (0.5, 0.5, 1.5, 2.5): 96}


def test_nearest_codewords_is_the_brute_force_nearest() -> None:
    x = np.random.default_rng(1).normal(size=(500, 4)) * 1.5
    cb = d4_codebook().astype(np.float64)
    brute = np.argmin(((x[:, None, :] - cb[None]) ** 2).sum(-1), axis=1)
    np.testing.assert_array_equal(nearest_codewords(x, cb), brute)


def test_d4_beats_the_best_four_level_grid_on_a_gaussian() -> None:
    """Why the codebook exists: per coordinate it covers a Gaussian more tightly than a
    scalar 2-bit grid can at the same 2 bits."""
    x = np.random.default_rng(2).standard_normal((40_000, 4))
    cb = d4_codebook().astype(np.float64) * D4_GAUSSIAN_SCALE
    lattice = float(np.mean((x - cb[nearest_codewords(x, cb)]) ** 2))
    levels = np.array([-1.5, -0.5, 0.5, 1.5]) * 0.996  # the uniform 4-level grid's optimal step for N(0, 1)
    flat = x.reshape(-1)
    scalar = float(np.mean(np.min((flat[:, None] - levels) ** 2, axis=1)))
    assert scalar > 0.115 and lattice < 0.106 and lattice < 0.9 * scalar


def test_identity_hessian_is_plain_nearest_rounding() -> None:
    """With H = I no block's error is worth feeding forward: each block rounds to its nearest codeword."""
    w, _ = correlated_problem()
    cb = d4_codebook()
    codes, scales = vector_error_feedback(w, np.eye(64), cb, group_size=None, percdamp=0.0)
    expected = nearest_codewords((w / scales).reshape(-1, 4), cb.astype(np.float64)).reshape(32, 16)
    np.testing.assert_array_equal(codes, expected)
    np.testing.assert_allclose(scales[:, 0], D4_GAUSSIAN_SCALE * np.sqrt(np.mean(w**2, axis=1)))


def test_feedback_lowers_the_output_error_on_correlated_inputs() -> None:
    w, x = correlated_problem()
    h = 2 * x.T @ x / len(x)
    cb = d4_codebook()
    codes, scales = vector_error_feedback(w, h, cb, group_size=None)
    ldlq = codeword_values(codes, cb) * scales
    nearest = codeword_values(nearest_codewords((w / scales).reshape(-1, 4), cb.astype(np.float64)).reshape(32, 16), cb) * scales
    assert output_error(w, ldlq, h) < 0.8 * output_error(w, nearest, h)


def test_group_scales_are_fitted_per_group() -> None:
    w, x = correlated_problem()
    codes, scales = vector_error_feedback(w, 2 * x.T @ x / len(x), d4_codebook(), group_size=16)
    assert codes.shape == (32, 16) and scales.shape == (32, 4) and np.all(scales > 0)
    with pytest.raises(ValueError, match="multiple of the codebook's dimension 4"):
        vector_error_feedback(w, np.eye(64), d4_codebook(), group_size=6)


def test_quip_d4_tensor_declares_the_vector_codebook() -> None:
    w, x = correlated_problem()
    stats = layer_stats(x.astype(np.float32), 64)
    qt = QuIP(QuIP.Config(bits=2, codebook="d4", group_size=None)).quantize(w.astype(np.float32), stats)
    assert qt.vector_dim == 4 and qt.codes.shape == (32, 16) and qt.code_bits == 8
    assert qt.codebook.shape == (256, 4) and qt.scales.shape == (32, 1) and qt.hadamard_signs is not None
    h = gptq_hessian(stats)
    d4_error = output_error(w, dequantize(qt).astype(np.float64), h)
    grid = QuIP(QuIP.Config(bits=2, mse=True, group_size=None)).quantize(w.astype(np.float32), stats)
    assert d4_error < 0.85 * output_error(w, dequantize(grid).astype(np.float64), h)
    refit = QuIP(QuIP.Config(bits=2, codebook="d4", group_size=None, refit_scales=True)).quantize(w.astype(np.float32), stats)
    assert output_error(w, dequantize(refit).astype(np.float64), h) <= d4_error * (1 + 1e-9)


def test_quip_d4_falls_back_to_the_grid_where_the_width_is_not_a_multiple_of_4() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(300, 10)).astype(np.float32)  # wav2vec2's first conv: 1 channel x kernel 10
    qt = QuIP(QuIP.Config(bits=2, codebook="d4")).quantize(rng.normal(size=(8, 10)).astype(np.float32), layer_stats(x, 10))
    assert qt.vector_dim == 1 and qt.codebook is None and qt.code_bits == 2 and qt.codes.shape == (8, 10)


@pytest.mark.parametrize(("config", "message"), [
    ({"bits": 3, "codebook": "d4"}, "2-bit codebook"),
    ({"bits": 2, "codebook": "d4", "mse": True}, "does not take mse"),
    ({"bits": 2, "codebook": "d4", "refit_scales": True, "refit_rounds": 2}, "does not take refit_rounds"),
    ({"bits": 2, "codebook": "d4", "group_size": 6}, "multiple of 4"),
    ({"bits": 2, "codebook": "e8"}, "codebook"),
])
def test_d4_config_errors_name_the_knob(config: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        QuIP(config)


def test_grid_default_leaves_the_identity_unchanged() -> None:
    assert "codebook" not in QuIP.Config(bits=4).model_dump()
    assert QuIP.Config(bits=2, codebook="d4", group_size=None).model_dump()["codebook"] == "d4"


def test_a_d4_tensor_that_breaks_the_contract_is_refused() -> None:
    w, x = correlated_problem()
    qt = QuIP(QuIP.Config(bits=2, codebook="d4", group_size=None)).quantize(w.astype(np.float32), layer_stats(x.astype(np.float32), 64))
    with pytest.raises(QuantizedTensorError):
        qt.validate((32, 60))


def test_wav2vec2_d4_run_end_to_end(run_seeded_wav2vec2) -> None:
    """Every layer whose input width is a multiple of 4 is stored on the lattice; wav2vec2's
    first conv (1 channel x kernel 10) takes the 2-bit grid."""
    r = run_seeded_wav2vec2("--calibration-limit", "2", "--plugin", "quip", "--set", "bits=2", "--set", "codebook=d4",
                            "--set", "group_size=null", "--set", "asym_alpha=0.25")
    q = r["quantization"]
    assert r["status"] == "complete" and q["config"]["codebook"] == "d4"
    layers = {layer["name"]: layer for layer in q["layers"]}
    on_lattice = {name for name, layer in layers.items() if layer.get("vector_dim") == 4}
    assert len(on_lattice) > 15
    assert set(layers) - on_lattice == {name for name, layer in layers.items() if layer["shape"][1] % 4}
    assert {layers[name]["code_bits"] for name in on_lattice} == {8}
    assert all(layers[name]["code_bytes"] * 4 == layers[name]["shape"][0] * layers[name]["shape"][1] for name in on_lattice)
