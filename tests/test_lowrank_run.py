"""`--lowrank RANK` wraps any plugin's output in a harness-computed low-rank correction, on both
architectures: the run records it (result, artifact, entry label), executes it (the compute
report counts its MACs), and its artifact gives the same transcripts with no plugin running.

Whisper runs on the real tiny.en weights; wav2vec2 on a seeded Hugging Face directory of the
base-960h config, shrunk (no real wav2vec2 checkpoint can be downloaded here).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from qbench.cli import main

FIXTURE = Path(__file__).parent / "fixtures" / "wav2vec2" / "wav2vec2-base-960h"


@pytest.fixture(scope="module")
def seeded_wav2vec2(tmp_path_factory) -> Path:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = json.loads((FIXTURE / "config.json").read_text())
    config.update(num_hidden_layers=2, hidden_size=64, num_attention_heads=2, intermediate_size=128,
                  num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, conv_dim=[32] * 7)
    torch.manual_seed(0)
    model = transformers.Wav2Vec2ForCTC(transformers.Wav2Vec2Config(**config)).eval()
    directory = tmp_path_factory.mktemp("w2v2")
    model.save_pretrained(directory)
    shutil.copy(FIXTURE / "vocab.json", directory / "vocab.json")
    return directory


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
