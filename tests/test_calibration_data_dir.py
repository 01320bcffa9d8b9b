"""`--calibration-data-dir`: calibration audio read from its own folder, apart from the
evaluation audio, recorded in the result, and not part of a run's identity (the calibration
ids, which pin that audio, are)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from qbench.cli import main
from qbench.data.librispeech import list_utterances
from qbench.run import RunSpec

# calibrated, and as plain as a quantizer gets: 8-bit codes, one scale per tensor
CALIBRATED = '''
import numpy as np
from qbench import hookimpl, Quantizer, QuantizedTensor


class Q(Quantizer):
    name = "calibrated-int8"
    version = "1.0"
    needs_calibration = True

    def quantize(self, weight, stats):
        assert stats is not None and stats.n_rows > 0
        scale = float(np.abs(weight).max()) / 127 or 1.0
        codes = np.clip(np.rint(weight / scale), -127, 127).astype(np.int8)
        return QuantizedTensor(codes=codes, code_bits=8, scales=[[scale]], signed=True)


@hookimpl
def qbench_register_quantizers():
    return [Q]
'''


def copy_subset(data_dir: Path, root: Path, subset: str, n: int) -> list[str]:
    """A folder holding only the first `n` utterances of `subset` (LibriSpeech's layout)."""
    utts = list_utterances(data_dir, subset, limit=n)
    chapters: dict[Path, list[str]] = {}
    for u in utts:
        chapter = root / "LibriSpeech" / subset / u.speaker / u.chapter
        chapter.mkdir(parents=True, exist_ok=True)
        shutil.copy(u.path, chapter / u.path.name)
        chapters.setdefault(chapter, []).append(f"{u.id} {u.transcript}")
    for chapter, lines in chapters.items():
        (chapter / f"{chapter.parent.name}-{chapter.name}.trans.txt").write_text("\n".join(lines) + "\n")
    return [u.id for u in utts]


def test_calibration_audio_comes_from_its_own_folder(tiny_en, data_dir, tmp_path, install_plugin, capsys):
    install_plugin("qbench-calibrated-int8", CALIBRATED, entry_point="calibrated-int8")
    evaluation, calibration = tmp_path / "eval", tmp_path / "cal"
    copy_subset(data_dir, evaluation, "test-clean", 1)
    cal_ids = copy_subset(data_dir, calibration, "dev-clean", 2)
    base = ["run", "--data-dir", str(evaluation), "--plugin", "calibrated-int8", "--device", "none", "-q"]

    # the evaluation folder holds no dev-clean: without the flag there is nothing to calibrate on
    assert main([*base, "-o", str(tmp_path / "without.json")]) == 2
    assert "dev-clean" in capsys.readouterr().err

    out = tmp_path / "r.json"
    assert main([*base, "--calibration-data-dir", str(calibration), "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"from {calibration.resolve() / 'LibriSpeech' / 'dev-clean'}" in err
    r = json.loads(out.read_text())
    assert r["status"] == "complete" and r["dataset"]["data_dir"] == str(evaluation.resolve())
    assert r["calibration"]["utterance_ids"] == cal_ids
    assert r["calibration"]["data_dir"] == str(calibration.resolve())


def test_the_calibration_folder_is_not_identity_but_the_calibration_ids_are():
    spec = RunSpec(plugin="gptq", calibration_ids=("a", "b"))
    assert "calibration_data_dir" in RunSpec.NOT_IDENTITY
    assert spec.model_copy(update={"calibration_data_dir": "/elsewhere"}).identity() == spec.identity()
    assert spec.model_copy(update={"calibration_ids": ("a", "c")}).identity() != spec.identity()
