"""The plugin as users meet it: found through its entry point, and run by `qbench run` with
calibration on a seeded wav2vec2 (the fixture pattern of tests/test_wav2vec2_run.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

qbench_awq = pytest.importorskip("qbench_awq", reason="pip install -e plugins/awq")
from qbench.cli import main  # noqa: E402
from qbench.data.librispeech import DataNotFoundError, find_data_dir  # noqa: E402
from qbench.plugin_manager import discover_quantizers  # noqa: E402


def test_discovered_through_the_entry_point(capsys) -> None:
    entries, _ = discover_quantizers()
    entry = entries["awq"]
    assert entry.cls is qbench_awq.AWQQuantizer
    assert entry.distribution == "qbench-awq" and entry.needs_calibration
    assert main(["plugins", "--show", "awq"]) == 0
    shown = capsys.readouterr().out
    assert all(key in shown for key in ("bits", "group_size", "symmetric", "full_range", "n_grid", "clip", "max_shrink"))


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


def test_awq_runs_on_a_seeded_wav2vec2(seeded_base_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    argv = ["run", "--model", "wav2vec2-base-960h", "--weights", str(seeded_base_dir), "--limit", "1",
            "--data-dir", str(data_dir), "--device", "none", "--threads", "1", "-o", str(out), "-q",
            "--plugin", "awq", "--set", "bits=4", "--set", "group_size=32", "--calibration-limit", "2"]
    assert main(argv) == 0
    r = json.loads(out.read_text())
    assert r["status"] == "complete" and r["metrics"]["wer"] >= 0
    q = r["quantization"]
    assert q["quantizer"] == "awq" and len(q["layers"]) > 15
    assert r["calibration"]["utterance_count"] == 2
    assert r["metrics"]["model_bytes"] < q["float_model_bytes"]
