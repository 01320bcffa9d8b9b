"""Both quantizers through their entry points, and a tiny `qbench run` of each on seeded
wav2vec2 weights (the pattern of tests/test_wav2vec2_run.py)."""

from __future__ import annotations


import pytest

qbench_nonuniform = pytest.importorskip("qbench_nonuniform", reason="pip install -e plugins/nonuniform")
from qbench.plugin_manager import discover_quantizers, get_quantizer, plugin_load_errors  # noqa: E402


def test_discovered_through_their_entry_points() -> None:
    entries, errors = discover_quantizers()
    for name, cls, calibrated in (("nf4", qbench_nonuniform.NF4Quantizer, False),
                                  ("squeezellm", qbench_nonuniform.SqueezeLLMQuantizer, True)):
        assert get_quantizer(name) is cls
        assert entries[name].distribution == "qbench-nonuniform" and entries[name].needs_calibration is calibrated
    assert not [e for e in errors + plugin_load_errors() if getattr(e, "distribution", None) == "qbench-nonuniform"]


@pytest.mark.parametrize("plugin", [["--plugin", "nf4", "--set", "bits=4"],
                                    ["--plugin", "squeezellm", "--set", "bits=3", "--calibration-limit", "2"]])
def test_wav2vec2_run(run_seeded_wav2vec2, plugin) -> None:
    r = run_seeded_wav2vec2(*plugin)
    assert r["status"] == "complete" and len(r["utterances"]) == 1 and r["metrics"]["wer"] >= 0
    q = r["quantization"]
    assert q["quantizer"] == plugin[1] and len(q["layers"]) > 15
    assert r["metrics"]["model_bytes"] < q["float_model_bytes"]
    if plugin[1] == "squeezellm":
        assert r["calibration"]["utterance_count"] == 2
