"""Any Whisper checkpoint runs: cards for the family, weights without a card, the forced-English
prompt of multilingual models, and cards registered by plugins through `qbench_register_models`.

Checkpoints are seeded here (`seeded_whisper`), in each card's shape where it matters (base's,
written as a faster-whisper directory, a Hugging Face directory and an openai .pt), and the real
tiny.en weights are used where they are installed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError
from seeded_whisper import (
    dims_of,
    ending_after_one_token,
    openai_shapes,
    openai_state,
    whisper_tokens,
    write_ct2_dir,
    write_hf_dir,
    write_openai_pt,
)

from qbench.checkpoints.card import ModelCard, checkpoint_name, safe_name
from qbench.checkpoints.card_discovery import forget_discovered_models
from qbench.checkpoints.errors import CheckpointError
from qbench.checkpoints.loader import load_model
from qbench.checkpoints.registry import get_card, list_models, registered_models, registry_problems
from qbench.cli import main
from qbench.models import whisper as whisper_module
from qbench.models.tokenizer import WhisperVocabulary
from qbench.models.whisper import count_parameters
from qbench.run import RunSpec

# openai's tokenizer constants (whisper/tokenizer.py): the same prompt in both vocabularies' ids
ENGLISH_PROMPT = [50257, 50362]  # <|startoftranscript|> <|notimestamps|>
MULTILINGUAL_PROMPT = [50258, 50259, 50359, 50363]  # ... <|en|> <|transcribe|> <|notimestamps|>
TINY_SHAPE = dict(d=8, heads=2, encoder_layers=1, decoder_layers=1, n_audio_ctx=6, n_text_ctx=8)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def base_dims():
    return get_card("whisper-base").whisper_dimensions()


@pytest.fixture(scope="module")
def base_state(base_dims):
    return ending_after_one_token(openai_state(base_dims, seed=1), eot=50257)


@pytest.fixture(scope="module")
def faster_whisper_base(tmp_path_factory, base_dims, base_state) -> Path:
    """A faster-whisper base directory (CTranslate2, float16) holding seeded weights."""
    return write_ct2_dir(tmp_path_factory.mktemp("fw") / "faster-whisper-base", base_dims, base_state)


@pytest.fixture(autouse=True)
def fresh_registry():
    yield
    forget_discovered_models()  # a test that installed a plugin leaves no cards behind


# ---------------------------------------------------------------------------------------------
# The cards
# ---------------------------------------------------------------------------------------------
FAMILY = ["whisper-tiny", "whisper-tiny.en", "whisper-base", "whisper-base.en", "whisper-small", "whisper-small.en",
          "distil-whisper-small.en", "distil-whisper-medium.en"]


def test_the_small_device_family_has_cards_whose_counts_follow_from_their_shapes():
    cards = list_models()
    assert set(FAMILY) <= set(cards)
    for name in FAMILY:
        card = cards[name]
        dims = card.whisper_dimensions()
        # counted from the tensors of a state dict of that shape, without the encoder's sinusoid buffer
        counted = sum(int(np.prod(s)) for k, s in openai_shapes(dims).items() if k != "encoder.positional_embedding")
        assert card.parameters == counted, name
        assert (dims.n_vocab == 51864) == name.endswith(".en"), name  # English-only vocabulary iff .en
        main_files = [f for s in card.sources for f in s.files if f.path in ("model.bin", "model.safetensors")]
        assert main_files and all(f.sha256 or "not pinned" in (f.note or "") for f in main_files), name
    # in millions, as openai's model.py counts them (no sinusoid buffer, no key biases)
    assert [round(cards[n].parameters / 1e6) for n in FAMILY] == [37, 37, 72, 72, 241, 241, 165, 393]


def test_a_card_whose_count_does_not_follow_from_its_dimensions_is_refused():
    data = get_card("whisper-base").model_dump()
    ModelCard.model_validate(data)
    with pytest.raises(ValidationError, match="its dimensions give 71825920"):
        ModelCard.model_validate(data | {"parameters": 74_000_000})
    with pytest.raises(ValidationError, match="reserved"):
        ModelCard.model_validate(data | {"name": "whisper-d512-enc6-dec6"})
    with pytest.raises(ValidationError, match="not a safe name"):
        ModelCard.model_validate(data | {"name": "../whisper"})


def test_names_of_weights_without_a_card_are_safe_and_say_their_shape():
    assert checkpoint_name(dims_of(512, 8, 6, 6, 51865)) == "whisper-d512-enc6-dec6"
    assert checkpoint_name(dims_of(768, 12, 12, 4, 51864)) == "whisper-d768-enc12-dec4.en"
    assert safe_name("my model (v2)/") == "my-model--v2--"
    assert safe_name("..") == "weights"


# ---------------------------------------------------------------------------------------------
# Loading: the real tiny.en, and seeded checkpoints of base's shape in every format
# ---------------------------------------------------------------------------------------------
def test_real_tiny_en_weights_alone_are_recognised_by_their_sha256(tiny_en):
    alone = load_model(None, tiny_en.path)
    assert (alone.name, alone.card.name, alone.pinned, alone.pin_note) == ("whisper-tiny.en", "whisper-tiny.en", True, None)
    assert alone.sha256 == tiny_en.sha256
    # English-only: today's prompt and suppression, exactly
    assert alone.model.vocab.sot_sequence() == tiny_en.model.vocab.sot_sequence() == ENGLISH_PROMPT
    assert alone.model.vocab.suppress_ids == tiny_en.model.vocab.suppress_ids
    assert len(alone.model.vocab.suppress_ids) == 90 and 50257 in alone.model.vocab.suppress_ids


def test_a_faster_whisper_base_directory_runs_without_a_card(faster_whisper_base, base_dims, base_state):
    loaded = load_model(None, faster_whisper_base)
    assert loaded.format == "ctranslate2" and loaded.model.dims == base_dims
    assert (loaded.name, loaded.card, loaded.pinned) == ("whisper-d512-enc6-dec6", None, False)
    assert loaded.sha256 == sha256(faster_whisper_base / "model.bin")
    assert loaded.parameters == count_parameters(base_dims, loaded.model.store.params) == get_card("whisper-base").parameters
    assert "no model card pins these weights" in loaded.pin_note and "the shape of whisper-base" in loaded.pin_note
    np.testing.assert_array_equal(loaded.model.store.params["decoder.blocks.5.cross_attn.q.weight"],
                                  base_state["decoder.blocks.5.cross_attn.query.weight"])
    assert loaded.model.vocab.sot_sequence() == MULTILINGUAL_PROMPT


def test_named_weights_keep_their_card_but_are_not_pinned(faster_whisper_base):
    named = load_model("whisper-base", faster_whisper_base)  # the user's weights: not refused
    assert (named.name, named.card.name, named.pinned) == ("whisper-base", "whisper-base", False)
    assert "whisper-base's card pins other weights" in named.pin_note
    with pytest.raises(CheckpointError, match=r"a whisper-d512-enc6-dec6 checkpoint .* but whisper-tiny.en's card says "
                                              r"width 384"):
        load_model("whisper-tiny.en", faster_whisper_base)


def test_base_shaped_checkpoints_load_alike_in_every_format(tmp_path, base_dims, base_state, faster_whisper_base):
    hf = write_hf_dir(tmp_path / "hf-base", base_dims, base_state, timestamps_in_tokenizer=False)
    pt = tmp_path / "pt" / "base.pt"
    pt.parent.mkdir()
    write_openai_pt(pt, base_dims, base_state)
    (pt.parent / "vocabulary.json").write_text(json.dumps(whisper_tokens(multilingual=True)))  # its vocabulary beside it
    reference = load_model(None, faster_whisper_base).model.store.params
    for path, fmt in ((hf, "hf-whisper"), (pt, "openai-pt")):
        loaded = load_model(None, path)
        assert (loaded.format, loaded.name, loaded.pinned) == (fmt, "whisper-d512-enc6-dec6", False)
        assert loaded.model.dims == base_dims and len(loaded.model.vocab) == base_dims.n_vocab
        assert loaded.model.vocab.sot_sequence() == MULTILINGUAL_PROMPT
        params = loaded.model.store.params
        assert sorted(params) == sorted(reference)
        for name in ("encoder.blocks.3.attn.qkv.bias", "decoder.blocks.2.cross_attn.kv.weight", "decoder.token_embedding.weight"):
            np.testing.assert_array_equal(params[name], reference[name], err_msg=f"{fmt} {name}")
    # a multilingual .pt carries no vocabulary, and no other fits it: one clear line
    (pt.parent / "vocabulary.json").unlink()
    with pytest.raises(CheckpointError, match="a multilingual model needs its own vocabulary"):
        load_model(None, pt)


def test_a_distil_small_en_shaped_directory_with_vocabulary_json(tmp_path):
    dims = get_card("distil-whisper-small.en").whisper_dimensions()
    directory = write_ct2_dir(tmp_path / "faster-distil-whisper-small.en", dims, openai_state(dims, seed=2), vocabulary="json")
    loaded = load_model(None, directory)
    assert (loaded.name, loaded.model.dims.n_text_layer, loaded.model.dims.n_audio_layer) == ("whisper-d768-enc12-dec4.en", 4, 12)
    assert loaded.parameters == get_card("distil-whisper-small.en").parameters
    assert loaded.model.vocab.sot_sequence() == ENGLISH_PROMPT


def test_a_wav2vec2_directory_alone_runs_without_a_card_too(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    fixture = Path(__file__).parent / "fixtures" / "wav2vec2" / "wav2vec2-base-960h"
    config = json.loads((fixture / "config.json").read_text())
    config.update(num_hidden_layers=2, hidden_size=64, num_attention_heads=2, intermediate_size=128,
                  num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, conv_dim=[32] * 7)
    torch.manual_seed(0)
    model = transformers.Wav2Vec2ForCTC(transformers.Wav2Vec2Config(**config))
    model.save_pretrained(tmp_path)
    (tmp_path / "vocab.json").write_bytes((fixture / "vocab.json").read_bytes())
    loaded = load_model(None, tmp_path)
    assert (loaded.name, loaded.architecture, loaded.card, loaded.pinned) == ("wav2vec2-d64-L2", "wav2vec2", None, False)
    assert loaded.parameters == sum(p.numel() for p in model.parameters())  # as the wav2vec2 cards count


# ---------------------------------------------------------------------------------------------
# The prompt: multilingual models are told English and transcribe
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_vocab, prompt", [(51865, MULTILINGUAL_PROMPT), (51864, ENGLISH_PROMPT)])
def test_the_decoder_is_prompted_with_the_vocabulary_s_start_sequence(tmp_path, monkeypatch, n_vocab, prompt):
    dims = dims_of(n_vocab=n_vocab, **TINY_SHAPE, n_mels=80)
    loaded = load_model(None, write_ct2_dir(tmp_path / "m", dims, openai_state(dims, seed=3)))
    fed = []
    real_step = whisper_module.decode_step

    def spy(store, dims, tokens, state):
        fed.append(np.asarray(tokens).copy())
        return real_step(store, dims, tokens, state)

    monkeypatch.setattr(whisper_module, "decode_step", spy)
    whisper_module.greedy_decode(loaded.model.store, dims, loaded.model.vocab, np.zeros((1, 12, 80), np.float32),
                                 max_new_tokens=2)
    assert fed[0].tolist() == [prompt]
    vocab = loaded.model.vocab
    assert vocab.is_multilingual == (n_vocab == 51865)
    # the multilingual standard suppression list (no config.json list): openai's, in that BPE's ids
    assert (50362 in vocab.suppress_ids, 50361 in vocab.suppress_ids) == ((True, True) if n_vocab == 51865 else (False, True))


def test_a_multilingual_vocabulary_without_its_language_token_is_refused():
    tokens = [t for t in whisper_tokens(multilingual=True) if t != "<|en|>"] + ["<|x|>"]
    with pytest.raises(CheckpointError, match=r"no <\|en\|> token"):
        WhisperVocabulary(tokens, source="vocabulary.txt")


def test_a_tokenizer_without_timestamps_is_completed_to_the_model_s_size():
    tokens = whisper_tokens(multilingual=True)
    vocab = WhisperVocabulary(tokens[: tokens.index("<|0.00|>")], n_vocab=51865)
    assert len(vocab) == 51865 and vocab.tokens[-1] == "<|30.00|>" and vocab.timestamp_begin == 50364
    with pytest.raises(CheckpointError, match="51866 tokens, but the model has only 51865"):
        WhisperVocabulary(tokens + ["<|extra|>"], n_vocab=51865)


# ---------------------------------------------------------------------------------------------
# qbench run --weights DIR, end to end, and RunSpec without a model
# ---------------------------------------------------------------------------------------------
def test_qbench_run_weights_alone_runs_and_says_no_card_pinned_them(faster_whisper_base, data_dir, tmp_path, capsys):
    out = tmp_path / "r.json"
    code = main(["run", "--weights", str(faster_whisper_base), "--limit", "1", "--device", "none",
                 "--data-dir", str(data_dir), "-o", str(out), "-q"])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 0, err
    assert "no model card pins these weights" in err and "whisper-d512-enc6-dec6" in err
    result = json.loads(out.read_text())
    assert result["status"] == "complete" and result["metrics"]["utterances"] == 1
    model = result["model"]
    assert (model["name"], model["card"], model["pinned"], model["format"]) == ("whisper-d512-enc6-dec6", None, False, "ctranslate2")
    assert model["sha256"] == sha256(faster_whisper_base / "model.bin")
    assert model["parameters"] == get_card("whisper-base").parameters
    assert len(result["utterances"][0]["hypothesis"].split()) == 1  # one token, then end of text


def test_weights_alone_are_not_submitted_to_a_leaderboard(faster_whisper_base, tmp_path, capsys):
    assert main(["run", "--weights", str(faster_whisper_base), "--submit", "--leaderboards", str(tmp_path), "-q"]) == 2
    assert "--submit needs --model NAME" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_run_spec_without_a_model():
    assert RunSpec().model == RunSpec(model=None).model == "whisper-tiny.en"  # nothing named: the default
    spec = RunSpec(model=None, weights="/models/faster-whisper-base/")
    assert spec.model is None and spec.output_path == Path("results/faster-whisper-base__test-clean__fp.json")
    assert spec.identity() != RunSpec(weights="/models/faster-whisper-base/").identity()
    with pytest.raises(ValidationError):
        RunSpec(model="../../etc")


# ---------------------------------------------------------------------------------------------
# Cards from plugins, through the same hook as qbench's own
# ---------------------------------------------------------------------------------------------
CARD_PLUGIN = '''
from qbench import hookimpl
from qbench.checkpoints.card import ModelCard
from qbench.checkpoints.registry import get_card

@hookimpl
def qbench_register_models():
    {body}
'''


def _card_plugin(install_plugin, dist: str, body: str) -> None:
    install_plugin(dist, CARD_PLUGIN.format(body=body), entry_point=dist.replace("qbench-", ""))
    forget_discovered_models()


def test_a_plugin_registers_a_card_and_qbench_models_says_where_it_came_from(install_plugin, capsys):
    base = get_card("whisper-base").model_dump()
    _card_plugin(install_plugin, "qbench-mycards", f'return [ModelCard.model_validate({base!r} | {{"name": "whisper-base-ft"}})]')
    models = registered_models()
    assert models["whisper-base-ft"].origin == "plugin 'mycards' (qbench-mycards 1.0)"
    assert models["whisper-base"].builtin and models["whisper-base"].origin.endswith("(built-in)")
    assert main(["models"]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "whisper-base-ft" in printed and "qbench-mycards 1.0" in printed and "(built-in)" in printed


def test_a_plugin_redefining_a_built_in_card_is_reported_and_qbench_s_is_kept(install_plugin):
    base = get_card("whisper-base").model_dump()
    _card_plugin(install_plugin, "qbench-evil", f'return [ModelCard.model_validate({base!r} | {{"description": "mine"}})]')
    assert get_card("whisper-base").description != "mine"
    problems = " ".join(registry_problems())
    assert "model name 'whisper-base' is provided by both" in problems and "qbench-evil" in problems
    assert "qbench.checkpoints.builtin_cards" in problems


@pytest.mark.parametrize("body, expected", [
    ('raise RuntimeError("no cards today")', "qbench_register_models raised RuntimeError: no cards today"),
    ('return [{"name": "a dict"}]', "is not a qbench ModelCard"),
])
def test_a_broken_card_hook_costs_no_other_card(install_plugin, body, expected):
    _card_plugin(install_plugin, "qbench-broken", body)
    assert expected in " ".join(registry_problems())
    assert set(FAMILY) <= set(list_models())


def test_cards_are_collected_outside_the_process_that_scores(install_plugin):
    import sys

    _card_plugin(install_plugin, "qbench-loud", 'import sys; print("noise on stdout"); return []')
    assert "whisper-base" in list_models()
    assert "qbench_loud" not in sys.modules  # the hook ran in the discovery child only


def test_card_dimensions_name_every_field():
    data = get_card("whisper-tiny").model_dump()
    dims = dict(data["dimensions"])
    del dims["n_mels"]
    with pytest.raises((ValidationError, ValueError), match="missing \\['n_mels'\\]"):
        ModelCard.model_validate(data | {"dimensions": dims}).whisper_dimensions()
    assert dataclasses.asdict(get_card("whisper-tiny").whisper_dimensions())["n_vocab"] == 51865
