"""`--lowrank RANK` wraps any plugin's output in a harness-computed low-rank correction, on both
architectures: the run records it (result, artifact, entry label), executes it (the compute
report counts its MACs), and its artifact gives the same transcripts with no plugin running.

Whisper runs on the real tiny.en weights; wav2vec2 on a seeded Hugging Face directory of the
base-960h config, shrunk (no real wav2vec2 checkpoint can be downloaded here).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qbench.cli import main


def _run(argv: list[str], out: Path) -> dict:
    assert main(argv + ["-o", str(out), "-q"]) == 0
    return json.loads(out.read_text())


@pytest.mark.parametrize("arch", ["whisper", "wav2vec2"])
def test_lowrank_is_recorded_executed_and_reproduced_from_its_artifact(arch, request, data_dir, tmp_path):
    if arch == "whisper":
        request.getfixturevalue("tiny_en")
        model = ["--model", "whisper-tiny.en"]
    else:
        model = ["--model", "wav2vec2-base-960h", "--weights", str(request.getfixturevalue("seeded_wav2vec2"))]
    common = ["run"] + model + ["--limit", "2", "--data-dir", str(data_dir), "--threads", "1"]
    plain = _run(common + ["--plugin", "rtn", "--set", "bits=3"], tmp_path / "plain.json")
    corrected = _run(common + ["--plugin", "rtn", "--set", "bits=3", "--lowrank", "8"], tmp_path / "lr.json")

    q = corrected["quantization"]
    assert q["policy"]["lowrank"] == {"rank": 8, "dtype": "float16"}
    assert "lowrank" not in plain["quantization"]["policy"]
    # the correction costs bytes and arithmetic, and it lowers every layer's weight error
    assert q["mean_bits_per_weight"] > plain["quantization"]["mean_bits_per_weight"]
    assert corrected["device"]["compute"]["lowrank_macs"] > 0 and plain["device"]["compute"]["lowrank_macs"] == 0
    plain_err = {layer["name"]: layer["rel_error"] for layer in plain["quantization"]["layers"]}
    assert all(layer["rel_error"] < plain_err[layer["name"]] for layer in q["layers"])

    again = _run(["run"] + model + ["--limit", "2", "--data-dir", str(data_dir), "--threads", "1",
                          "--artifact", q["artifact_path"]], tmp_path / "again.json")
    assert again["hypotheses_sha256"] == corrected["hypotheses_sha256"]
    assert again["quantization"]["artifact_sha256"] == q["artifact_sha256"]


def test_lowrank_dtype_needs_a_rank(capsys):
    assert main(["run", "--plugin", "rtn", "--lowrank-dtype", "int8", "-q"]) == 2
    assert "--lowrank RANK" in capsys.readouterr().err
