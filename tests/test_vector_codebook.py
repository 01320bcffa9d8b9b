"""Vector codebooks (`QuantizedTensor.vector_dim > 1`, QuIP#'s lattice codebooks): one code per
`d` consecutive weights of a row, indexing one `[K, d]` codebook for the tensor.

Checked against the formula written out here through every place that reads a layer:
`dequantize`, packing and its byte count, the artifact file, the plugin process's wire, the
packed, device and activation-quantized stores, the compute report and the memory accountant;
end to end on a seeded Whisper, on wav2vec2 at the real base-960h widths, and through `qbench
run` with the quantizer installed as a plugin. A scalar layer (`vector_dim = 1`) is stored,
digested and reported exactly as before the part existed.
"""

from __future__ import annotations

import dataclasses
import json
import types
from pathlib import Path

import numpy as np
import pytest

from qbench.cli import main
from qbench.embedded.compute import ComputeCountingStore
from qbench.embedded.device_store import DeviceWeightStore
from qbench.embedded.memory import measure_peak
from qbench.embedded.session import estimate_memory
from qbench.models import whisper as W
from qbench.models.weight_store import WeightInfo, WeightStore
from qbench.quant.activation_scheme import (
    ActivationRecord,
    ActivationScheme,
    quantize_activations,
)
from qbench.quant.activation_store import ActivationQuantizingStore
from qbench.quant.apply import (
    PackedWeightStore,
    PluginError,
    QuantizationPolicy,
    QuantizerIdentity,
    quantize_model,
    quantizer_identity,
)
from qbench.quant.artifact import (
    ArtifactError,
    LayerLayout,
    build_manifest,
    read_artifact,
    write_artifact,
)
from qbench.quant.contract import (
    TENSOR_ARRAYS,
    QuantizedTensor,
    QuantizedTensorError,
    dequantize,
    dequantize_codes,
)
from qbench.quant.hadamard import random_signs
from qbench.quant.integer_matmul import runs_on_integers
from qbench.quant.packing import PackedTensor, check_packed_layout, pack_quantized
from qbench.quant.plugin_process import PluginProcess
from tests.test_contract_parts import explicit_h
from tests.test_wav2vec2_memory import BASE, _one_layer
from tests.test_whisper_model import DIMS, random_params, tiny_vocab

RNG = np.random.default_rng(0)
A8 = ActivationScheme(bits=8, granularity="token")

#: A QuIP#-style vector quantizer as an installable plugin module: the same source runs in this
#: process (`_plugin_module`) and, installed, in the plugin's own process, so the wire test can
#: compare the two bit for bit.
VECTOR_PLUGIN = '''
import numpy as np

from qbench import QuantizedTensor, Quantizer, hookimpl

D = 4


def d4_codebook():
    """QuIP#'s D4 codebook: the 256 points of the D4 lattice shifted by 1/2 (half-integer
    4-vectors with an even coordinate sum) of squared norm <= 9, shortest first."""
    half = np.arange(-7, 8, 2) / 2
    points = np.stack(np.meshgrid(half, half, half, half, indexing="ij"), axis=-1).reshape(-1, D)
    points = points[points.sum(axis=1) % 2 == 0]
    norms = (points**2).sum(axis=1)
    points = points[np.lexsort((*points.T[::-1], norms))]
    assert (points[:256] ** 2).sum(axis=1).max() == 9 and (points[256] ** 2).sum() > 9
    return points[:256].astype(np.float32)


def nearest(vectors, codebook):
    """Index of the nearest codebook row of every vector, in chunks (bounded memory)."""
    cb = codebook.astype(np.float64)
    out = np.empty(len(vectors), dtype=np.int64)
    for i in range(0, len(vectors), 8192):
        v = vectors[i : i + 8192].astype(np.float64)
        out[i : i + 8192] = np.argmin((cb**2).sum(axis=1)[None, :] - 2 * v @ cb.T, axis=1)
    return out


class VectorD4(Quantizer):
    name = "vq-d4"
    version = "1.0"
    description = "D4 lattice vector codebook, 8-bit codes per 4 weights, per-row scales"

    def quantize(self, weight, stats):
        out_f, in_f = weight.shape
        if in_f % D:
            # a vector cannot straddle rows: 8-bit per-row RTN for the odd layer
            scale = np.maximum(np.abs(weight).max(axis=1, keepdims=True), 1e-8) / 127
            codes = np.clip(np.rint(weight / scale), -127, 127).astype(np.int16)
            return QuantizedTensor(codes=codes, code_bits=8, scales=scale, signed=True)
        codebook = d4_codebook()
        rms = np.sqrt(np.mean(weight.astype(np.float64) ** 2, axis=1, keepdims=True))
        scale = np.maximum(rms / np.sqrt(np.mean(codebook.astype(np.float64) ** 2)), 1e-8)
        codes = nearest((weight / scale).reshape(-1, D), codebook).reshape(out_f, in_f // D)
        return QuantizedTensor(codes=codes, code_bits=8, scales=scale, codebook=codebook, vector_dim=D)


class VectorD4NoFallback(VectorD4):
    name = "vq-d4-strict"

    def quantize(self, weight, stats):
        out_f, in_f = weight.shape
        if in_f % D == 0:
            return super().quantize(weight, stats)
        # what a plugin that forgets the odd layer returns: a code per whole vector it could fit
        return QuantizedTensor(codes=np.zeros((out_f, in_f // D), np.int64), code_bits=8,
                               scales=np.ones((out_f, 1)), codebook=d4_codebook(), vector_dim=D)


class VectorD4Liar(VectorD4):
    name = "vq-d4-liar"

    def quantize(self, weight, stats):
        qt = super().quantize(weight, stats)
        qt.vector_dim = 2  # after the checks its constructor ran: only the harness's own catch it
        return qt


@hookimpl
def qbench_register_quantizers():
    return [VectorD4, VectorD4NoFallback, VectorD4Liar]
'''


def _plugin_module() -> types.ModuleType:
    """`VECTOR_PLUGIN` as a module of this process. Executed from its source rather than imported:
    the plugin's process imports the installed file, and this one gets the very same classes
    without the test folder on the child's PYTHONPATH."""
    module = types.ModuleType("qbench_vq_d4")
    exec(compile(VECTOR_PLUGIN, "qbench_vq_d4.py", "exec"), module.__dict__)
    return module


VQ = _plugin_module()


def vector_tensor(out_f=16, in_f=64, d=4, k=256, code_bits=8, group_size=None, **parts) -> QuantizedTensor:
    n_groups = 1 if group_size is None else -(-in_f // group_size)
    return QuantizedTensor(codes=RNG.integers(0, k, (out_f, in_f // d)), code_bits=code_bits,
                           scales=RNG.uniform(0.5, 2.0, (out_f, n_groups)), group_size=group_size,
                           codebook=RNG.standard_normal((k, d)), vector_dim=d, **parts)


def expected_codes_matrix(qt: QuantizedTensor) -> np.ndarray:
    """`codebook[codes]` laid out along the rows, times each column's group scale, from loops."""
    out_f, in_f = qt.shape
    d = qt.vector_dim
    q = np.zeros((out_f, in_f))
    for r in range(out_f):
        for c in range(in_f):
            g = 0 if qt.group_size is None else c // qt.group_size
            q[r, c] = qt.codebook[qt.codes[r, c // d], c % d] * qt.scales[r if qt.scales.shape[0] > 1 else 0, g]
    return q


# -- the contract ---------------------------------------------------------------------------------


HAND_CODEBOOK = np.array([[0.0, 1.0, 2.0, 3.0], [1.0, -1.0, 1.0, -1.0], [0.5, 0.5, 0.5, 0.5], [-2.0, 0.0, 0.0, 2.0]])
HAND_CODES = np.array([[1, 3], [2, 0]])


@pytest.mark.parametrize(("group_size", "scales", "expected"), [
    (None, [[2.0], [0.5]], [[2, -2, 2, -2, -4, 0, 0, 4], [0.25, 0.25, 0.25, 0.25, 0, 0.5, 1, 1.5]]),
    (4, [[2.0, 3.0], [0.5, -1.0]], [[2, -2, 2, -2, -6, 0, 0, 6], [0.25, 0.25, 0.25, 0.25, 0, -1, -2, -3]]),
])
def test_a_hand_computed_vector_layer(group_size, scales, expected):
    qt = QuantizedTensor(codes=HAND_CODES, code_bits=2, scales=scales, group_size=group_size, codebook=HAND_CODEBOOK,
                         vector_dim=4)
    assert qt.shape == (2, 8)
    qt.validate((2, 8))
    np.testing.assert_array_equal(dequantize(qt), np.array(expected, dtype=np.float32))
    # every value here is exact in float16: the packed layer gives the same matrix bit for bit
    np.testing.assert_array_equal(pack_quantized(qt).dequantize(), np.array(expected, dtype=np.float32))


@pytest.mark.parametrize(("d", "k", "code_bits", "out_f", "in_f", "group_size"), [
    (4, 256, 8, 16, 64, None),
    (4, 256, 8, 16, 64, 16),
    (2, 16, 4, 3, 6, None),   # 9 four-bit codes: rows start mid-byte
    (8, 5, 3, 5, 24, None),   # 3-bit codes straddle bytes, K < 2^code_bits
    (4, 200, 8, 6, 12, 8),    # a partial last group
])
def test_pack_round_trip(d, k, code_bits, out_f, in_f, group_size):
    qt = vector_tensor(out_f, in_f, d, k, code_bits, group_size)
    pt = pack_quantized(qt)
    check_packed_layout(pt)
    assert pt.shape == (out_f, in_f) and pt.code_shape == (out_f, in_f // d) and pt.vector_dim == d
    assert pt.codebook.dtype == np.float32 and pt.codebook.shape == (k, d)
    np.testing.assert_allclose(dequantize(qt), expected_codes_matrix(qt), rtol=1e-6, atol=1e-6)
    # float16 scales: a relative error of at most 2^-11 per weight
    np.testing.assert_allclose(pt.dequantize(), dequantize(qt), rtol=2**-11, atol=1e-7)
    full = pt.dequantize()
    np.testing.assert_array_equal(pt.code_rows(1, out_f), full[1:])
    rows = np.array([out_f - 1, 0, out_f - 1])
    np.testing.assert_array_equal(pt.dequantize_rows(rows), full[rows])


def test_bits_per_weight_are_counted_from_the_stored_buffers():
    qt = vector_tensor(16, 64, d=4, k=256, code_bits=8)
    pt = pack_quantized(qt)
    # 16 x 16 codes of 8 bits, 16 float16 row scales, the float32 [256, 4] codebook
    assert pt.codes.nbytes == 16 * 16 and pt.scales.nbytes == 16 * 2 and pt.codebook.nbytes == 256 * 4 * 4
    assert pt.nbytes == 16 * 16 + 16 * 2 + 256 * 4 * 4
    assert pt.bits_per_weight == (16 * 16 * 8 + 16 * 16 + 256 * 4 * 32) / (16 * 64) == 34.25
    # one byte per code, in row-major order: the layout a device reads
    np.testing.assert_array_equal(pt.codes, qt.codes.reshape(-1).astype(np.uint8))
    # without the per-tensor codebook: 2 bits per weight for the codes, 16 / in for the scales
    assert 8 * (pt.codes.nbytes + pt.scales.nbytes) / pt.numel == 2 + 16 / 64


def test_hadamard_input_scales_and_lowrank_around_a_vector_codebook():
    in_f = 16
    signs = random_signs(in_f, seed=5)
    s = RNG.uniform(0.5, 2.0, in_f)
    u, v = RNG.standard_normal((6, 2)) * 0.1, RNG.standard_normal((2, in_f)) * 0.1
    qt = vector_tensor(6, in_f, d=4, k=16, code_bits=4, group_size=8, hadamard_signs=signs, input_scales=s,
                       lowrank_u=u, lowrank_v=v)
    q = expected_codes_matrix(qt)
    np.testing.assert_allclose(dequantize_codes(qt), q, rtol=1e-6, atol=1e-6)
    w = q @ explicit_h(in_f, signs).T / s[None, :] + u @ v
    np.testing.assert_allclose(dequantize(qt), w, rtol=1e-5, atol=1e-5)
    hadamard_only = dataclasses.replace(qt, input_scales=None, lowrank_u=None, lowrank_v=None)
    np.testing.assert_allclose(dequantize(hadamard_only), q @ explicit_h(in_f, signs).T, rtol=1e-5, atol=1e-5)

    pt = pack_quantized(qt)
    info = WeightInfo(name="layer", shape=(6, in_f), kind="linear")
    params = {"layer.weight": w.astype(np.float32), "layer.bias": np.arange(6, dtype=np.float32)}
    x = RNG.standard_normal((2, 3, in_f)).astype(np.float32)
    expected = x @ pt.dequantize().T + params["layer.bias"]
    np.testing.assert_allclose(PackedWeightStore(params, [info], {"layer": pt}).linear("layer", x), expected,
                               rtol=1e-4, atol=1e-4)
    device = DeviceWeightStore(params, [info], {"layer": pt}, block_bytes=in_f * 4 * 2)
    np.testing.assert_allclose(device.linear("layer", x), expected, rtol=1e-4, atol=1e-4)


VALID = {"codes": np.array([[1, 3], [2, 0]]), "code_bits": 2, "scales": np.ones((2, 1)), "codebook": HAND_CODEBOOK,
         "vector_dim": 4}


@pytest.mark.parametrize(("change", "message"), [
    ({"codebook": None}, "vector_dim=4 needs a codebook of shape \\[K, 4\\]"),
    ({"codebook": np.ones((4, 3))}, "codebook shape \\(4, 3\\) does not fit vector_dim=4"),
    ({"codebook": np.ones(4)}, "codebook shape \\(4,\\) does not fit vector_dim=4"),
    ({"codebook": np.ones((5, 4))}, "1 <= K <= 4"),
    ({"codebook": np.full((4, 4), np.nan)}, "codebook contains NaN"),
    ({"signed": True}, "must be unsigned"),
    ({"zeros": np.ones((2, 1))}, "vector_dim=4 takes no zeros"),
    ({"group_size": 6, "scales": np.ones((2, 2))}, "group_size=6 is not a multiple of vector_dim=4"),
    ({"codebook": HAND_CODEBOOK[:3]}, "codes span \\[0, 3\\], outside the 3-entry vector codebook's range \\[0, 2\\]"),
    ({"packing": "trit5", "signed": True}, "vector_dim=4 needs packing='int'"),
    ({"packing": "trit5"}, "vector_dim=4 needs packing='int'"),
    ({"vector_dim": 0}, "vector_dim must be a positive int"),
    ({"vector_dim": 2.0}, "vector_dim must be a positive int"),
    # scales count the weight's 8 columns, not the 2 codes: groups of 4 are 2 groups
    ({"group_size": 4}, "scales shape \\(2, 1\\) does not fit a \\[2, 8\\] weight \\(vector_dim=4\\)"),
    ({"input_scales": np.ones(2)}, "input_scales shape \\(2,\\) != \\(8,\\)"),
    ({"hadamard_signs": np.ones(2)}, "hadamard_signs shape \\(2,\\) != \\(8,\\)"),
])
def test_a_wrong_vector_declaration_is_one_line_naming_it(change, message):
    with pytest.raises(QuantizedTensorError, match=message) as info:
        QuantizedTensor(**(VALID | change))
    assert "\n" not in str(info.value)


def test_the_weight_shape_is_the_codes_times_vector_dim():
    qt = QuantizedTensor(**VALID)
    qt.validate((2, 8))
    with pytest.raises(QuantizedTensorError, match="in_features 10 is not a multiple of vector_dim") as info:
        qt.validate((2, 10))  # a plugin that dropped the columns that make no whole vector
    assert "codes shape (2, 2) with vector_dim=4 stand for a (2, 8) weight" in str(info.value)
    assert "\n" not in str(info.value)
    with pytest.raises(QuantizedTensorError, match="not the weight shape \\(4, 8\\)$"):
        qt.validate((4, 8))
    with pytest.raises(QuantizedTensorError, match="weight shape"):
        qt.validate((2, 2))  # codes.shape is not the weight's shape


def test_a_plugin_that_ignores_in_features_is_stopped_naming_the_layer():
    model = W.Whisper.from_params(DIMS, random_params(DIMS), tiny_vocab(DIMS.n_vocab))
    odd = WeightInfo(name="odd", shape=(4, 10), kind="linear")
    params = {"odd.weight": RNG.standard_normal((4, 10)).astype(np.float32)}
    model = model.with_store(WeightStore(params | dict(model.store.params), [odd, *model.store.weight_infos()]))
    with pytest.raises(PluginError, match="plugin 'vq-d4-strict' failed on layer 'odd': codes shape \\(4, 2\\) with "
                                          "vector_dim=4 .* not a multiple of vector_dim") as info:
        quantize_model(model, VQ.VectorD4NoFallback())
    assert "\n" not in str(info.value)


def test_a_wrong_packed_layout_is_refused():
    pt = pack_quantized(vector_tensor(4, 16, d=4, k=16, code_bits=4))
    check_packed_layout(pt)
    for change, message in [
        ({"codebook": pt.codebook.astype(np.float16)}, "float32 \\[K, 4\\] codebook"),
        ({"codebook": None}, "codebook with 1 <= K <= 16, got None"),
        ({"codebook": pt.codebook[:, :2]}, "float32 \\[K, 4\\] codebook"),
        ({"codes": pt.codes[:-1]}, "code buffer does not hold 16 4-bit codes"),
        ({"vector_dim": 3}, "vector_dim 3 does not divide in_features 16"),
        ({"zeros": np.ones((4, 1), np.uint8)}, "no zeros"),
        ({"group_size": 6, "scales": np.ones((4, 3), np.float16)}, "not a multiple of vector_dim"),
        ({"codebook": pt.codebook[:3]}, "indexes past the vector codebook's 3 entries"),
    ]:
        with pytest.raises(ValueError, match=message):
            check_packed_layout(dataclasses.replace(pt, **change))


# -- the stores, the compute report and the memory accountant --------------------------------------


def test_vector_layer_runs_as_declared_in_every_store():
    qt = vector_tensor(24, 64, d=4, k=256, code_bits=8, group_size=32)
    pt = pack_quantized(qt)
    info = WeightInfo(name="layer", shape=(24, 64), kind="linear")
    params = {"layer.weight": dequantize(qt), "layer.bias": RNG.standard_normal(24).astype(np.float32)}
    x = RNG.standard_normal((2, 5, 64)).astype(np.float32)
    expected = x @ pt.dequantize().T + params["layer.bias"]
    np.testing.assert_allclose(x @ dequantize(qt).T + params["layer.bias"], expected, rtol=1e-2, atol=1e-2)
    packed = PackedWeightStore(params, [info], {"layer": pt})
    np.testing.assert_allclose(packed.linear("layer", x), expected, rtol=1e-5, atol=1e-5)
    for cache in (0, 1 << 20):
        # 64 floats x 4 B x 5 rows per block: five blocks, the last one short
        device = DeviceWeightStore(params, [info], {"layer": pt}, cache_bytes=cache, block_bytes=64 * 4 * 5)
        np.testing.assert_allclose(device.linear("layer", x), expected, rtol=1e-5, atol=1e-5)

    # with quantized activations a vector layer is a codebook layer: float values, no integer codes
    assert not runs_on_integers(pt)
    record = ActivationRecord(name="absmax", version="1.0", config={}, scheme=A8, kv_cache=False)
    act = ActivationQuantizingStore(DeviceWeightStore(params, [info], {"layer": pt}), record)
    a, s = quantize_activations(x, A8)
    np.testing.assert_allclose(act.linear("layer", x), (a * s) @ pt.dequantize().T + params["layer.bias"],
                               rtol=1e-5, atol=1e-5)

    counting = ComputeCountingStore(act)
    counting.linear("layer", x)
    report = counting.report()
    macs = 10 * 24 * 64
    assert report.operations == {"act_quantize": 10 * 64, "int8xfp16_mac": macs}
    assert report.linear["other"].bit_ops == macs * 2 * 8  # 8-bit codes over 4 weights: 2 bits each
    float_count = ComputeCountingStore(packed)
    float_count.linear("layer", x)
    assert float_count.report().operations == {"fp32_mac": macs}
    assert float_count.report().linear["other"].bit_ops == macs * 2 * 32


def test_the_device_store_counts_a_vector_layers_unpacking_per_code():
    """A vector layer unpacks a quarter of the codes of a scalar one of the same shape; its row
    block peaks in the codebook lookup instead (`_scratch_per_weight`), which tracemalloc sees."""
    vec = pack_quantized(vector_tensor(256, 1024, d=4, k=256, code_bits=8))
    scalar = pack_quantized(QuantizedTensor(codes=RNG.integers(-8, 8, (256, 1024)), code_bits=4,
                                            scales=np.ones((256, 1)), signed=True))
    info = WeightInfo(name="layer", shape=(256, 1024), kind="linear")
    params = {"layer.weight": np.zeros((256, 1024), np.float32)}
    stores = {kind: DeviceWeightStore(params, [info], {"layer": pt}, block_bytes=1 << 30)
              for kind, pt in (("vector", vec), ("scalar", scalar))}
    block = {kind: store.weight_block_bytes() for kind, store in stores.items()}
    assert block["scalar"] == 256 * 1024 * (4 + 18)
    assert block["vector"] == 256 * 1024 * (4 + 8 + 2 / 4)
    _, peak = measure_peak(lambda: vec.code_rows(0, 256))
    product, rows = stores["vector"].streamed_linear_bytes("layer", 1)
    assert abs(product + rows - peak) <= 0.05 * peak, (product, rows, peak)


# -- the artifact and the plugin's process ---------------------------------------------------------------


def _identity() -> QuantizerIdentity:
    return QuantizerIdentity(name="t", version="1", config={}, needs_calibration=False)


def test_a_scalar_artifact_is_digested_as_before_vector_codebooks():
    """The digest of a fixed scalar layout, computed by qbench before `vector_dim` existed."""
    codes = (np.arange(12 * 16).reshape(12, 16) % 15) - 7
    scales = (1.0 + np.arange(12 * 2).reshape(12, 2)) / 64
    qt = QuantizedTensor(codes=codes, code_bits=4, scales=scales, group_size=8, signed=True)
    cb = QuantizedTensor(codes=np.arange(6 * 8).reshape(6, 8) % 16, code_bits=4, scales=np.ones((6, 1)) / 4,
                         codebook=np.linspace(-1, 1, 16))
    packed = {"a": pack_quantized(qt), "b": pack_quantized(cb)}
    manifest = build_manifest("m", "0" * 64, _identity(), QuantizationPolicy(), "float16", packed)
    assert manifest.digest == "3490c2ccc8c3489b407cad8b64e866171ea7eb18bb42e8ebf3bbbff65c388278"
    assert all("vector_dim" not in layer for layer in json.loads(manifest.model_dump_json())["layers"])
    layout = LayerLayout.model_validate(manifest.model_dump()["layers"][0])
    assert layout.vector_dim == 1  # a layout written before the field reads as scalar


def test_an_artifact_with_a_wrong_vector_layout_is_one_line_naming_the_layer(tmp_path):
    pt = pack_quantized(vector_tensor(16, 32, d=4, k=256, code_bits=8))
    cases = [
        (dataclasses.replace(pt, vector_dim=2), "layer w: code buffer does not hold 256 int codes"),
        (dataclasses.replace(pt, vector_dim=3), "layer w: vector_dim 3 does not divide in_features 32"),
        (dataclasses.replace(pt, codebook=pt.codebook[:, :2].copy()), "layer w: vector_dim 4 needs a float32 \\[K, 4\\]"),
    ]
    for i, (bad, message) in enumerate(cases):
        # the manifest and its digest agree with the buffers: only the layout check can refuse it
        manifest = build_manifest("m", "0" * 64, _identity(), QuantizationPolicy(), "float16", {"w": bad})
        path = write_artifact(tmp_path / f"bad{i}.safetensors", manifest, {"w": bad})
        with pytest.raises(ArtifactError, match=message) as info:
            read_artifact(path)
        assert "\n" not in str(info.value)


def test_the_plugin_process_sends_a_vector_tensor_back_whole(install_plugin):
    install_plugin("qbench-vq-d4", VECTOR_PLUGIN, entry_point="vq-d4")
    weight = RNG.standard_normal((12, 32)).astype(np.float32)
    here = VQ.VectorD4().quantize(weight.copy(), None)
    with PluginProcess("vq-d4") as process:
        there = process.quantize(weight, None)
        fallback = process.quantize(weight[:, :30], None)
    assert there.vector_dim == 4 and there.shape == (12, 32) and there.codes.shape == (12, 8)
    for name in TENSOR_ARRAYS:
        mine, theirs = getattr(here, name), getattr(there, name)
        assert (mine is None) == (theirs is None), name
        if mine is not None:
            np.testing.assert_array_equal(theirs, mine, err_msg=name)
    assert (there.code_bits, there.signed, there.packing, there.group_size) == (8, False, "int", None)
    np.testing.assert_array_equal(dequantize(there), dequantize(here))
    assert fallback.vector_dim == 1 and fallback.shape == (12, 30)

    with PluginProcess("vq-d4-liar") as liar, pytest.raises(QuantizedTensorError, match="vector_dim=2") as info:
        liar.quantize(weight, None)  # what the child claims is checked again here
    assert "\n" not in str(info.value)


# -- whole models ---------------------------------------------------------------------------------------


def _dequantized_float_model(model, packed: dict[str, PackedTensor]):
    """The float model with every packed layer's weight replaced by what it dequantizes to."""
    params = dict(model.store.params)
    for name, pt in packed.items():
        params[name + ".weight"] = pt.dequantize().reshape(params[name + ".weight"].shape)
    return model.with_store(WeightStore(params, model.store.weight_infos()))


def test_a_vector_quantized_whisper_runs_and_reloads_from_its_artifact(tmp_path):
    model = W.Whisper.from_params(DIMS, random_params(DIMS), tiny_vocab(DIMS.n_vocab))
    quantizer = VQ.VectorD4()
    policy = QuantizationPolicy(quantize_embeddings=True)  # the token table: rows looked up packed
    quantized, report = quantize_model(model, quantizer, policy)
    packed = quantized.store.packed
    assert len(packed) == len(model.quantizable_weights()) and {pt.vector_dim for pt in packed.values()} == {4}
    for layer in report.layers:
        out_f, in_f = layer.shape
        assert layer.vector_dim == 4 and layer.code_bits == 8
        assert layer.bits_per_weight == 8 * (out_f * in_f / 4 + 2 * out_f + 256 * 4 * 4) / (out_f * in_f)
        assert layer.rel_error < 0.5  # the D4 lattice at 2 bits per weight, not noise
    assert report.model_dump()["layers"][0]["vector_dim"] == 4

    audio = (0.1 * np.random.default_rng(1).standard_normal(2 * 16000)).astype(np.float32)
    targets = [[5, 6, 7, 8, 9]]
    expected = _dequantized_float_model(model, packed).output_log_probs([audio], targets)
    got = quantized.output_log_probs([audio], targets)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    device = quantized.with_store(DeviceWeightStore.from_store(quantized.store, block_bytes=16 * 4 * 3))
    np.testing.assert_allclose(device.output_log_probs([audio], targets), expected, rtol=1e-4, atol=1e-4)

    manifest = build_manifest("whisper", "0" * 64, quantizer_identity(quantizer), policy, "float16", packed)
    path = write_artifact(tmp_path / "vq.safetensors", manifest, packed)
    back_manifest, back = read_artifact(path)
    assert back_manifest.digest == manifest.digest
    assert {layer.vector_dim for layer in back_manifest.layers} == {4}
    reloaded = model.with_store(PackedWeightStore(model.store.params, model.store.weight_infos(), back))
    np.testing.assert_array_equal(reloaded.output_log_probs([audio], targets), got)
    assert reloaded.transcribe_windows([audio]) == quantized.transcribe_windows([audio])


@pytest.fixture(scope="module")
def base_vq():
    """wav2vec2 at the real base-960h widths (one seeded layer), float and vector-quantized."""
    model = _one_layer(BASE)
    quantized, report = quantize_model(model, VQ.VectorD4())
    return model, quantized, report


def test_wav2vec2_at_the_real_widths_runs_its_vector_layers_as_dequantized(base_vq):
    model, quantized, report = base_vq
    packed = quantized.store.packed
    odd = {info.name for info in model.quantizable_weights() if info.shape[1] % 4}
    assert odd == {"feature_encoder.conv.0"}  # kernel 10 over one input channel
    assert {name for name, pt in packed.items() if pt.vector_dim == 1} == odd
    assert all(pt.vector_dim == 4 for name, pt in packed.items() if name not in odd)
    mlp = next(layer for layer in report.layers if layer.name.endswith("mlp.fc1"))
    assert mlp.shape == (3072, 768)
    assert mlp.bits_per_weight == pytest.approx(2 + 16 / 768 + 256 * 4 * 32 / (3072 * 768), rel=1e-12)

    audio = (0.1 * np.random.default_rng(2).standard_normal(16000)).astype(np.float32)
    expected = _dequantized_float_model(model, packed).logits(audio)
    np.testing.assert_allclose(quantized.logits(audio), expected, rtol=1e-4, atol=1e-4)
    device = DeviceWeightStore.from_store(quantized.store)
    np.testing.assert_allclose(quantized.with_store(device).logits(audio), expected, rtol=1e-4, atol=1e-4)

    counting = ComputeCountingStore(quantized.store)
    quantized.with_store(counting).logits(audio)
    fc1_macs = counting.linear_macs_by_layer[mlp.name]
    conv0_macs = counting.linear_macs_by_layer["feature_encoder.conv.0"]
    assert fc1_macs > 0 and conv0_macs > 0
    by_kind = counting.report().linear
    # every mlp layer is a vector layer at 2 bits per weight; conv0 is 8-bit scalar
    assert by_kind["mlp"].bit_ops == by_kind["mlp"].macs * 2 * 32
    assert by_kind["conv"].bit_ops == (by_kind["conv"].macs - conv0_macs) * 2 * 32 + conv0_macs * 8 * 32


def test_wav2vec2_memory_accountant_agrees_with_tracemalloc_on_vector_layers(base_vq):
    _, quantized, _ = base_vq
    store = DeviceWeightStore.from_store(quantized.store)
    audio = (0.1 * np.random.default_rng(0).standard_normal(4 * 16000)).astype(np.float32)
    _, peak = measure_peak(lambda: quantized.with_store(store).logits(audio))
    estimate = estimate_memory(quantized, store, None, 1, 4.0)
    measured = peak + audio.nbytes  # the waveform is part of the working set
    assert abs(estimate.working_peak_bytes - measured) <= 0.05 * measured, (estimate.phases, measured)
    assert estimate.weight_block_bytes > 0


def test_qbench_run_with_a_vector_plugin_reproduces_from_its_artifact(install_plugin, seeded_wav2vec2, data_dir,
                                                                     tmp_path):
    install_plugin("qbench-vq-d4", VECTOR_PLUGIN, entry_point="vq-d4")
    common = ["run", "--model", "wav2vec2-base-960h", "--weights", str(seeded_wav2vec2), "--limit", "1",
              "--data-dir", str(data_dir), "--threads", "1", "-q"]

    def run(*extra: str, out: Path) -> dict:
        assert main([*common, *extra, "-o", str(out)]) == 0
        return json.loads(out.read_text())

    first = run("--plugin", "vq-d4", out=tmp_path / "vq.json")
    q = first["quantization"]
    layers = {layer["name"]: layer for layer in q["layers"]}
    assert "vector_dim" not in layers["feature_encoder.conv.0"]  # the scalar fallback reports as before
    for name, layer in layers.items():
        if name != "feature_encoder.conv.0":
            out_f, in_f = layer["shape"]
            assert layer["vector_dim"] == 4, name
            assert layer["bits_per_weight"] == 8 * (out_f * in_f / 4 + 2 * out_f + 256 * 4 * 4) / (out_f * in_f), name
    n_weights = sum(layer["shape"][0] * layer["shape"][1] for layer in layers.values())
    assert q["mean_bits_per_weight"] == pytest.approx(8 * sum(layer["packed_bytes"] for layer in layers.values()) / n_weights)
    assert first["device"]["compute"]["operations"]["fp32_mac"] > 0

    again = run("--artifact", q["artifact_path"], out=tmp_path / "again.json")
    assert again["hypotheses_sha256"] == first["hypotheses_sha256"]
    assert again["quantization"]["artifact_sha256"] == q["artifact_sha256"]
    assert again["quantization"]["mean_bits_per_weight"] == q["mean_bits_per_weight"]
