"""The plugin as users meet it: found through its entry point, and run by `qbench run` with
calibration on a seeded wav2vec2 (root conftest.py's run_seeded_wav2vec2)."""

from __future__ import annotations


import pytest

qbench_awq = pytest.importorskip("qbench_awq", reason="pip install -e plugins/awq")
from qbench.cli import main  # noqa: E402
from qbench.plugin_manager import discover_quantizers  # noqa: E402


def test_discovered_through_the_entry_point(capsys) -> None:
    entries, _ = discover_quantizers()
    entry = entries["awq"]
    assert entry.cls is qbench_awq.AWQQuantizer
    assert entry.distribution == "qbench-awq" and entry.needs_calibration
    assert main(["plugins", "--show", "awq"]) == 0
    shown = capsys.readouterr().out
    assert all(key in shown for key in ("bits", "group_size", "symmetric", "full_range", "n_grid", "clip", "max_shrink"))


def test_awq_runs_on_a_seeded_wav2vec2(run_seeded_wav2vec2) -> None:
    r = run_seeded_wav2vec2("--plugin", "awq", "--set", "bits=4", "--set", "group_size=32", "--calibration-limit", "2")
    assert r["status"] == "complete" and r["metrics"]["wer"] >= 0
    q = r["quantization"]
    assert q["quantizer"] == "awq" and len(q["layers"]) > 15
    assert r["calibration"]["utterance_count"] == 2
    assert r["metrics"]["model_bytes"] < q["float_model_bytes"]
