"""Every reference plugin runs end to end on the real whisper-tiny.en through `qbench run`, at
its default settings: discovered through its entry point, quantized in its own process (calibrated
on dev-clean when it asks), evaluated under a device budget, recorded, and its artifact
reproduces the transcript with no plugin running. (Each plugin's own tests run it on a seeded
wav2vec2 as well, and check its method against hand-computed cases.)
"""

from __future__ import annotations

import json

import pytest

from qbench.cli import main

REFERENCE_PLUGINS = ["rtn", "gptq", "awq", "hqq", "nf4", "squeezellm", "quip", "ternary", "ternary-gptq", "logscale"]


@pytest.mark.parametrize("plugin", REFERENCE_PLUGINS)
def test_reference_plugin_runs_whisper_end_to_end(plugin, tiny_en, data_dir, tmp_path):
    out = tmp_path / "r.json"
    common = ["run", "--limit", "1", "--data-dir", str(data_dir), "--threads", "1", "-q"]
    assert main(common + ["--plugin", plugin, "--calibration-limit", "1", "-o", str(out)]) == 0
    r = json.loads(out.read_text())
    q = r["quantization"]
    assert r["status"] == "complete" and q["quantizer"] == plugin and len(q["layers"]) == 46
    assert q["distribution"].startswith("qbench-")
    assert (r["calibration"] is not None) == q["needs_calibration"]
    again = tmp_path / "again.json"
    assert main(common + ["--artifact", q["artifact_path"], "-o", str(again)]) == 0
    assert json.loads(again.read_text())["hypotheses_sha256"] == r["hypotheses_sha256"]
