"""Fixtures shared by the harness's tests (tests/) and the reference plugins' (plugins/*/tests)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

WAV2VEC2_FIXTURE = Path(__file__).parent / "tests" / "fixtures" / "wav2vec2" / "wav2vec2-base-960h"


@pytest.fixture(scope="session")
def seeded_wav2vec2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded `Wav2Vec2ForCTC` directory (`save_pretrained`) of the base-960h config shrunk in
    width and depth: no real wav2vec2 checkpoint can be downloaded here, and the real widths are
    proven by tests/test_wav2vec2_parity.py. Transcripts are gibberish, the pipeline is real.
    Skipped without torch and transformers."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = json.loads((WAV2VEC2_FIXTURE / "config.json").read_text())
    config.update(num_hidden_layers=2, hidden_size=64, num_attention_heads=2, intermediate_size=128,
                  num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, conv_dim=[32] * 7)
    torch.manual_seed(0)
    model = transformers.Wav2Vec2ForCTC(transformers.Wav2Vec2Config(**config)).eval()
    directory = tmp_path_factory.mktemp("w2v2")
    model.save_pretrained(directory)
    shutil.copy(WAV2VEC2_FIXTURE / "vocab.json", directory / "vocab.json")
    return directory
