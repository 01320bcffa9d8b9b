"""`qbench run --plugin hqq` end to end on a seeded, shrunk wav2vec2 (root conftest.py's
run_seeded_wav2vec2): the plugin runs in the harness, its float zeros are stored as
float16, and the result is a normal one. Skipped without torch/transformers or the
LibriSpeech sample."""

from __future__ import annotations


import pytest

pytest.importorskip("qbench_hqq", reason="pip install -e plugins/hqq")


def test_hqq_wav2vec2_run(run_seeded_wav2vec2) -> None:
    r = run_seeded_wav2vec2("--plugin", "hqq", "--set", "bits=3", "--set", "group_size=32")
    assert r["status"] == "complete" and r["calibration"] is None
    q = r["quantization"]
    assert q["quantizer"] == "hqq" and q["config"]["bits"] == 3 and len(q["layers"]) > 15
    assert r["metrics"]["model_bytes"] < q["float_model_bytes"]
    # 3-bit codes plus a float16 scale and a float16 (float) zero per group of 32: 4 bits/weight
    assert 3.9 < q["mean_bits_per_weight"] <= 4.2
