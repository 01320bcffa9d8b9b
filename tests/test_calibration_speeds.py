"""Speed-perturbed calibration copies: more distinct calibration rows from the same dev-clean
utterances (the decoder's Hessians are rank-deficient on dev-clean's transcripts), resampled
exactly, counted by every calibrated quantizer, and recorded so an entry reproduces."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_run import LEADERBOARD

from qbench.cli import main
from qbench.data.calibration import CalibrationError, speed_perturbed
from qbench.leaderboard.entry import EntryCalibration, read_entry
from qbench.quant.artifact import ArtifactCalibration
from qbench.run import RunSpec

RATE = 16000


def peak_hz(audio: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(audio))
    return float(np.argmax(spectrum) * RATE / len(audio))


@pytest.mark.parametrize("factor", [0.9, 1.1, 1.5])
def test_a_tone_comes_back_faster_and_higher_by_the_factor(factor):
    t = np.arange(2 * RATE) / RATE
    tone = np.sin(2 * np.pi * 440.0 * t).astype(np.float32)
    out = speed_perturbed(tone, factor)
    assert len(out) == round(len(tone) / factor)
    assert peak_hz(out) == pytest.approx(440.0 * factor, abs=1.0)
    # the amplitude survives the resampling (away from the ends)
    assert np.abs(out[1000:-1000]).max() == pytest.approx(1.0, abs=0.02)


def test_speed_one_is_the_audio_itself_and_the_spectrum_above_the_new_nyquist_is_dropped():
    rng = np.random.default_rng(0)
    audio = rng.standard_normal(RATE).astype(np.float32)
    np.testing.assert_allclose(speed_perturbed(audio, 1.0), audio, atol=1e-5)
    faster = speed_perturbed(audio, 2.0)  # 8 kHz of content squeezed into a 4 kHz band: half dropped
    assert len(faster) == RATE // 2
    assert np.mean(faster.astype(np.float64) ** 2) == pytest.approx(np.mean(audio.astype(np.float64) ** 2) / 2, rel=0.05)


def test_a_speed_out_of_range_is_a_one_line_error_and_the_spec_refuses_it():
    with pytest.raises(CalibrationError, match="calibration speed 3.0"):
        speed_perturbed(np.zeros(100, dtype=np.float32), 3.0)
    with pytest.raises(ValueError, match="calibration_speeds"):
        RunSpec(plugin="gptq", calibration_speeds=(0.1,))


def test_the_identity_and_the_records_of_an_unperturbed_run_are_what_they_were():
    old, new = RunSpec(plugin="gptq"), RunSpec(plugin="gptq", calibration_speeds=(0.9, 1.1))
    assert "calibration_speeds" not in old.identity_fields()
    assert new.identity_fields()["calibration_speeds"] == [0.9, 1.1]
    assert old.identity() != new.identity()
    record = {"subset": "dev-clean", "utterance_count": 1, "utterance_ids_sha256": "0" * 64, "utterance_ids": ["1-2-3"]}
    assert json.loads(EntryCalibration.model_validate(record).model_dump_json()) == record
    assert json.loads(EntryCalibration.model_validate(record | {"speeds": [0.9]}).model_dump_json())["speeds"] == [0.9]
    with pytest.raises(ValueError):
        EntryCalibration.model_validate(record | {"speeds": [9.0]})
    art = {k: record[k] for k in ("subset", "utterance_ids", "utterance_ids_sha256")}
    assert ArtifactCalibration.model_validate(art).model_dump(mode="json") == art


def test_the_cli_reads_speeds_and_names_a_bad_list(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--plugin", "gptq", "--calibration-speeds", "0.9,fast"])
    assert "0.9,fast" in capsys.readouterr().err


# a calibrated quantizer that writes each layer's calibration row count where the test reads it
# (plugins run in a child process with a clean environment: the path is in the source)
COUNTING = '''
ROWS_FILE = {rows!r}
import json
import numpy as np
from qbench import hookimpl, Quantizer, QuantizedTensor


class Q(Quantizer):
    name = "row-counting"
    version = "1.0"
    needs_calibration = True

    def quantize(self, weight, stats):
        with open(ROWS_FILE, "a") as f:
            f.write(json.dumps(stats.n_rows) + "\\n")
        scale = float(np.abs(weight).max()) / 127 or 1.0
        codes = np.clip(np.rint(weight / scale), -127, 127).astype(np.int8)
        return QuantizedTensor(codes=codes, code_bits=8, scales=[[scale]], signed=True)


@hookimpl
def qbench_register_quantizers():
    return [Q]
'''


def test_wav2vec2_calibrates_on_the_copies_and_the_result_records_them(run_seeded_wav2vec2, install_plugin, tmp_path):
    rows = tmp_path / "rows"
    install_plugin("qbench-row-counting", COUNTING.replace("{rows!r}", repr(str(rows))), entry_point="row-counting")
    counts, results = {}, {}
    for name, extra in (("plain", []), ("perturbed", ["--calibration-speeds", "0.9,1.1"])):
        rows.unlink(missing_ok=True)
        results[name] = run_seeded_wav2vec2("--plugin", "row-counting", "--calibration-limit", "2", *extra)
        counts[name] = [json.loads(line) for line in rows.read_text().split()]
        assert results[name]["status"] == "complete"
    assert "speeds" not in results["plain"]["calibration"]
    # each copy adds about as many frames as its duration: 1 + 1/0.9 + 1/1.1 = 3.02 times
    ratios = np.array(counts["perturbed"]) / np.array(counts["plain"])
    assert np.all((ratios > 2.8) & (ratios < 3.2)), ratios
    perturbed = results["perturbed"]["calibration"]
    assert perturbed["speeds"] == [0.9, 1.1] and perturbed["utterance_count"] == 2


def test_an_entry_calibrated_another_way_gets_its_own_file_name():
    entry = next(e for e in (read_entry(p) for p in sorted(LEADERBOARD.glob("*.json"))) if e.calibration is not None)
    perturbed = entry.model_copy(update={"calibration": entry.calibration.model_copy(update={"speeds": [0.9, 1.1]})})
    assert perturbed.label == f"{entry.label}-cal-speed0.9_1.1"
    fed = entry.model_copy(update={"calibration": entry.calibration.model_copy(update={"counts_padding": False})})
    assert fed.label == f"{entry.label}-cal-fed"
