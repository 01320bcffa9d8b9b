"""`qbench fit --plugin NAME` sizes any installed quantizer without audio: a calibrated one runs on
neutral statistics, and the sizes it gives are those of a real calibrated run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("qbench_gptq", reason="pip install -e plugins/gptq")
from test_whisper_model import DIMS, random_params, tiny_vocab  # noqa: E402

from qbench.models import whisper as W  # noqa: E402
from qbench.plugin_manager import get_quantizer  # noqa: E402
from qbench.quant.apply import QuantizationPolicy, neutral_layer_stats, quantize_model, quantize_without_audio  # noqa: E402

TESTS = Path(__file__).resolve().parent

# A fresh interpreter where qbench-rtn is not installed: its entry point is hidden from discovery
# and its module cannot be imported; `qbench fit` then runs on the small random Whisper.
FIT_WITHOUT_RTN = """
import importlib.metadata, sys
from types import SimpleNamespace

_entry_points = importlib.metadata.entry_points
importlib.metadata.entry_points = lambda **kw: [ep for ep in _entry_points(**kw) if ep.name != "rtn"]
sys.modules["qbench_rtn"] = None

import qbench.checkpoints.loader
from test_whisper_model import DIMS, random_params, tiny_vocab
from qbench.models import whisper as W

model = W.Whisper.from_params(DIMS, random_params(DIMS), tiny_vocab(DIMS.n_vocab))
qbench.checkpoints.loader.load_model = lambda name, weights=None: SimpleNamespace(model=model)

from qbench.cli import main
from qbench.plugin_manager import discover_quantizers
assert "rtn" not in discover_quantizers()[0] and "gptq" in discover_quantizers()[0]
sys.exit(main(sys.argv[1:]))
"""


def fit_without_rtn(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    return subprocess.run([sys.executable, "-c", FIT_WITHOUT_RTN, "fit", *args], capture_output=True, text=True, env=env,
                          timeout=300)


@pytest.fixture(scope="module")
def small() -> W.Whisper:
    return W.Whisper.from_params(DIMS, random_params(DIMS), tiny_vocab(DIMS.n_vocab))


@pytest.fixture(scope="module")
def calibrated(small):
    """gptq 4-bit, groups of 8, calibrated on two seconds of seeded noise: the reference sizes."""
    gptq = get_quantizer("gptq")
    audio = [(0.1 * np.random.default_rng(5).standard_normal(32000)).astype(np.float32)]
    return quantize_model(small, gptq(gptq.Config(bits=4, group_size=8)), QuantizationPolicy(), audio)[1]


def test_fit_with_gptq_works_without_rtn_installed(calibrated) -> None:
    table = fit_without_rtn("--plugin", "gptq", "--set", "bits=4")
    assert table.returncode == 0, table.stderr
    assert "pi-zero-2w" in table.stdout and "fits" in table.stdout and "stm32h743" in table.stdout
    assert "neutral statistics" in " ".join(table.stderr.split())

    as_json = fit_without_rtn("--plugin", "gptq", "--set", "bits=4", "--set", "group_size=8", "--json")
    assert as_json.returncode == 0, as_json.stderr
    q = json.loads(as_json.stdout)["quantization"]
    assert (q["quantizer"], q["needs_calibration"], q["n_calibration_audios"]) == ("gptq", True, 0)
    assert "codes are not what a calibrated run chooses" in q["calibration_note"] == q["estimated_with"]
    assert q["model_bytes"] == calibrated.model_bytes  # exact, though no audio was used
    assert q["mean_bits_per_weight"] == calibrated.mean_bits_per_weight


def test_sizes_equal_a_calibrated_run_layer_by_layer_but_codes_do_not(small, calibrated) -> None:
    gptq = get_quantizer("gptq")
    qmodel, report = quantize_without_audio(small, gptq(gptq.Config(bits=4, group_size=8)))
    assert report.calibration_note and report.n_calibration_audios == 0 and calibrated.calibration_note is None
    assert [(r.name, r.packed_bytes, r.code_bytes) for r in report.layers] == [
        (r.name, r.packed_bytes, r.code_bytes) for r in calibrated.layers]
    assert report.model_bytes == calibrated.model_bytes < report.float_model_bytes
    assert [r.rel_error for r in report.layers] != [r.rel_error for r in calibrated.layers]
    assert isinstance(qmodel.store.packed["encoder.blocks.0.mlp.fc1"].codes, np.ndarray)


def test_neutral_statistics_make_gptq_round_to_nearest(small) -> None:
    """With x^T x = I GPTQ feeds no error back: its codes are RTN's on the same grid (RTN's
    symmetric restricted grid, which gptq 0.2 keeps as an option)."""
    gptq, rtn = get_quantizer("gptq"), pytest.importorskip("qbench_rtn").RTNQuantizer
    w = small.store.matrix("encoder.blocks.1.mlp.fc2")
    same_grid = gptq.Config(bits=3, group_size=16, symmetric=True, full_range=False)
    g = gptq(same_grid).quantize(w, neutral_layer_stats(w.shape[1]))
    r = rtn(rtn.Config(bits=3, group_size=16)).quantize(w, None)
    np.testing.assert_array_equal(g.codes, r.codes)
    np.testing.assert_array_equal(g.scales, r.scales)


def test_a_quantizer_without_calibration_is_quantized_as_usual(small) -> None:
    rtn = pytest.importorskip("qbench_rtn").RTNQuantizer
    _, direct = quantize_model(small, rtn())
    _, sized = quantize_without_audio(small, rtn())
    assert sized.calibration_note is None
    assert sized.model_dump(exclude={"seconds"}) == direct.model_dump(exclude={"seconds"})
