"""The numpy Whisper on a small random model: caches, batching, masks, calibration contract."""

from __future__ import annotations

import numpy as np
import pytest

from qbench.models import whisper as W
from qbench.models.tokenizer import WhisperVocabulary
from qbench.models.weight_store import WeightStore

DIMS = W.ModelDimensions(n_mels=80, n_audio_ctx=1500, n_audio_state=16, n_audio_head=2, n_audio_layer=2,
                         n_vocab=40, n_text_ctx=24, n_text_state=16, n_text_head=2, n_text_layer=2)


def random_params(dims: W.ModelDimensions, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    params = {}
    for info in W.Whisper.weight_infos(dims):
        w = rng.standard_normal(info.shape).astype(np.float32) / np.sqrt(info.shape[1])
        if info.kind == "conv":
            w = w.reshape(info.shape[0], -1, 3)
        params[info.name + ".weight"] = w
        if info.kind != "embedding":
            params[info.name + ".bias"] = 0.1 * rng.standard_normal(info.shape[0]).astype(np.float32)
    for prefix, n, d in (("encoder", dims.n_audio_layer, dims.n_audio_state), ("decoder", dims.n_text_layer, dims.n_text_state)):
        lns = ["attn_ln", "mlp_ln"] + (["cross_attn_ln"] if prefix == "decoder" else [])
        for i in range(n):
            for ln in lns:
                params[f"{prefix}.blocks.{i}.{ln}.weight"] = 1 + 0.1 * rng.standard_normal(d).astype(np.float32)
                params[f"{prefix}.blocks.{i}.{ln}.bias"] = 0.1 * rng.standard_normal(d).astype(np.float32)
    for name, d in (("encoder.ln_post", dims.n_audio_state), ("decoder.ln", dims.n_text_state)):
        params[name + ".weight"] = np.ones(d, np.float32)
        params[name + ".bias"] = np.zeros(d, np.float32)
    params["encoder.positional_embedding"] = rng.standard_normal((dims.n_audio_ctx, dims.n_audio_state)).astype(np.float32)
    params["decoder.positional_embedding"] = rng.standard_normal((dims.n_text_ctx, dims.n_text_state)).astype(np.float32)
    return params


def tiny_vocab(n: int) -> WhisperVocabulary:
    return WhisperVocabulary([chr(ord("a") + i % 26) for i in range(n - 4)] + ["<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>", "<|0.00|>"],
                             suppress_ids=(3,), suppress_ids_begin=(0,))


@pytest.fixture(scope="module")
def model() -> W.Whisper:
    return W.Whisper.from_params(DIMS, random_params(DIMS), tiny_vocab(DIMS.n_vocab))


@pytest.fixture(scope="module")
def mels() -> np.ndarray:
    rng = np.random.default_rng(1)
    return rng.standard_normal((3, W.N_FRAMES, 80)).astype(np.float32)


def test_kv_cache_equals_full_causal_forward(model, mels):
    store = model.store
    feats = W.encode(store, DIMS, mels[:1])
    tokens = np.array([[36, 37, 5, 9, 11, 2]])
    full = W.decode_step(store, DIMS, tokens, W.start_decoder(store, DIMS, feats))
    state = W.start_decoder(store, DIMS, feats)
    steps = [W.decode_step(store, DIMS, tokens[:, :2], state)]
    steps += [W.decode_step(store, DIMS, tokens[:, i : i + 1], state) for i in range(2, tokens.shape[1])]
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, rtol=1e-4, atol=1e-5)
    assert state.length == tokens.shape[1]


def test_causal_mask_hides_future_tokens(model, mels):
    store = model.store
    feats = W.encode(store, DIMS, mels[:1])
    a = W.decode_step(store, DIMS, np.array([[36, 37, 5, 9]]), W.start_decoder(store, DIMS, feats))
    b = W.decode_step(store, DIMS, np.array([[36, 37, 5, 20]]), W.start_decoder(store, DIMS, feats))
    np.testing.assert_allclose(a[:, :3], b[:, :3], rtol=1e-5, atol=1e-6)
    assert not np.allclose(a[:, 3], b[:, 3])


def test_batched_greedy_decode_equals_one_by_one(model, mels):
    together = W.greedy_decode(model.store, DIMS, model.vocab, mels, max_new_tokens=12)
    alone = [W.greedy_decode(model.store, DIMS, model.vocab, mels[i : i + 1], max_new_tokens=12)[0] for i in range(3)]
    assert together == alone
    for ids in together:
        assert len(ids) <= 12
        assert model.vocab.eot not in ids and 3 not in ids  # suppressed
        assert all(t < model.vocab.timestamp_begin for t in ids)


def test_nan_weights_raise_instead_of_decoding_garbage(model, mels):
    params = dict(model.store.params)
    params["decoder.blocks.0.mlp.fc1.weight"] = np.full_like(params["decoder.blocks.0.mlp.fc1.weight"], np.nan)
    broken = model.with_store(WeightStore(params, model.store.weight_infos()))
    with pytest.raises(FloatingPointError, match="non-finite"):
        W.greedy_decode(broken.store, DIMS, broken.vocab, mels[:1], max_new_tokens=3)


class RecordingStore(WeightStore):
    thread_safe = False  # it records the call order

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls: list[tuple[str, int]] = []

    def linear(self, name, x):
        self.calls.append((name, int(np.prod(x.shape[:-1]))))
        return super().linear(name, x)


def test_calibration_forward_calls_every_matrix_once_in_order(model):
    store = RecordingStore(model.store.params, model.store.weight_infos())
    rng = np.random.default_rng(2)
    audios = [0.1 * rng.standard_normal(16000 * s).astype(np.float32) for s in (1, 2)]
    model.with_store(store).calibration_forward(audios)
    names = [n for n, _ in store.calls]
    assert names == [info.name for info in model.quantizable_weights()]
    rows = dict(store.calls)
    assert rows["encoder.blocks.0.attn.qkv"] == 2 * 1500  # both utterances stacked


def test_conv_matrix_layout_matches_direct_convolution(model):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 10, 80)).astype(np.float32)
    w = model.store.params["encoder.conv1.weight"]  # [out, in, 3]
    b = model.store.params["encoder.conv1.bias"]
    xp = np.pad(x[0], ((1, 1), (0, 0)))
    direct = np.stack([np.einsum("ock,kc->o", w, xp[t : t + 3]) + b for t in range(10)])
    np.testing.assert_allclose(W.conv1d(model.store, "encoder.conv1", x)[0], direct, rtol=1e-4, atol=1e-4)
