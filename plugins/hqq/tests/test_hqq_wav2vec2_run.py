"""`qbench run --plugin hqq` end to end on a seeded, shrunk wav2vec2 (the fixture pattern of
tests/test_wav2vec2_run.py): the plugin runs in the harness, its float zeros are stored as
float16, and the result is a normal one. Skipped without torch/transformers or the
LibriSpeech sample."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("qbench_hqq", reason="pip install -e plugins/hqq")
from qbench.cli import main
from qbench.data.librispeech import DataNotFoundError, find_data_dir


@pytest.fixture(scope="module")
def data_dir() -> Path:
    try:
        return find_data_dir(None, "test-clean")
    except DataNotFoundError as exc:
        pytest.skip(f"shared LibriSpeech sample not found: {exc}")


@pytest.fixture
def seeded_base_dir(seeded_wav2vec2: Path) -> Path:
    """The shared seeded wav2vec2 directory (root conftest.py)."""
    return seeded_wav2vec2


def test_hqq_wav2vec2_run(seeded_base_dir, data_dir, tmp_path) -> None:
    out = tmp_path / "r.json"
    argv = ["run", "--model", "wav2vec2-base-960h", "--weights", str(seeded_base_dir), "--limit", "1",
            "--data-dir", str(data_dir), "--device", "none", "--threads", "1", "-o", str(out), "-q",
            "--plugin", "hqq", "--set", "bits=3", "--set", "group_size=32"]
    assert main(argv) == 0
    r = json.loads(out.read_text())
    assert r["status"] == "complete" and r["calibration"] is None
    q = r["quantization"]
    assert q["quantizer"] == "hqq" and q["config"]["bits"] == 3 and len(q["layers"]) > 15
    assert r["metrics"]["model_bytes"] < q["float_model_bytes"]
    # 3-bit codes plus a float16 scale and a float16 (float) zero per group of 32: 4 bits/weight
    assert 3.9 < q["mean_bits_per_weight"] <= 4.2
