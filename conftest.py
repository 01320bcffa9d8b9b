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


@pytest.fixture
def run_seeded_wav2vec2(seeded_wav2vec2: Path, tmp_path: Path):
    """`run(*args)`: `qbench run` of `seeded_wav2vec2` on the first shared test-clean utterance,
    no device, one thread, with `args` (plugin, settings, calibration) appended; returns the
    result JSON. The plugins' end-to-end tests share it. Skipped without the shared LibriSpeech
    sample."""
    from qbench.cli import main
    from qbench.data.librispeech import DataNotFoundError, find_data_dir

    try:
        data_dir = find_data_dir(None, "test-clean")
    except DataNotFoundError as exc:
        pytest.skip(f"shared LibriSpeech sample not found: {exc}")
    runs = iter(range(1_000_000))

    def run(*args: str) -> dict:
        out = tmp_path / f"r{next(runs)}.json"
        argv = ["run", "--model", "wav2vec2-base-960h", "--weights", str(seeded_wav2vec2), "--limit", "1",
                "--data-dir", str(data_dir), "--device", "none", "--threads", "1", "-o", str(out), "-q", *args]
        assert main(argv) == 0
        return json.loads(out.read_text())

    return run
