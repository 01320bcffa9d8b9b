"""The numpy wav2vec 2.0 against Hugging Face `Wav2Vec2ForCTC`, plus torch-free unit tests.

Parity runs the real configs of facebook/wav2vec2-base-960h ("group" feature-encoder norm,
post-LN, 12 layers) and facebook/wav2vec2-large-960h-lv60-self ("layer" norm, stable pre-LN,
24 layers) with seeded random weights (no Hub access here) on a real LibriSpeech utterance.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from qbench.checkpoints.errors import CheckpointError
from qbench.checkpoints.hf_wav2vec2 import hf_to_canonical, load_hf_wav2vec2
from qbench.models.wav2vec2 import Wav2Vec2, Wav2Vec2Config, ctc_greedy_decode, weight_infos
from qbench.models.weight_store import WeightStore

FIXTURES = Path(__file__).parent / "fixtures" / "wav2vec2"
REPO = Path(__file__).parents[1]
PARITY_SECONDS = 4.0


def librispeech_test_clean() -> Path | None:
    candidates = [Path(os.environ["QBENCH_DATA_DIR"])] if "QBENCH_DATA_DIR" in os.environ else []
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "librispeech")
    for base in candidates:
        if (base / "LibriSpeech" / "test-clean").is_dir():
            return base / "LibriSpeech" / "test-clean"
    return None


def first_utterance() -> np.ndarray:
    root = librispeech_test_clean()
    if root is None:
        pytest.skip("LibriSpeech test-clean not found (set QBENCH_DATA_DIR or put it in ../shared/librispeech)")
    audio, sr = sf.read(sorted(root.rglob("*.flac"))[0], dtype="float32")
    assert sr == 16000
    return audio[: int(PARITY_SECONDS * sr)]


# -- parity with Hugging Face -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["wav2vec2-base-960h", "wav2vec2-large-960h-lv60-self"])
def test_logits_and_transcript_match_hf(tmp_path: Path, name: str) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    audio = first_utterance()

    hf_config = json.loads((FIXTURES / name / "config.json").read_text())
    torch.manual_seed(0)
    reference = transformers.Wav2Vec2ForCTC(transformers.Wav2Vec2Config(**hf_config)).eval()
    with torch.no_grad():
        # weight norm's gain starts as ||v||, which would make folding it a no-op: move it
        gain = reference.wav2vec2.encoder.pos_conv_embed.conv.parametrizations.weight.original0
        gain.mul_(torch.rand_like(gain) + 0.5)
        # random-init norms are identity and biases zero: give them values so they are tested
        for module in reference.modules():
            if isinstance(module, (torch.nn.LayerNorm, torch.nn.GroupNorm)):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.1)
        reference.lm_head.weight.mul_(4.0)  # enough logit spread for a varied argmax path
        # 24 random pre-LN layers collapse every frame onto one state (a constant argmax);
        # damped residual branches keep the frames apart, as training does
        for layer in reference.wav2vec2.encoder.layers:
            layer.attention.out_proj.weight.mul_(0.2)
            layer.feed_forward.output_dense.weight.mul_(0.2)
    reference.save_pretrained(tmp_path)  # model.safetensors
    shutil.copy(FIXTURES / name / "vocab.json", tmp_path / "vocab.json")

    ours = load_hf_wav2vec2(tmp_path)

    inputs = transformers.Wav2Vec2FeatureExtractor(do_normalize=True)(
        audio, sampling_rate=16000, return_tensors="pt")
    with torch.inference_mode():
        expected = reference(inputs.input_values).logits[0].numpy()
    got = ours.logits(audio)

    assert got.shape == expected.shape
    rel = float(np.abs(got - expected).max() / np.abs(expected).max())
    print(f"{name}: max |diff| / max |logit| = {rel:.2e}")
    assert rel < 1e-4
    path = expected.argmax(-1)
    assert len(np.unique(path)) >= 5, "degenerate logits: parity of the argmax path would prove little"
    np.testing.assert_array_equal(got.argmax(-1), path)

    tokenizer = transformers.Wav2Vec2CTCTokenizer(str(tmp_path / "vocab.json"))
    assert ours.transcribe([audio]) == [tokenizer.decode(path.tolist())]


def test_legacy_weight_norm_names_load_the_same() -> None:
    """Older checkpoints (all of facebook's) store `weight_g`/`weight_v`, not parametrizations."""
    config = _small_config("group")
    rng = np.random.default_rng(1)
    d, k, groups = config.hidden_size, config.num_conv_pos_embeddings, config.num_conv_pos_embedding_groups
    v = rng.standard_normal((d, d // groups, k)).astype(np.float32)
    g = rng.uniform(0.5, 2.0, (1, 1, k)).astype(np.float32)
    b = rng.standard_normal(d).astype(np.float32)
    prefix = "wav2vec2.encoder.pos_conv_embed.conv."
    new = hf_to_canonical({prefix + "parametrizations.weight.original0": g,
                           prefix + "parametrizations.weight.original1": v, prefix + "bias": b}, config)
    old = hf_to_canonical({prefix + "weight_g": g, prefix + "weight_v": v, prefix + "bias": b}, config)
    assert new.keys() == old.keys()
    for key in new:
        np.testing.assert_array_equal(new[key], old[key])
    # weight_norm(dim=2): every kernel tap's [out, in] slice has norm g
    folded = np.concatenate([new[f"encoder.pos_conv.{i}.weight"] for i in range(groups)])
    np.testing.assert_allclose(np.sqrt((folded**2).sum(axis=(0, 1))), g[0, 0], rtol=1e-5)


def test_missing_checkpoint_names_directory_and_download(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="download") as info:
        load_hf_wav2vec2(tmp_path)
    assert str(tmp_path) in str(info.value)
    shutil.copy(FIXTURES / "wav2vec2-base-960h" / "config.json", tmp_path)
    shutil.copy(FIXTURES / "wav2vec2-base-960h" / "vocab.json", tmp_path)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_hf_wav2vec2(tmp_path)


def test_pytorch_model_bin_loads_like_safetensors(tmp_path: Path) -> None:
    """facebook's older repos ship only pytorch_model.bin, read here without torch."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf_config = json.loads((FIXTURES / "wav2vec2-base-960h" / "config.json").read_text())
    hf_config.update(hidden_size=64, num_attention_heads=4, intermediate_size=128, num_hidden_layers=1,
                     conv_dim=[32] * 7)
    torch.manual_seed(0)
    reference = transformers.Wav2Vec2ForCTC(transformers.Wav2Vec2Config(**hf_config)).eval()
    for directory in (tmp_path / "st", tmp_path / "bin"):
        reference.save_pretrained(directory)
        shutil.copy(FIXTURES / "wav2vec2-base-960h" / "vocab.json", directory)
    # transformers 5 only writes safetensors; write the pickle as transformers 4.x did for
    # facebook's repos, with weight norm's legacy weight_g / weight_v names
    (tmp_path / "bin" / "model.safetensors").unlink()
    legacy = {"parametrizations.weight.original0": "weight_g", "parametrizations.weight.original1": "weight_v"}
    state = {}
    for key, value in reference.state_dict().items():
        for new_name, old_name in legacy.items():
            key = key.replace(new_name, old_name)
        state[key] = value
    torch.save(state, tmp_path / "bin" / "pytorch_model.bin")
    a, b = load_hf_wav2vec2(tmp_path / "st").store.params, load_hf_wav2vec2(tmp_path / "bin").store.params
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.parametrize("name", ["wav2vec2-base-960h", "wav2vec2-large-960h-lv60-self"])
def test_registry_parameter_count_is_hf_count(name: str) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    entry = json.loads((REPO / "models" / f"{name}.json").read_text())
    config = transformers.Wav2Vec2Config(**json.loads((FIXTURES / name / "config.json").read_text()))
    with torch.device("meta"):  # shapes only, no 1 GB allocation for the large model
        model = transformers.Wav2Vec2ForCTC(config)
    assert entry["parameters"] == sum(p.numel() for p in model.parameters())
    assert entry["sources"][0]["repo_id"] == f"facebook/{name}"


# -- torch-free ---------------------------------------------------------------------------------


def _small_config(norm: str) -> Wav2Vec2Config:
    """Real kernels and strides (so the real 400-sample receptive field), narrow widths."""
    return Wav2Vec2Config(conv_dim=(32,) * 7, conv_bias=norm == "layer", feat_extract_norm=norm,
                          hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                          num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
                          do_stable_layer_norm=norm == "layer", vocab_size=32)


def _random_model(config: Wav2Vec2Config, seed: int = 0) -> Wav2Vec2:
    rng = np.random.default_rng(seed)
    params: dict[str, np.ndarray] = {}
    for info in weight_infos(config):
        params[info.name + ".weight"] = (rng.standard_normal(info.shape) / np.sqrt(info.shape[1])).astype(np.float32)
        if not info.name.startswith("feature_encoder.conv.") or config.conv_bias:
            params[info.name + ".bias"] = (0.1 * rng.standard_normal(info.shape[0])).astype(np.float32)
    norms = {f"feature_encoder.norm.{l}": c for l, c in enumerate(config.conv_dim)
             if config.feat_extract_norm == "layer" or l == 0}
    norms["feature_projection.ln"] = config.conv_dim[-1]
    norms["encoder.ln"] = config.hidden_size
    for i in range(config.num_hidden_layers):
        norms[f"encoder.blocks.{i}.attn_ln"] = norms[f"encoder.blocks.{i}.mlp_ln"] = config.hidden_size
    for name, n in norms.items():
        params[name + ".weight"] = rng.uniform(0.5, 1.5, n).astype(np.float32)
        params[name + ".bias"] = (0.1 * rng.standard_normal(n)).astype(np.float32)
    vocab = ["<pad>", "<s>", "</s>", "<unk>", "|"] + [chr(ord("A") + i) for i in range(config.vocab_size - 5)]
    return Wav2Vec2.from_params(config, params, vocab)


@pytest.mark.parametrize("norm", ["group", "layer"])
def test_chunked_feature_encoder_equals_unchunked(norm: str) -> None:
    model = _random_model(_small_config(norm))
    audio = np.random.default_rng(2).standard_normal(3 * 16000 + 123).astype(np.float32)
    whole = model.feature_encoder(audio, chunk_frames=None)
    assert whole.shape == (model.config.num_frames(len(audio)), 32)
    for chunk_frames in (1, 7, 64):
        chunked = model.feature_encoder(audio, chunk_frames=chunk_frames)
        assert chunked.shape == whole.shape
        assert np.abs(chunked - whole).max() <= 1e-5 * np.abs(whole).max()


def test_ctc_greedy_decode() -> None:
    vocab = ["<pad>", "<s>", "</s>", "<unk>", "|", "A", "B", "C"]
    # H-E-L-L-O style: repeats collapse, a blank between equal letters keeps both
    ids = [0, 5, 5, 0, 5, 6, 6, 4, 4, 0, 7, 0, 0, 7, 7, 4, 0]
    logits = np.full((len(ids), len(vocab)), -1.0, dtype=np.float32)
    logits[np.arange(len(ids)), ids] = 1.0
    model = _random_model(_small_config("group"))
    model.vocab = vocab
    assert model.decode(logits) == "AAB CC"
    assert ctc_greedy_decode([4, 0, 5, 4, 4, 0], vocab) == "A"  # delimiters at the ends strip
    assert ctc_greedy_decode([], vocab) == ""
    assert model.transcribe([np.ones(399, dtype=np.float32)]) == [""]  # shorter than one frame


class RecordingStore(WeightStore):
    thread_safe = False  # it records the call order

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls: list[tuple[str, tuple[int, ...]]] = []

    def linear(self, name: str, x: np.ndarray) -> np.ndarray:
        self.calls.append((name, x.shape))
        return super().linear(name, x)


@pytest.mark.parametrize("norm", ["group", "layer"])
def test_calibration_forward_uses_every_weight_once_in_order(norm: str) -> None:
    model = _random_model(_small_config(norm))
    store = RecordingStore(model.store.params, model.quantizable_weights())
    rng = np.random.default_rng(3)
    audios = [rng.standard_normal(n).astype(np.float32) for n in (5 * 16000, 2 * 16000, 16000 // 2)]
    model.with_store(store).calibration_forward(audios, max_seconds=4.0)

    assert [name for name, _ in store.calls] == [w.name for w in model.quantizable_weights()]
    shapes = dict(store.calls)
    frames = sum(model.config.num_frames(min(len(a), 4 * 16000)) for a in audios)
    for info in model.quantizable_weights():
        if not info.name.startswith("feature_encoder."):
            assert shapes[info.name] == (frames, info.shape[1]), info.name
    first_layer_rows = sum((min(len(a), 64000) - 10) // 5 + 1 for a in audios)
    assert shapes["feature_encoder.conv.0"] == (first_layer_rows, 10)


def test_calibration_and_inference_agree_on_a_single_utterance() -> None:
    """The stacked (calibration) path and the chunked (inference) path compute the same model."""
    model = _random_model(_small_config("group"))
    audio = np.random.default_rng(4).standard_normal(3 * 16000).astype(np.float32)
    captured = {}

    class Capture(WeightStore):
        def linear(self, name: str, x: np.ndarray) -> np.ndarray:
            y = super().linear(name, x)
            if name == "lm_head":
                captured["logits"] = y
            return y

    model.with_store(Capture(model.store.params, model.quantizable_weights())).calibration_forward([audio])
    expected = model.logits(audio)
    assert np.abs(captured["logits"] - expected).max() <= 1e-4 * np.abs(expected).max()


def test_config_from_hf_fixtures() -> None:
    base = Wav2Vec2Config.from_hf(json.loads((FIXTURES / "wav2vec2-base-960h" / "config.json").read_text()))
    large = Wav2Vec2Config.from_hf(
        json.loads((FIXTURES / "wav2vec2-large-960h-lv60-self" / "config.json").read_text()))
    assert (base.feat_extract_norm, base.do_stable_layer_norm, base.conv_bias) == ("group", False, False)
    assert (large.feat_extract_norm, large.do_stable_layer_norm, large.conv_bias) == ("layer", True, True)
    assert (base.hidden_size, base.num_hidden_layers, base.num_attention_heads, base.intermediate_size) == (
        768, 12, 12, 3072)
    assert (large.hidden_size, large.num_hidden_layers, large.num_attention_heads, large.intermediate_size) == (
        1024, 24, 16, 4096)
    assert base.receptive_field == 400 and base.total_stride == 320


@pytest.mark.parametrize("norm", ["group", "layer"])
def test_logits_are_bit_identical_on_any_thread_count(norm: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Feature-encoder chunks, positional-conv groups, heads and GELU spans run in threads;
    none of it may change a logit (see qbench.models.parallel)."""
    from qbench.models import parallel

    model = _random_model(_small_config(norm))
    model.chunk_frames = 8  # several chunks
    audio = np.random.default_rng(5).standard_normal(3 * 16000).astype(np.float32)
    monkeypatch.setenv("QBENCH_THREADS", "1")
    with parallel.blas_threads_at_most(1):
        alone = model.logits(audio)
    monkeypatch.setenv("QBENCH_THREADS", "3")
    np.testing.assert_array_equal(model.logits(audio), alone)
