"""qbench-quip: randomized-Hadamard incoherence + GPTQ."""

from __future__ import annotations


import numpy as np
import pytest

qbench_quip = pytest.importorskip("qbench_quip", reason="pip install -e plugins/quip")
qbench_gptq = pytest.importorskip("qbench_gptq", reason="pip install -e plugins/gptq")
from qbench import LayerStats, dequantize  # noqa: E402
from qbench.plugin_manager import discover_quantizers  # noqa: E402
from qbench.quant.apply import layer_stats  # noqa: E402
from qbench.quant.contract import dequantize_codes  # noqa: E402
from qbench.quant.hadamard import hadamard_transform, random_signs  # noqa: E402

QuIP = qbench_quip.QuIPQuantizer
GPTQ = qbench_gptq.GPTQQuantizer


def dense_h(signs: np.ndarray) -> np.ndarray:
    """The matrix H itself: the rows of the identity times H."""
    return hadamard_transform(np.eye(signs.size), signs)


def outlier_problem(seed: int = 0, out_f: int = 48, in_f: int = 128) -> tuple[np.ndarray, np.ndarray, LayerStats]:
    """A Gaussian weight with a few input columns 8x larger (as real layers have), and
    correlated inputs with uneven channel scales."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(out_f, in_f))
    w[:, rng.choice(in_f, 4, replace=False)] *= 8.0
    mix = rng.normal(size=(in_f, in_f)) / np.sqrt(in_f)
    x = (rng.normal(size=(1500, in_f)) @ mix + 0.3 * rng.normal(size=(1500, in_f))) * np.exp(rng.normal(scale=0.4, size=in_f))
    x, w = x.astype(np.float32), w.astype(np.float32)
    return w, x, layer_stats(x, in_f)


def output_error(w: np.ndarray, wq: np.ndarray, x: np.ndarray) -> float:
    return float(np.linalg.norm(x @ w.T - x @ wq.T) / np.linalg.norm(x @ w.T))


def test_registered_through_the_entry_point() -> None:
    entries, _ = discover_quantizers()
    entry = entries["quip"]
    assert entry.cls is QuIP and entry.needs_calibration and entry.distribution == "qbench-quip"


def test_rotate_hessian_is_h_transpose_xtx_h() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 24))
    xtx = x.T @ x
    signs = random_signs(24, 3)  # 24 = 8 * 3: blocks of 8
    h = dense_h(signs)
    np.testing.assert_allclose(h.T @ h, np.eye(24), atol=1e-12)
    np.testing.assert_allclose(qbench_quip.rotate_hessian(xtx, signs), h.T @ xtx @ h, rtol=1e-10, atol=1e-10)


def test_codes_quantize_w_h_and_dequantize_back_to_w() -> None:
    w, _, stats = outlier_problem(in_f=96)  # 96 = 32 * 3: the transform works in blocks of 32
    qt = QuIP(QuIP.Config(bits=8, group_size=None)).quantize(w, stats)
    np.testing.assert_array_equal(qt.hadamard_signs, random_signs(96, 0))
    assert qt.signed and qt.group_size is None and qt.scales.shape == (48, 1) and qt.zeros is None
    assert qt.codes.min() >= -128 and qt.codes.max() <= 127 and qt.codes.min() < -100  # full range
    # the codes stand for W H, and dequantize undoes H (orthogonal): both close at 8 bits
    w_rot = hadamard_transform(w.astype(np.float64), qt.hadamard_signs)
    assert np.linalg.norm(dequantize_codes(qt) - w_rot) / np.linalg.norm(w) < 0.02
    assert np.linalg.norm(dequantize(qt) - w) / np.linalg.norm(w) < 0.02


def test_seed_and_group_size() -> None:
    w, _, stats = outlier_problem()
    qt = QuIP(QuIP.Config(bits=3, seed=5, group_size=64)).quantize(w, stats)
    np.testing.assert_array_equal(qt.hadamard_signs, random_signs(128, 5))
    assert qt.group_size == 64 and qt.scales.shape == (48, 2)
    default = QuIP(QuIP.Config(bits=3)).quantize(w, stats)  # groups of 128 = the whole row here
    assert default.group_size is None and default.scales.shape == (48, 1)


def test_incoherence_flattens_outlier_columns() -> None:
    w, _, _ = outlier_problem()
    w_rot = hadamard_transform(w.astype(np.float64), random_signs(w.shape[1], 0))

    def peak_to_rms(m: np.ndarray) -> float:
        return float(np.mean(np.abs(m).max(axis=1) / np.sqrt(np.mean(m**2, axis=1))))

    assert peak_to_rms(w_rot) < 0.5 * peak_to_rms(w)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_lower_output_error_than_gptq_on_outlier_columns(bits: int) -> None:
    # same sweep, same per-channel full-range grid: only the rotation differs
    w, x, stats = outlier_problem()
    assert QuIP.Config().group_size == 128 and GPTQ.Config().group_size == 128  # the defaults agree too
    quip = QuIP(QuIP.Config(bits=bits, group_size=None)).quantize(w, stats)
    gptq = GPTQ(GPTQ.Config(bits=bits, group_size=None, symmetric=True, full_range=True)).quantize(w, stats)
    e_quip, e_gptq = output_error(w, dequantize(quip), x), output_error(w, dequantize(gptq), x)
    assert e_quip < 0.8 * e_gptq, (e_quip, e_gptq)


def test_needs_stats() -> None:
    with pytest.raises(ValueError, match="calibration"):
        QuIP().quantize(np.ones((2, 4), np.float32), None)
    with pytest.raises(ValueError, match="shape"):
        QuIP().quantize(np.ones((2, 4), np.float32), LayerStats(xtx=np.eye(3), n_rows=1))


def test_wav2vec2_run_end_to_end(run_seeded_wav2vec2) -> None:
    r = run_seeded_wav2vec2("--calibration-limit", "2", "--plugin", "quip", "--set", "bits=4")
    assert r["status"] == "complete" and r["quantization"]["quantizer"] == "quip"
    assert r["metrics"]["model_bytes"] < r["quantization"]["float_model_bytes"]


def test_whisper_width_not_a_power_of_two() -> None:
    # 384 = 128 * 3: blocks of 128, signs on all 384 columns; still orthogonal end to end
    rng = np.random.default_rng(2)
    x = rng.normal(size=(600, 384)).astype(np.float32)
    w = rng.normal(size=(6, 384)).astype(np.float32)
    qt = QuIP(QuIP.Config(bits=8)).quantize(w, layer_stats(x, 384))
    assert qt.hadamard_signs.shape == (384,) and qt.group_size == 128 and qt.scales.shape == (6, 3)
    assert np.linalg.norm(dequantize(qt) - w) / np.linalg.norm(w) < 0.02


def test_asym_alpha_is_off_by_default_and_then_leaves_the_config_as_it_was() -> None:
    assert not QuIP().wants_float_inputs and QuIP({"asym_alpha": 0.25}).wants_float_inputs
    assert "asym_alpha" not in QuIP().config.model_dump() and "refit_scales" not in QuIP().config.model_dump()  # labels of earlier entries unchanged
    assert QuIP({"asym_alpha": 0.25}).config.model_dump()["asym_alpha"] == 0.25
    with pytest.raises(ValueError, match="dxtx"):
        w, _, stats = outlier_problem()
        QuIP({"asym_alpha": 0.25}).quantize(w, stats)  # stats without the float inputs


def test_asymmetric_calibration_follows_the_float_output_through_drifted_inputs() -> None:
    """GPTAQ's point: when an earlier quantized layer has distorted this layer's input, fitting
    the float model's output beats fitting the float weight on the distorted input."""
    w, x_float, _ = outlier_problem(seed=4)
    rng = np.random.default_rng(5)
    in_f = x_float.shape[1]
    x = (x_float @ (np.eye(in_f) + 0.2 * rng.normal(size=(in_f, in_f)) / np.sqrt(in_f))).astype(np.float32)
    stats = layer_stats(x, in_f, x_float)

    def loss(cfg: dict) -> float:
        wq = dequantize(QuIP({"bits": 3, **cfg}).quantize(w, stats))
        return float(np.linalg.norm(x @ wq.T - x_float @ w.T) / np.linalg.norm(x_float @ w.T))

    plain, quarter, full = loss({}), loss({"asym_alpha": 0.25}), loss({"asym_alpha": 1.0})
    assert full < quarter < plain and full < 0.7 * plain


def test_wav2vec2_asymmetric_run_end_to_end(run_seeded_wav2vec2) -> None:
    """The float inputs cross the plugin process boundary and the config records the knob."""
    r = run_seeded_wav2vec2("--calibration-limit", "2", "--plugin", "quip", "--set", "bits=3", "--set", "asym_alpha=0.25")
    assert r["status"] == "complete" and r["quantization"]["config"]["asym_alpha"] == 0.25


@pytest.mark.parametrize("bits", [2, 3])
def test_refit_scales_lowers_the_layer_output_error(bits: int) -> None:
    w, x, stats = outlier_problem(seed=6)
    plain = output_error(w, dequantize(QuIP({"bits": bits}).quantize(w, stats)), x)
    refit = output_error(w, dequantize(QuIP({"bits": bits, "refit_scales": True}).quantize(w, stats)), x)
    assert refit < plain
