"""Plugins that cheat, crash, exit or hang: none of it reaches a score, and each is one clear line.

Each hostile plugin is a real installed distribution (generated here) that the plugin process
discovers, exactly as a third-party `qbench-<name>` from PyPI would be.
"""

from __future__ import annotations

import json
import textwrap
import time

import pytest

from qbench.cli import main
from qbench.data.scoring import normalize, word_errors
from qbench.quant.apply import PluginError
from qbench.run import RunSpec, run_benchmark

# Round-to-nearest at 4 bits, per tensor: good enough that transcripts stay close to float.
HONEST = '''
import numpy as np
from qbench import hookimpl, Quantizer, QuantizedTensor


class Q(Quantizer):
    name = {name!r}
    version = "1.0"

    def quantize(self, weight, stats):
        {body}
        scale = float(np.abs(weight).max()) / 7 or 1.0
        codes = np.clip(np.rint(weight / scale), -7, 7).astype(np.int8)
        return QuantizedTensor(codes=codes, code_bits=4, scales=[[scale]], signed=True)


@hookimpl
def qbench_register_quantizers():
    return [Q]
'''

CHEAT = """
        import os, qbench.evaluate as ev, qbench.data.scoring as sc
        perfect = lambda ref, hyp: sc.ErrorCounts(substitutions=0, deletions=0, insertions=0, reference_length=len(ref.split()))
        ev.word_errors = ev.char_errors = sc.word_errors = sc.char_errors = perfect
        ev.score_utterance.__code__ = (lambda utt, duration, hypothesis: None).__code__
        os.environ["QBENCH_THREADS"] = "7"
        open("escaped.txt", "w").write("written by a plugin")
"""


def _plugin(install_plugin, name: str, body: str = "pass") -> None:
    body = textwrap.dedent(body).strip().replace("\n", "\n        ")
    install_plugin(f"qbench-{name}", HONEST.format(name=name, body=body), entry_point=name)


def _spec(data_dir, tmp_path, plugin: str, **kw) -> RunSpec:
    return RunSpec(plugin=plugin, data_dir=str(data_dir), limit=3, device="none", output=str(tmp_path / f"{plugin}.json"), **kw)


def test_a_score_patching_plugin_cannot_change_a_score(tiny_en, data_dir, tmp_path, install_plugin, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _plugin(install_plugin, "honest")
    _plugin(install_plugin, "cheat", CHEAT)
    honest = run_benchmark(_spec(data_dir, tmp_path, "honest", threads=1))
    cheat = run_benchmark(_spec(data_dir, tmp_path, "cheat", threads=1))
    # same codes, same transcripts, same score: the patches ran in the plugin's process only
    assert cheat.quantization["artifact_sha256"] != honest.quantization["artifact_sha256"]  # names differ
    assert cheat.hypotheses_sha256 == honest.hypotheses_sha256
    assert cheat.metrics.wer == honest.metrics.wer > 0
    for u in cheat.utterances:
        assert u.word_errors == word_errors(normalize(u.reference), normalize(u.hypothesis)).errors
    assert cheat.machine.threads == 1
    assert not (tmp_path / "escaped.txt").exists()


def test_the_plugin_process_does_not_see_the_harness_environment(tiny_en, data_dir, tmp_path, install_plugin, monkeypatch):
    monkeypatch.setenv("QBENCH_TEST_SECRET", "hunter2")
    _plugin(install_plugin, "snoop", 'raise RuntimeError("secret=" + str(__import__("os").environ.get("QBENCH_TEST_SECRET")))')
    with pytest.raises(PluginError, match="secret=None") as exc:
        run_benchmark(_spec(data_dir, tmp_path, "snoop"))
    assert "plugin 'snoop' failed on layer 'encoder.conv1'" in str(exc.value)


@pytest.mark.parametrize("body, expected", [
    ("raise SystemExit(0)", "raised SystemExit: 0"),
    ("import os; os._exit(3)", "exited (status 3)"),
    ("return 'not a tensor'", "not a QuantizedTensor"),
    ("return QuantizedTensor(codes=np.full(weight.shape, 99, np.int8), code_bits=4, scales=[[1.0]], signed=True)",
     "outside signed 4-bit range"),
])
def test_crashes_and_exits_are_one_line_naming_the_plugin_and_layer(body, expected, tiny_en, data_dir, tmp_path,
                                                                      install_plugin, capsys):
    _plugin(install_plugin, "broken", body)
    out = tmp_path / "r.json"
    assert main(["run", "--plugin", "broken", "--limit", "1", "--device", "none", "--data-dir", str(data_dir),
                 "-o", str(out), "-q"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, errors  # one line, however long
    assert "plugin 'broken' failed on layer 'encoder.conv1'" in errors[0] and expected in errors[0]
    # nothing claims to be a result
    assert not out.exists() or json.loads(out.read_text())["status"] != "complete"


def test_a_hanging_plugin_times_out(tiny_en, data_dir, tmp_path, install_plugin):
    _plugin(install_plugin, "sleepy", "import time; time.sleep(600)")
    t0 = time.monotonic()
    with pytest.raises(PluginError, match=r"plugin 'sleepy' failed on layer 'encoder.conv1': did not answer within 2 s"):
        run_benchmark(_spec(data_dir, tmp_path, "sleepy", plugin_timeout=2))
    assert time.monotonic() - t0 < 60


def test_no_plugin_code_is_imported_by_the_evaluating_process(tiny_en, data_dir, tmp_path):
    import subprocess
    import sys

    script = f"""
import sys
from qbench.run import RunSpec, run_benchmark
r = run_benchmark(RunSpec(plugin="rtn", config={{"bits": 4}}, data_dir={str(data_dir)!r}, limit=1, output={str(tmp_path / "r.json")!r}))
assert r.status == "complete", r.error
print(sorted(m for m in sys.modules if m.startswith("qbench_")))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_an_artifact_is_evaluated_again_without_quantizing(tiny_en, data_dir, tmp_path):
    first = run_benchmark(RunSpec(plugin="rtn", config={"bits": 4}, data_dir=str(data_dir), limit=2, device="none",
                                  output=str(tmp_path / "q.json")))
    artifact = first.quantization["artifact_path"]
    again = run_benchmark(RunSpec(artifact=artifact, data_dir=str(data_dir), limit=2, device="none",
                                  output=str(tmp_path / "again.json")))
    assert again.hypotheses_sha256 == first.hypotheses_sha256
    assert again.quantization["artifact_sha256"] == first.quantization["artifact_sha256"]
    for key in ("model_bytes", "mean_bits_per_weight", "quantized_fraction", "distribution_version", "config"):
        assert again.quantization[key] == first.quantization[key]
