"""The speed work on the numpy Whisper changes no result: each fast path against its plain form.

No timing here (timings belong to benchmarks/whisper_speed.py); only equalities.
"""

from __future__ import annotations

import numpy as np
import pytest

from qbench.models import activations, parallel
from qbench.models import attention as attention_module
from qbench.models import whisper as W
from qbench.quant.packing import PackedTensor, pack_quantized
from qbench.quant.contract import QuantizedTensor, apply_scales
from qbench.models.weight_store import WeightStore
from tests.test_whisper_model import DIMS, random_params, tiny_vocab


def reference_gelu(x: np.ndarray) -> np.ndarray:
    """The unblocked erf GELU the model had before: same float32 operations, whole arrays."""
    t = np.clip(x * np.float32(0.7071067811865476), -4.0, 4.0).astype(np.float32)
    t2 = t * t
    p = np.full_like(t2, activations._ERF_ALPHA[0])
    for c in activations._ERF_ALPHA[1:]:
        p *= t2
        p += c
    p *= t
    q = np.full_like(t2, activations._ERF_BETA[0])
    for c in activations._ERF_BETA[1:]:
        q *= t2
        q += c
    y = p / q
    y += 1.0
    y *= x
    y *= 0.5
    return y


@pytest.fixture(scope="module")
def model() -> W.Whisper:
    return W.Whisper.from_params(DIMS, random_params(DIMS), tiny_vocab(DIMS.n_vocab))


def test_blocked_gelu_is_bit_identical_also_in_place() -> None:
    rng = np.random.default_rng(0)
    x = (3 * rng.standard_normal((3, 40_001))).astype(np.float32)  # crosses block boundaries
    x[0, :4] = [0.0, 10.0, -10.0, 1e-30]
    expected = reference_gelu(x)
    np.testing.assert_array_equal(activations.gelu(x), expected)
    y = x.copy()
    assert activations.gelu(y, out=y) is y
    np.testing.assert_array_equal(y, expected)


@pytest.mark.parametrize("causal_offset", [None, 0, 3])
def test_query_blocked_attention_equals_one_block(monkeypatch: pytest.MonkeyPatch, causal_offset: int | None) -> None:
    rng = np.random.default_rng(1)
    b, h, tq, dh = 2, 3, 11, 4
    tk = tq + (causal_offset or 0)
    q = rng.standard_normal((b, tq, h * dh)).astype(np.float32)
    k, v = (rng.standard_normal((b, h, tk, dh)).astype(np.float32) for _ in range(2))
    whole = attention_module.attention(q, k, v, h, causal_offset)
    monkeypatch.setattr(attention_module, "QUERY_BLOCK", 4)
    np.testing.assert_allclose(attention_module.attention(q, k, v, h, causal_offset), whole, rtol=1e-6, atol=1e-7)
    # the same softmax written out, for the masked case too
    scores = np.einsum("bqhd,bhkd->bhqk", q.reshape(b, tq, h, dh), k) / np.sqrt(dh)
    if causal_offset is not None:
        scores[..., np.arange(tk)[None, :] > (causal_offset + np.arange(tq))[:, None]] = -np.inf
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(whole, np.einsum("bhqk,bhkd->bqhd", p, v).reshape(b, tq, h * dh), rtol=1e-5, atol=1e-6)


def test_linear_over_a_batch_of_single_rows_equals_row_by_row(model: W.Whisper) -> None:
    x = np.random.default_rng(2).standard_normal((5, 1, DIMS.n_text_state)).astype(np.float32)
    together = model.store.linear("decoder.blocks.0.mlp.fc1", x)
    assert together.shape == (5, 1, 4 * DIMS.n_text_state)
    alone = np.concatenate([model.store.linear("decoder.blocks.0.mlp.fc1", x[i : i + 1]) for i in range(5)])
    np.testing.assert_allclose(together, alone, rtol=1e-6, atol=1e-6)


def test_compact_equals_select(model: W.Whisper) -> None:
    rng = np.random.default_rng(3)
    mels = rng.standard_normal((4, W.N_FRAMES, 80)).astype(np.float32)
    state = W.start_decoder(model.store, DIMS, W.encode(model.store, DIMS, mels))
    W.decode_step(model.store, DIMS, np.tile(np.array([[36, 37, 5]]), (4, 1)), state)
    rows = np.array([1, 3])
    selected = state.select(rows)
    compacted = state.compact(rows)
    assert compacted.length == selected.length == 3
    for a, b in zip(compacted.cross_k + compacted.cross_v, selected.cross_k + selected.cross_v):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(compacted.self_k + compacted.self_v, selected.self_k + selected.self_v):
        np.testing.assert_array_equal(a[:, :, :3], b[:, :, :3])


def test_encoder_windows_per_call_do_not_change_transcripts(model: W.Whisper, monkeypatch: pytest.MonkeyPatch) -> None:
    mels = np.random.default_rng(4).standard_normal((3, W.N_FRAMES, 80)).astype(np.float32)
    monkeypatch.setattr(W, "ENCODER_WINDOWS", 1)
    one = W.greedy_decode(model.store, DIMS, model.vocab, mels, max_new_tokens=10)
    monkeypatch.setattr(W, "ENCODER_WINDOWS", 3)
    assert W.greedy_decode(model.store, DIMS, model.vocab, mels, max_new_tokens=10) == one
    full = W.start_decoder(model.store, DIMS, W.encode(model.store, DIMS, mels))
    monkeypatch.setattr(W, "ENCODER_WINDOWS", 1)
    state = W._empty_decoder_state(DIMS, 3, 1500)
    for i in range(3):
        W._fill_cross_kv(model.store, DIMS, W.encode(model.store, DIMS, mels[i : i + 1]), state, slice(i, i + 1))
    for a, b in zip(state.cross_k + state.cross_v, full.cross_k + full.cross_v):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_blas_thread_cap_is_restored() -> None:
    threadpoolctl = pytest.importorskip("threadpoolctl")
    before = [lib["num_threads"] for lib in threadpoolctl.threadpool_info() if lib["user_api"] == "blas"]
    with parallel.blas_threads_at_most(1):
        inside = [lib["num_threads"] for lib in threadpoolctl.threadpool_info() if lib["user_api"] == "blas"]
        assert all(n <= 1 for n in inside)
    assert [lib["num_threads"] for lib in threadpoolctl.threadpool_info() if lib["user_api"] == "blas"] == before


def generic_dequantize(pt: PackedTensor) -> np.ndarray:
    codes = pt._codes_range(0, pt.numel).reshape(pt.shape)
    return apply_scales(pt._values(codes), pt.scales, pt.zeros, pt.group_size)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape", [(6, 16), (7, 13)])
@pytest.mark.parametrize("layout", ["signed", "zeros", "groups", "groups+zeros", "ragged groups"])
def test_fast_dequantize_is_bit_identical(bits: int, shape: tuple[int, int], layout: str) -> None:
    rng = np.random.default_rng(bits * 100 + shape[1])
    signed = layout == "signed"
    group = {"groups": 4, "groups+zeros": 4, "ragged groups": 5}.get(layout)
    if group is not None and shape[1] % group and layout != "ragged groups":
        group = shape[1]
    n_groups = 1 if group is None else -(-shape[1] // group)
    lo = -(1 << (bits - 1)) if signed else 0
    codes = rng.integers(lo, lo + (1 << bits), shape)
    zeros = rng.integers(0, 1 << bits, (shape[0], n_groups)).astype(np.float32) if "zeros" in layout else None
    scales = rng.random((shape[0], n_groups)).astype(np.float32)
    qt = QuantizedTensor(codes=codes, code_bits=bits, scales=scales, zeros=zeros, group_size=group, signed=signed)
    pt = pack_quantized(qt)
    fast = pt.dequantize()
    assert fast.dtype == np.float32 and fast.shape == shape and fast.flags.c_contiguous
    np.testing.assert_array_equal(fast, generic_dequantize(pt))


@pytest.mark.parametrize("shape", [(5, 10), (7, 13)])
def test_fast_trit_dequantize_is_bit_identical(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(shape[1])
    qt = QuantizedTensor(codes=rng.integers(-1, 2, shape), code_bits=2, scales=np.array([[0.37]], np.float32),
                         packing="trit5", signed=True)
    pt = pack_quantized(qt)
    np.testing.assert_array_equal(pt.dequantize(), generic_dequantize(pt))
    bad = PackedTensor(codes=np.full_like(pt.codes, 250), code_bits=2, packing="trit5", shape=shape, scales=pt.scales)
    with pytest.raises(ValueError, match="243"):
        bad.dequantize()


def test_threaded_encoder_gives_the_serial_transcripts(model: W.Whisper, monkeypatch: pytest.MonkeyPatch) -> None:
    mels = np.random.default_rng(5).standard_normal((3, W.N_FRAMES, 80)).astype(np.float32)
    monkeypatch.setenv("QBENCH_THREADS", "1")
    serial = W.greedy_decode(model.store, DIMS, model.vocab, mels, max_new_tokens=10)
    monkeypatch.setenv("QBENCH_THREADS", "3")
    assert W.encoder_parallelism(model.store, 3) == (3, 1)
    assert W.greedy_decode(model.store, DIMS, model.vocab, mels, max_new_tokens=10) == serial


def test_encoder_output_is_bit_identical_on_any_thread_count(model: W.Whisper) -> None:
    """qbench's own threads change where work runs, never how it rounds: one window with its
    heads and GELU in threads equals the single-threaded encoder bit for bit. A multi-threaded
    BLAS is the library's business: OpenBLAS's threaded sgemm rounds like its serial one on
    some CPUs but not on others (on an AMD EPYC box it differs by ~1e-6), so there the encoder
    is held to float32 rounding only."""
    mels = np.random.default_rng(6).standard_normal((1, W.N_FRAMES, 80)).astype(np.float32)
    with parallel.blas_threads_at_most(1):
        alone = W.encode(model.store, DIMS, mels, threads=1)
        np.testing.assert_array_equal(W.encode(model.store, DIMS, mels, threads=4), alone)
    # and under the machine's own (threaded) BLAS setting
    scale = float(np.abs(alone).max())
    for threads in (1, 4):
        np.testing.assert_allclose(W.encode(model.store, DIMS, mels, threads=threads), alone, rtol=0, atol=1e-5 * scale)


def test_stores_with_state_in_linear_encode_one_window_at_a_time(model: W.Whisper, monkeypatch: pytest.MonkeyPatch) -> None:
    from qbench.embedded.compute import ComputeCountingStore
    from qbench.embedded.device_store import DeviceWeightStore

    monkeypatch.setenv("QBENCH_THREADS", "4")
    assert W.encoder_parallelism(model.store, 8) == (4, 1)
    assert W.encoder_parallelism(model.store, 2) == (2, 1)
    assert W.encoder_parallelism(model.store, 1) == (1, 4)
    device_store = DeviceWeightStore.from_store(model.store)
    assert W.encoder_parallelism(device_store, 8) == (1, 4)
    # the counter adds under a lock: it is exactly as thread-safe as the store it counts for
    assert W.encoder_parallelism(ComputeCountingStore(device_store), 8) == (1, 4)
    assert W.encoder_parallelism(ComputeCountingStore(model.store), 8) == (4, 1)
    # a device store asked for threads (a device batch larger than one) encodes windows in threads
    assert W.encoder_parallelism(DeviceWeightStore.from_store(model.store, thread_safe=True), 8) == (4, 1)


def test_an_encoder_thread_failure_reaches_the_caller(model: W.Whisper, monkeypatch: pytest.MonkeyPatch) -> None:
    params = dict(model.store.params)
    params["encoder.blocks.0.mlp.fc1.weight"] = params["encoder.blocks.0.mlp.fc1.weight"][:, :3]  # wrong shape
    broken = WeightStore.__new__(WeightStore)
    broken.__dict__.update(model.store.__dict__, params=params, _wt_cache={}, _param_cache={})
    monkeypatch.setenv("QBENCH_THREADS", "2")
    mels = np.zeros((2, W.N_FRAMES, 80), np.float32)
    with pytest.raises(ValueError):
        W.greedy_decode(broken, DIMS, model.vocab, mels, max_new_tokens=2)


def test_qbench_threads_must_be_a_positive_integer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("QBENCH_THREADS", raising=False)
    monkeypatch.setenv("QBENCH_THREADS", "3")
    assert parallel.compute_threads() == 3
    monkeypatch.setenv("QBENCH_THREADS", "zero")
    with pytest.raises(ValueError, match="QBENCH_THREADS"):
        parallel.compute_threads()
