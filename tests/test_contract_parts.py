"""The parts of the quantization contract beyond codes and scales: full-range grids, per-row and
per-group codebooks, per-input-channel scales (AWQ), the randomized block-Hadamard input
transform (QuIP#, QuaRot) and the low-rank correction (LoRC, LQER).

Each is checked against its formula written out here, through every place that reads a layer:
`dequantize`, packing, the artifact file, the plugin process's wire, the packed and device
stores' `linear`, embedding lookups, the compute report and the device memory model.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from qbench.embedded.compute import ComputeCountingStore
from qbench.embedded.device_store import DeviceWeightStore
from qbench.models.weight_store import WeightInfo
from qbench.quant.apply import PackedWeightStore, QuantizationPolicy
from qbench.quant.artifact import ArtifactError, build_manifest, read_artifact, write_artifact
from qbench.quant.contract import QuantizedTensor, QuantizedTensorError, dequantize, dequantize_codes
from qbench.quant.grids import grid_codes, uniform_grid
from qbench.quant.hadamard import hadamard_block, hadamard_transform, inverse_hadamard_transform, random_signs
from qbench.quant.lowrank import LowRankCorrection, add_lowrank_correction, lowrank_factors
from qbench.quant.packing import pack_quantized

RNG = np.random.default_rng(0)


def sylvester(n: int) -> np.ndarray:
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def explicit_h(n: int, signs: np.ndarray) -> np.ndarray:
    """`diag(d) blockdiag(S_b) / sqrt(b)` as a dense matrix, from its definition."""
    b = hadamard_block(n)
    blocks = np.kron(np.eye(n // b), sylvester(b)) / math.sqrt(b)
    return np.diag(signs.astype(np.float64)) @ blocks


# -- grids ---------------------------------------------------------------------------------------


def test_full_range_symmetric_grid_uses_all_codes():
    w = np.array([[-1.0, -0.5, 0.0, 0.3, 0.7, 1.0]])
    scale, zero = uniform_grid(w, 3, True, None, full_range=True)
    assert zero is None and scale[0, 0] == pytest.approx(2.0 / 7.0)
    codes = grid_codes(w, scale, None, 3, full_range=True)
    assert codes.min() == -4 and codes.max() == 3  # 8 levels: -1.0 -> -3.5 rounds to -4
    restricted = grid_codes(w, *uniform_grid(w, 3, True, None), 3)
    assert restricted.min() == -3 and restricted.max() == 3


# -- the Hadamard transform -----------------------------------------------------------------------


@pytest.mark.parametrize("n, block", [(384, 128), (1536, 512), (1024, 1024), (240, 16), (10, 2), (7, 1)])
def test_fast_transform_is_the_block_hadamard_matrix(n, block):
    assert hadamard_block(n) == block
    signs = random_signs(n, seed=3)
    x = RNG.standard_normal((5, n))
    h = explicit_h(n, signs)
    np.testing.assert_allclose(hadamard_transform(x, signs), x @ h, atol=1e-12)
    np.testing.assert_allclose(inverse_hadamard_transform(x @ h, signs), x, atol=1e-12)
    np.testing.assert_allclose(h @ h.T, np.eye(n), atol=1e-12)
    x32 = x.astype(np.float32)
    before = x32.copy()
    assert hadamard_transform(x32, signs).dtype == np.float32
    inverse_hadamard_transform(x32, signs)
    np.testing.assert_array_equal(x32, before)  # neither transform writes into its input


# -- the tensor and its effective weight ---------------------------------------------------------------


def full_tensor(out_f=12, in_f=24, group=8, rank=3, lowrank_dtype="float16") -> tuple[QuantizedTensor, np.ndarray]:
    """A tensor declaring every part, and its weight computed from the contract's formula."""
    n_groups = in_f // group
    codes = RNG.integers(0, 8, (out_f, in_f))
    codebook = RNG.standard_normal((out_f, n_groups, 8)).astype(np.float32)
    scales = RNG.uniform(0.5, 2.0, (out_f, n_groups)).astype(np.float32)
    s = RNG.uniform(0.5, 2.0, in_f).astype(np.float32)
    d = random_signs(in_f, seed=1)
    u = RNG.standard_normal((out_f, rank)).astype(np.float32) * 0.1
    v = RNG.standard_normal((rank, in_f)).astype(np.float32) * 0.1
    qt = QuantizedTensor(codes=codes, code_bits=3, scales=scales, group_size=group, codebook=codebook,
                         input_scales=s, hadamard_signs=d, lowrank_u=u, lowrank_v=v, lowrank_dtype=lowrank_dtype)
    col_group = np.arange(in_f) // group
    q = np.array([[codebook[r, col_group[c], codes[r, c]] * scales[r, col_group[c]] for c in range(in_f)]
                  for r in range(out_f)])
    w = q @ explicit_h(in_f, d).T / s[None, :] + u.astype(np.float64) @ v
    return qt, w


def test_dequantize_follows_the_contract_formula():
    qt, w = full_tensor()
    np.testing.assert_allclose(dequantize(qt), w, rtol=1e-5, atol=1e-5)
    # the codes' matrix is what the transformed input meets
    x = RNG.standard_normal((4, 24)).astype(np.float32)
    y = hadamard_transform(x / qt.input_scales, qt.hadamard_signs) @ dequantize_codes(qt).T + (x @ qt.lowrank_v.T) @ qt.lowrank_u.T
    np.testing.assert_allclose(y, x @ w.T, rtol=1e-4, atol=1e-4)


def test_per_row_and_per_tensor_codebooks():
    codes = RNG.integers(0, 4, (3, 5))
    per_row = RNG.standard_normal((3, 4))
    qt = QuantizedTensor(codes=codes, code_bits=2, scales=np.ones((3, 1)), codebook=per_row)
    np.testing.assert_allclose(dequantize(qt), np.take_along_axis(per_row, codes, axis=1), rtol=1e-6)
    shared = QuantizedTensor(codes=codes, code_bits=2, scales=np.ones((1, 1)), codebook=per_row[:1])
    np.testing.assert_allclose(dequantize(shared), per_row[0][codes], rtol=1e-6)


@pytest.mark.parametrize("change, message", [
    ({"input_scales": np.ones(5)}, "input_scales shape"),
    ({"input_scales": -np.ones(24)}, "finite and > 0"),
    ({"hadamard_signs": np.zeros(24)}, "only -1 and \\+1"),
    ({"hadamard_signs": np.ones(23)}, "hadamard_signs shape"),
    ({"lowrank_u": np.ones((12, 2))}, "come together"),
    ({"lowrank_u": np.ones((12, 2)), "lowrank_v": np.ones((3, 24))}, "do not make"),
    ({"lowrank_u": np.ones((12, 2)), "lowrank_v": np.ones((2, 24)), "lowrank_dtype": "int4"}, "lowrank_dtype"),
    ({"codebook": np.ones((12, 5, 8))}, "codebook shape"),
    ({"codebook": np.ones((7, 8))}, "codebook shape"),
])
def test_a_wrongly_declared_part_is_a_one_line_error(change, message):
    base = {"codes": np.zeros((12, 24), int), "code_bits": 3, "scales": np.ones((12, 3)), "group_size": 8}
    with pytest.raises(QuantizedTensorError, match=message) as info:
        QuantizedTensor(**(base | change))
    assert "\n" not in str(info.value)


# -- packing, the artifact and the stores ---------------------------------------------------------------


@pytest.mark.parametrize("lowrank_dtype", ["float16", "int8"])
def test_packed_layer_runs_as_declared_in_every_store(lowrank_dtype, tmp_path):
    qt, w = full_tensor(lowrank_dtype=lowrank_dtype)
    pt = pack_quantized(qt)
    tol = 2e-2 if lowrank_dtype == "int8" else 5e-3
    np.testing.assert_allclose(pt.dequantize(), w, atol=tol)
    assert pt.nbytes == sum(getattr(pt, b).nbytes for b in pt.BUFFERS if getattr(pt, b) is not None)
    assert pt.lowrank_dtype == lowrank_dtype and pt.lowrank_rank == 3
    rows = np.array([5, 0, 5, 11])
    np.testing.assert_array_equal(pt.dequantize_rows(rows), pt.dequantize()[rows])

    info = WeightInfo(name="layer", shape=(12, 24), kind="linear")
    params = {"layer.weight": w.astype(np.float32), "layer.bias": np.arange(12, dtype=np.float32)}
    x = RNG.standard_normal((2, 3, 24)).astype(np.float32)
    expected = x @ pt.dequantize().T + params["layer.bias"]
    packed_store = PackedWeightStore(params, [info], {"layer": pt})
    np.testing.assert_allclose(packed_store.linear("layer", x), expected, rtol=1e-4, atol=1e-4)
    for cache in (0, 1 << 20):
        device = DeviceWeightStore(params, [info], {"layer": pt}, cache_bytes=cache, block_bytes=24 * 4 * 5)
        np.testing.assert_allclose(device.linear("layer", x), expected, rtol=1e-4, atol=1e-4)
        product, _ = device.streamed_linear_bytes("layer", 6)
        assert product >= 4 * 6 * 24 + 4 * 6 * (3 + 12)  # the transformed input and the correction's temporaries

    counting = ComputeCountingStore(packed_store)
    counting.linear("layer", x)
    report = counting.report()
    assert report.input_scale_muls == 6 * 24
    assert report.transform_additions == 6 * 24 * 3  # block 8: three butterfly stages
    assert report.lowrank_macs == 6 * 3 * (24 + 12)

    manifest = build_manifest("m", "0" * 64, _identity(), QuantizationPolicy(), "float16", {"layer": pt})
    path = write_artifact(tmp_path / "a.safetensors", manifest, {"layer": pt})
    _, back = read_artifact(path)
    np.testing.assert_array_equal(back["layer"].dequantize(), pt.dequantize())


def _identity():
    from qbench.quant.apply import QuantizerIdentity

    return QuantizerIdentity(name="t", version="1", config={}, needs_calibration=False)


def test_an_artifact_with_a_forged_part_is_refused(tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import save_file

    qt, _ = full_tensor()
    pt = pack_quantized(qt)
    manifest = build_manifest("m", "0" * 64, _identity(), QuantizationPolicy(), "float16", {"layer": pt})
    path = write_artifact(tmp_path / "a.safetensors", manifest, {"layer": pt})
    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["layer.hadamard_signs"] = np.zeros(24, np.int8)  # not a rotation any more
    forged = tmp_path / "forged.safetensors"
    save_file(tensors, str(forged), metadata=meta)
    with pytest.raises(ArtifactError, match="digest"):
        read_artifact(forged)


def test_policy_without_lowrank_serializes_as_before():
    assert "lowrank" not in QuantizationPolicy().model_dump()
    with_lr = QuantizationPolicy(lowrank=LowRankCorrection(rank=8))
    assert with_lr.model_dump()["lowrank"] == {"rank": 8, "dtype": "float16"}
    assert QuantizationPolicy.model_validate(with_lr.model_dump()) == with_lr


# -- the low-rank correction ------------------------------------------------------------------------------


def test_lowrank_without_stats_is_the_truncated_svd_of_the_error():
    error = RNG.standard_normal((20, 16))
    u, v = lowrank_factors(error, 4, None)
    uu, ss, vt = np.linalg.svd(error)
    np.testing.assert_allclose(u @ v, (uu[:, :4] * ss[:4]) @ vt[:4], atol=1e-5)


def test_activation_aware_lowrank_lowers_the_output_error_on_the_calibration_inputs():
    from qbench.quant.contract import LayerStats

    w = RNG.standard_normal((32, 48)).astype(np.float32)
    scale, _ = uniform_grid(w, 2, True, None)
    qt = QuantizedTensor(codes=grid_codes(w, scale, None, 2), code_bits=2, scales=scale, signed=True)
    # inputs with a few dominant channels: where the plain SVD spends its rank badly
    x = RNG.standard_normal((500, 48)) * np.where(np.arange(48) < 4, 20.0, 0.5)
    stats = LayerStats(xtx=x.T @ x, n_rows=500)

    def out_err(t):
        return float(np.linalg.norm(x @ (w - dequantize(t)).T))

    plain = add_lowrank_correction(qt, w, None, LowRankCorrection(rank=4))
    aware = add_lowrank_correction(qt, w, stats, LowRankCorrection(rank=4))
    assert out_err(aware) < out_err(plain) < out_err(qt)
    with pytest.raises(QuantizedTensorError, match="already declares"):
        add_lowrank_correction(aware, w, stats, LowRankCorrection(rank=4))
