"""CTranslate2 model.bin: a synthetic round trip and the real tiny.en package."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from qbench.checkpoints.ctranslate2 import load_ctranslate2_whisper, read_ctranslate2_variables
from qbench.checkpoints.errors import CheckpointError
from qbench.models.whisper import count_parameters

_DTYPES = {"float32": 0, "int8": 1, "int16": 2, "int32": 3, "float16": 4}


def write_ct2(path, variables: dict[str, np.ndarray], aliases: dict[str, str]) -> None:
    """CTranslate2's `_serialize` layout, written independently of the reader."""

    def string(s: str) -> bytes:
        return struct.pack("H", len(s) + 1) + s.encode() + b"\0"

    # parts joined once: base-sized models are hundreds of MB
    parts = [struct.pack("I", 6), string("WhisperSpec"), struct.pack("I", 3), struct.pack("I", len(variables))]
    for name, value in variables.items():
        parts += [string(name), struct.pack("B", value.ndim), *(struct.pack("I", d) for d in value.shape)]
        parts += [struct.pack("B", _DTYPES[value.dtype.name]), struct.pack("I", value.nbytes), value.tobytes()]
    parts += [struct.pack("I", len(aliases)), *(string(a) + string(t) for a, t in aliases.items())]
    path.write_bytes(b"".join(parts))


def tiny_ct2_dir(tmp_path, d=8, heads=2, vocab=12, mels=4, rng=np.random.default_rng(0)):
    v: dict[str, np.ndarray] = {}
    r = lambda *shape: rng.standard_normal(shape).astype(np.float16)  # noqa: E731

    def ln(p):
        v[p + "/gamma"], v[p + "/beta"] = r(d), r(d)

    def dense(p, o, i):
        v[p + "/weight"], v[p + "/bias"] = r(o, i), r(o)

    v["encoder/conv1/weight"], v["encoder/conv1/bias"] = r(d, mels, 3), r(d)
    v["encoder/conv2/weight"], v["encoder/conv2/bias"] = r(d, d, 3), r(d)
    v["encoder/position_encodings/encodings"] = r(6, d)
    ln("encoder/layer_0/self_attention/layer_norm"); dense("encoder/layer_0/self_attention/linear_0", 3 * d, d)  # noqa: E702
    dense("encoder/layer_0/self_attention/linear_1", d, d); ln("encoder/layer_0/ffn/layer_norm")  # noqa: E702
    dense("encoder/layer_0/ffn/linear_0", 4 * d, d); dense("encoder/layer_0/ffn/linear_1", d, 4 * d)  # noqa: E702
    ln("encoder/layer_norm")
    v["decoder/embeddings/weight"] = r(vocab, d)
    v["decoder/position_encodings/encodings"] = r(5, d)
    s = "decoder/layer_0"
    ln(f"{s}/self_attention/layer_norm"); dense(f"{s}/self_attention/linear_0", 3 * d, d)  # noqa: E702
    dense(f"{s}/self_attention/linear_1", d, d); ln(f"{s}/attention/layer_norm")  # noqa: E702
    dense(f"{s}/attention/linear_0", d, d); dense(f"{s}/attention/linear_1", 2 * d, d)  # noqa: E702
    dense(f"{s}/attention/linear_2", d, d); ln(f"{s}/ffn/layer_norm")  # noqa: E702
    dense(f"{s}/ffn/linear_0", 4 * d, d); dense(f"{s}/ffn/linear_1", d, 4 * d)  # noqa: E702
    ln("decoder/layer_norm")
    for flag, value in (("pre_norm", 1), ("scale_embeddings", 0), ("start_from_zero_embedding", 0)):
        v[f"decoder/{flag}"] = np.array(value, dtype=np.int8)
    v["encoder/num_heads"] = np.array(heads, dtype=np.int16)
    v["decoder/num_heads"] = np.array(heads, dtype=np.int16)
    write_ct2(tmp_path / "model.bin", v, {"decoder/projection/weight": "decoder/embeddings/weight"})
    (tmp_path / "config.json").write_text(json.dumps({"suppress_ids": [1], "suppress_ids_begin": [2]}))
    (tmp_path / "vocabulary.txt").write_text("\n".join(["a"] * vocab) + "\n")
    return v


def test_synthetic_round_trip(tmp_path):
    v = tiny_ct2_dir(tmp_path)
    raw = read_ctranslate2_variables(tmp_path / "model.bin")
    assert raw["decoder/projection/weight"] is raw["decoder/embeddings/weight"]
    dims, params, config = load_ctranslate2_whisper(tmp_path)
    assert (dims.n_audio_state, dims.n_audio_head, dims.n_audio_layer, dims.n_text_layer, dims.n_vocab, dims.n_mels) == (8, 2, 1, 1, 12, 4)
    assert (dims.n_audio_ctx, dims.n_text_ctx) == (6, 5)
    np.testing.assert_array_equal(params["encoder.blocks.0.attn.qkv.weight"], v["encoder/layer_0/self_attention/linear_0/weight"])
    np.testing.assert_array_equal(params["decoder.blocks.0.cross_attn.kv.bias"], v["decoder/layer_0/attention/linear_1/bias"])
    np.testing.assert_array_equal(params["decoder.ln.weight"], v["decoder/layer_norm/gamma"])
    assert params["decoder.token_embedding.weight"].dtype == np.float16  # stored precision kept
    assert config["suppress_ids"] == [1]


def test_truncated_file_is_a_clear_error(tmp_path):
    tiny_ct2_dir(tmp_path)
    blob = (tmp_path / "model.bin").read_bytes()
    (tmp_path / "model.bin").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError, match="model.bin: truncated or corrupt"):
        load_ctranslate2_whisper(tmp_path)


def test_missing_file_names_it(tmp_path):
    with pytest.raises(CheckpointError, match="missing model.bin"):
        load_ctranslate2_whisper(tmp_path)


def test_real_tiny_en_matches_its_registry_card(tiny_en):
    dims = tiny_en.model.dims
    assert (dims.n_audio_layer, dims.n_text_layer, dims.n_audio_state, dims.n_audio_head) == (4, 4, 384, 6)
    assert count_parameters(dims, tiny_en.model.store.params) == tiny_en.card.parameters
    assert tiny_en.sha256 == tiny_en.card.sources[0].files[0].sha256
    # float16 at rest: the weights in memory are the checkpoint's size (within its header)
    assert abs(tiny_en.model.store.stored_bytes() - (tiny_en.path / "model.bin").stat().st_size) < 0.01 * 75_537_502


def test_the_ctranslate2_converter_s_output_loads_as_its_source_does(tmp_path, tiny_en):
    """A directory written by CTranslate2's own TransformersConverter (vocabulary.json, as
    faster-whisper's newer conversions have) holds the same parameters as the transformers
    directory it was converted from, and gets the same vocabulary and prompt."""
    ctranslate2 = pytest.importorskip("ctranslate2")
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from qbench.checkpoints.loader import load_model

    config = transformers.WhisperConfig(vocab_size=51864, num_mel_bins=80, d_model=16, encoder_layers=1,
                                        encoder_attention_heads=2, decoder_layers=1, decoder_attention_heads=2,
                                        encoder_ffn_dim=64, decoder_ffn_dim=64)
    torch.manual_seed(0)
    source = tmp_path / "hf"
    transformers.WhisperForConditionalGeneration(config).save_pretrained(source)
    # the converter reads the vocabulary with transformers' tokenizer: tiny.en's (same English vocabulary)
    (source / "tokenizer.json").write_bytes((tiny_en.path / "tokenizer.json").read_bytes())
    (source / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "WhisperTokenizer"}))
    converted = tmp_path / "ct2"
    ctranslate2.converters.TransformersConverter(str(source)).convert(str(converted))
    assert (converted / "vocabulary.json").is_file() and not (converted / "vocabulary.txt").exists()

    ours, theirs = load_model(None, converted), load_model(None, source)
    assert (ours.format, theirs.format) == ("ctranslate2", "hf-whisper")
    assert ours.model.dims == theirs.model.dims and ours.name == theirs.name == "whisper-d16-enc1-dec1.en"
    assert sorted(ours.model.store.params) == sorted(theirs.model.store.params)
    for name, value in theirs.model.store.params.items():
        np.testing.assert_array_equal(ours.model.store.params[name], value, err_msg=name)
    assert ours.model.vocab.tokens == theirs.model.vocab.tokens
    assert ours.model.vocab.sot_sequence() == [50257, 50362]
