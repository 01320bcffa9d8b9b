"""`qbench run --model wav2vec2-base-960h --weights DIR` on a Hugging Face directory, with and
without quantizer plugins: the same run, plugin and calibration paths as Whisper.

No real wav2vec2 checkpoint can be downloaded here, so the directory is a seeded
`Wav2Vec2ForCTC` saved with `save_pretrained`: the base-960h config shrunk in width and depth
(the real widths are proven by tests/test_wav2vec2_parity.py; here GPTQ's Hessians of the
real 6144-wide positional convolution would cost minutes). Transcripts are gibberish, the
pipeline is real.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qbench.cli import main


@pytest.fixture
def seeded_base_dir(seeded_wav2vec2: Path) -> Path:
    """The shared seeded wav2vec2 directory (root conftest.py)."""
    return seeded_wav2vec2


@pytest.mark.parametrize("plugin", [None, ["--plugin", "rtn", "--set", "bits=8"], ["--plugin", "gptq", "--set", "bits=4",
                                                                                  "--calibration-limit", "2"]])
def test_wav2vec2_run_writes_a_normal_result(seeded_base_dir, data_dir, tmp_path, plugin):
    out = tmp_path / "r.json"
    argv = ["run", "--model", "wav2vec2-base-960h", "--weights", str(seeded_base_dir), "--limit", "2",
            "--data-dir", str(data_dir), "--device", "none", "-o", str(out), "-q"] + (plugin or [])
    assert main(argv) == 0
    r = json.loads(out.read_text())
    assert r["status"] == "complete"
    assert (r["model"]["architecture"], r["model"]["format"]) == ("wav2vec2", "hf-wav2vec2")
    assert len(r["utterances"]) == 2 and r["metrics"]["wer"] >= 0
    if plugin:
        q = r["quantization"]
        assert q["quantizer"] == plugin[1] and len(q["layers"]) > 15
        assert r["metrics"]["model_bytes"] < q["float_model_bytes"]
        if plugin[1] == "gptq":
            assert r["calibration"]["subset"] == "dev-clean" and r["calibration"]["utterance_count"] == 2


def test_whisper_name_refuses_a_wav2vec2_directory(seeded_base_dir, capsys):
    assert main(["run", "--model", "whisper-tiny.en", "--weights", str(seeded_base_dir), "--limit", "1", "-q"]) == 2
    assert "wav2vec2 checkpoint" in capsys.readouterr().err
