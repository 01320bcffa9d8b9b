"""MAC and bit-operation counts against a hand count on a small random Whisper."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import BaseModel

from qbench.embedded.compute import ComputeCountingStore, layer_kind
from qbench.models import whisper as W
from qbench.quant.apply import quantize_model
from qbench.quant.contract import QuantizedTensor, Quantizer
from tests.test_whisper_model import DIMS, random_params, tiny_vocab

D, T, V, L = DIMS.n_audio_state, DIMS.n_audio_ctx, DIMS.n_vocab, DIMS.n_audio_layer


def _run(store, steps=(3, 1, 1)):
    """Encode one window, then decoder calls of `steps` new tokens each, logits after each."""
    mel = np.random.default_rng(1).standard_normal((1, W.N_FRAMES, 80)).astype(np.float32)
    state = W.start_decoder(store, DIMS, W.encode(store, DIMS, mel))
    for t in steps:
        hidden = W.decode_step(store, DIMS, np.full((1, t), 5), state)
        W.output_logits(store, hidden[:, -1])


def hand_count(steps=(3, 1, 1)) -> dict[str, int]:
    d = D
    conv = 2 * T * d * 80 * 3 + T * d * 3 * d
    enc_proj = L * T * (3 * d * d + d * d)
    enc_mlp = L * T * 8 * d * d
    cross_kv = L * T * 2 * d * d
    dec_proj = dec_mlp = dec_self = cross = out = 0
    offset = 0
    for t in steps:
        dec_proj += L * t * (3 + 1 + 1 + 1) * d * d
        dec_mlp += L * t * 8 * d * d
        dec_self += L * 2 * t * (offset + t) * d
        cross += L * 2 * t * T * d
        out += V * d  # logits of the last position only
        offset += t
    return {
        "conv": conv, "attention_projection": enc_proj + cross_kv + dec_proj, "mlp": enc_mlp + dec_mlp,
        "output_projection": out, "encoder_self": L * 2 * T * T * d, "decoder_self": dec_self, "cross": cross,
    }


@pytest.fixture(scope="module")
def model():
    return W.Whisper.from_params(DIMS, random_params(DIMS), tiny_vocab(V))


def test_macs_equal_the_hand_count(model):
    counter = ComputeCountingStore(model.store)
    _run(counter)
    r = counter.report()
    want = hand_count()
    for kind in ("conv", "attention_projection", "mlp", "output_projection"):
        assert r.linear[kind].macs == want[kind], kind
        assert r.linear[kind].bit_ops == want[kind] * 32 * 32  # float32 weights and activations
    for part in ("encoder_self", "decoder_self", "cross"):
        assert r.attention_macs[part] == want[part], part
    assert r.total_macs == sum(want.values())
    assert r.encoder_windows == 1 and r.decode_steps == 3 and r.decoded_token_rows == 5


def test_rows_that_left_the_batch_are_not_counted(model):
    one, two = ComputeCountingStore(model.store), ComputeCountingStore(model.store)
    mel = np.random.default_rng(1).standard_normal((2, W.N_FRAMES, 80)).astype(np.float32)
    for counter, mels in ((one, mel[:1]), (two, mel)):
        state = W.start_decoder(counter, DIMS, W.encode(counter, DIMS, mels))
        W.decode_step(counter, DIMS, np.full((mels.shape[0], 2), 5), state)
    assert two.report().total_macs == 2 * one.report().total_macs


class _Ternary(Quantizer):
    name, version, needs_calibration = "test-ternary", "0", False

    class Config(BaseModel):
        pass

    def quantize(self, weight, stats):
        gamma = float(np.abs(weight).mean())
        codes = np.clip(np.round(weight / gamma), -1, 1).astype(np.int8)
        return QuantizedTensor(codes=codes, code_bits=2, packing="trit5", scales=np.array([[gamma]]), signed=True)


def test_ternary_macs_become_additions_and_zeros_skip_work(model):
    qmodel, _ = quantize_model(model, _Ternary(_Ternary.Config()))
    counter = ComputeCountingStore(qmodel.store)
    _run(counter)
    r = counter.report()
    want = hand_count()
    ternary = want["conv"] + want["attention_projection"] + want["mlp"]  # embeddings stay fp
    assert r.ternary_macs == ternary
    expected_adds = 0
    for name, pt in qmodel.store.packed.items():
        nonzero = np.count_nonzero(pt.dequantize()) / pt.numel
        expected_adds += counter.linear_macs_by_layer[name] * nonzero
    assert r.ternary_additions == pytest.approx(expected_adds, rel=1e-6)
    assert 0 < r.ternary_additions < r.ternary_macs
    assert r.linear["mlp"].bit_ops == pytest.approx(want["mlp"] * np.log2(3) * 32, abs=len(r.linear) * 8)


def test_layer_kinds():
    assert layer_kind("encoder.conv1", "conv") == "conv"
    assert layer_kind("decoder.blocks.0.cross_attn.kv", "linear") == "attention_projection"
    assert layer_kind("encoder.layers.3.mlp.fc1", "linear") == "mlp"
    assert layer_kind("lm_head", "linear") == layer_kind("decoder.token_embedding", "embedding") == "output_projection"


def test_wav2vec2_attention_is_counted():
    """Scores and values of each layer: 2 x T^2 x d per utterance, beside the linear MACs."""
    from tests.test_wav2vec2_parity import _random_model, _small_config

    model = _random_model(_small_config("group"))
    counter = ComputeCountingStore(model.store)
    audio = np.random.default_rng(0).standard_normal(16000).astype(np.float32)
    frames = model.config.num_frames(audio.size)
    model.with_store(counter).transcribe([audio])
    c = model.config
    r = counter.report()
    assert r.attention_macs == {"encoder_self": c.num_hidden_layers * 2 * frames * frames * c.hidden_size}
    assert r.linear["attention_projection"].macs == c.num_hidden_layers * frames * 4 * c.hidden_size**2
    assert r.encoder_windows == 1 and r.decode_steps == 0


def test_wav2vec2_attention_is_counted_per_utterance():
    """Each utterance attends within itself: T1^2 + T2^2, not (T1 + T2)^2, and two encoder inputs."""
    from tests.test_wav2vec2_parity import _random_model, _small_config

    model = _random_model(_small_config("layer"))
    counter = ComputeCountingStore(model.store)
    audios = [np.random.default_rng(i).standard_normal(n).astype(np.float32) for i, n in enumerate((16000, 9000))]
    model.with_store(counter).transcribe(audios)
    c = model.config
    squares = sum(c.num_frames(a.size) ** 2 for a in audios)
    r = counter.report()
    assert r.attention_macs == {"encoder_self": c.num_hidden_layers * 2 * squares * c.hidden_size}
    assert r.encoder_windows == 2
