"""Both quantizers through their entry points, and a tiny `qbench run` of each on seeded
wav2vec2 weights (the pattern of tests/test_wav2vec2_run.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

qbench_nonuniform = pytest.importorskip("qbench_nonuniform", reason="pip install -e plugins/nonuniform")
from qbench.cli import main  # noqa: E402
from qbench.data.librispeech import DataNotFoundError, find_data_dir  # noqa: E402
from qbench.plugin_manager import discover_quantizers, get_quantizer, plugin_load_errors  # noqa: E402


def test_discovered_through_their_entry_points() -> None:
    entries, errors = discover_quantizers()
    for name, cls, calibrated in (("nf4", qbench_nonuniform.NF4Quantizer, False),
                                  ("squeezellm", qbench_nonuniform.SqueezeLLMQuantizer, True)):
        assert get_quantizer(name) is cls
        assert entries[name].distribution == "qbench-nonuniform" and entries[name].needs_calibration is calibrated
    assert not [e for e in errors + plugin_load_errors() if getattr(e, "distribution", None) == "qbench-nonuniform"]


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


@pytest.mark.parametrize("plugin", [["--plugin", "nf4", "--set", "bits=4"],
                                    ["--plugin", "squeezellm", "--set", "bits=3", "--calibration-limit", "2"]])
def test_wav2vec2_run(seeded_base_dir, data_dir, tmp_path, plugin) -> None:
    out = tmp_path / "r.json"
    argv = ["run", "--model", "wav2vec2-base-960h", "--weights", str(seeded_base_dir), "--limit", "1",
            "--data-dir", str(data_dir), "--device", "none", "--threads", "1", "-o", str(out), "-q"] + plugin
    assert main(argv) == 0
    r = json.loads(out.read_text())
    assert r["status"] == "complete" and len(r["utterances"]) == 1 and r["metrics"]["wer"] >= 0
    q = r["quantization"]
    assert q["quantizer"] == plugin[1] and len(q["layers"]) > 15
    assert r["metrics"]["model_bytes"] < q["float_model_bytes"]
    if plugin[1] == "squeezellm":
        assert r["calibration"]["utterance_count"] == 2
