"""`RunSpec` and `run_benchmark`: a run as a value, carried out without argv or process globals."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest
from pydantic import ValidationError

from qbench.cli import main
from qbench.leaderboard.entry import read_entry
from qbench.models import parallel
from qbench.results import RunResult
from qbench.run import (
    RunSpec,
    RunSpecError,
    SilentProgress,
    run_benchmark,
    select_utterances,
)

LEADERBOARD = Path(__file__).resolve().parent.parent / "leaderboards" / "whisper-tiny.en" / "test-clean"


def test_run_benchmark_is_callable_without_the_cli(tiny_en, data_dir, tmp_path):
    out = tmp_path / "r.json"
    spec = RunSpec(data_dir=str(data_dir), limit=2, device="none", threads=1, output=str(out))
    before = parallel.compute_threads()
    result = run_benchmark(spec)
    assert result.status == "complete" and len(result.utterances) == 2 and out.is_file()
    assert result.machine.threads == 1
    # the run's thread count did not outlive it
    assert parallel.compute_threads() == before
    assert result.devices_fitted and set(result.devices_fitted) <= {"pi-zero-2w", "pi4-2gb", "jetson-nano-4gb"}


def test_a_spec_is_checked_when_it_is_built():
    for bad in ({"batch_size": 0}, {"batch_size": -1}, {"threads": 0}, {"limit": 0}, {"calibration_limit": 0},
                {"no_such_field": 1}):
        with pytest.raises(ValidationError):
            RunSpec(**bad)
    spec = RunSpec()
    with pytest.raises(ValidationError):
        spec.limit = 3  # frozen: a spec is a value


def test_batch_size_defaults_follow_the_device():
    assert RunSpec().effective_batch_size is None  # chosen by the device session
    assert RunSpec(device="none").effective_batch_size == 8
    assert RunSpec(device="none", batch_size=3).effective_batch_size == 3


def test_labels_name_the_plugin_and_its_settings():
    assert RunSpec().label == "fp"
    spec = RunSpec(plugin="rtn", config={"bits": 4, "symmetric": False})
    assert spec.label == "rtn_bits4_symmetricfalse"
    assert spec.output_path == Path("results/whisper-tiny.en__test-clean__rtn_bits4_symmetricfalse.json")


def test_from_entry_asks_for_exactly_what_the_entry_records():
    quantized = [e for e in (read_entry(p) for p in sorted(LEADERBOARD.glob("*.json"))) if e.quantizer and e.quantizer.name != "plan"]
    # a committed entry with calibration if there is one (it records the most)
    entry = next((e for e in quantized if e.calibration is not None), quantized[0])
    spec = RunSpec.from_entry(entry, data_dir="/data")
    assert spec.utterance_ids == tuple(u.id for u in entry.utterances)
    assert spec.plugin == entry.quantizer.name and spec.config == entry.quantizer.config
    assert spec.policy.model_dump() == entry.quantizer.policy
    if entry.calibration is not None:
        assert spec.calibration_ids == tuple(entry.calibration.utterance_ids)
    assert spec.device == entry.device.name and spec.batch_size == entry.device.batch_size
    assert spec.data_dir == "/data"
    fp = RunSpec.from_entry(read_entry(LEADERBOARD / "fp.json"))
    assert fp.plugin is None and fp.calibration_ids is None
    # an entry calibrated on fed rows only is reproduced that way, and its spec is another run
    assert spec.calibration_counts_padding is True
    assert entry.calibration is not None
    fed_only = entry.model_copy(update={"calibration": entry.calibration.model_copy(update={"counts_padding": False})})
    again = RunSpec.from_entry(fed_only, data_dir="/data")
    assert again.calibration_counts_padding is False and again.identity() != spec.identity()
    # and so is one calibrated on speed-perturbed copies
    assert spec.calibration_speeds == ()
    perturbed = entry.model_copy(update={"calibration": entry.calibration.model_copy(update={"speeds": [0.9, 1.1]})})
    assert RunSpec.from_entry(perturbed).calibration_speeds == (0.9, 1.1)


def test_utterance_ids_not_in_the_data_are_named(data_dir):
    from qbench.data.librispeech import list_utterances

    present = list_utterances(data_dir, "test-clean", limit=3)
    assert [u.id for u in select_utterances(present, None, [present[2].id, present[0].id])] == [present[0].id, present[2].id]
    with pytest.raises(RunSpecError, match="1 of 2 .*9999-9999-9999"):
        select_utterances(present, None, [present[0].id, "9999-9999-9999"])


def test_cli_refuses_what_a_spec_refuses(capsys):
    assert main(["run", "--batch-size", "-1", "-q"]) == 2
    err = capsys.readouterr().err
    assert "batch_size" in err and len(err.strip().splitlines()) == 1
    assert main(["run", "--set", "bits=4", "-q"]) == 2
    assert "--plugin" in capsys.readouterr().err


def test_thread_counts_are_scoped_per_thread_and_reach_workers():
    seen: dict[str, int] = {}

    def run(name: str, n: int) -> None:
        with parallel.using_threads(n):
            seen[name] = parallel.compute_threads()
            seen[name + "-worker"] = parallel.parallel_map(lambda _: parallel.compute_threads(), [0, 1], threads=2)[1]

    threads = [threading.Thread(target=run, args=(f"t{n}", n)) for n in (1, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {"t1": 1, "t1-worker": 1, "t3": 3, "t3-worker": 3}
    with pytest.raises(parallel.ThreadCountError):
        with parallel.using_threads(0):
            pass


def test_identity_is_the_settings_that_decide_the_result():
    base = RunSpec(limit=3, device="none")
    # where it is written, how many threads, where data and weights are read from: same run
    for same in (dict(output="elsewhere.json"), dict(threads=2), dict(data_dir="/d"), dict(weights="/w.bin"),
                 dict(batch_size=8), dict(calibration_limit=5)):  # 8 is the default batch; fp runs do not calibrate
        assert RunSpec(limit=3, device="none", **same).identity() == base.identity(), same
    different = [dict(model="wav2vec2-base-960h"), dict(subset="test-other"), dict(limit=4), dict(device="pi-zero-2w"),
                 dict(batch_size=2), dict(plugin="rtn"), dict(plugin="rtn", config={"bits": 4}),
                 dict(plugin="rtn", policy={"quantize_embeddings": True})]
    identities = {RunSpec(**{"limit": 3, "device": "none", **d}).identity() for d in different}
    assert len(identities | {base.identity()}) == len(different) + 1
    calibrated = dict(plugin="gptq", device="none")
    assert RunSpec(**calibrated, calibration_limit=5).identity() != RunSpec(**calibrated).identity()
    # an id set is a set: order and repeats do not matter, and a limit beside it is ignored
    assert RunSpec(utterance_ids=("b", "a", "a")).identity() == RunSpec(utterance_ids=("a", "b"), limit=1).identity()
    assert RunSpec(utterance_ids=("a", "b")).identity() != RunSpec(utterance_ids=("a",)).identity()


def test_skipped_files_and_unscorable_references_are_warned_and_recorded(tiny_en, data_dir, tmp_path, monkeypatch):
    """A flac without a transcript line, a transcript line without a flac and a reference the
    normalizer empties ("HMM"): the run says so once each and records it; only real references are scored."""
    from qbench.data.librispeech import list_utterances
    from qbench.models.whisper import Whisper

    utts = list_utterances(data_dir, "test-clean", limit=2)  # both of chapter 1089-134686
    chapter = tmp_path / "LibriSpeech" / "test-clean" / "1089" / "134686"
    chapter.mkdir(parents=True)
    files = [Path(shutil.copy(u.path, chapter / u.path.name)) for u in utts]
    shutil.copy(files[0], chapter / "1089-134686-0900.flac")  # a filler-only utterance
    shutil.copy(files[0], chapter / "1089-134686-0901.flac")  # audio nobody transcribed
    (chapter / "1089-134686.trans.txt").write_text("".join(f"{u.id} {u.transcript}\n" for u in utts)
                                                   + "1089-134686-0900 HMM\n1089-134686-0902 A LINE WHOSE FLAC IS GONE\n")
    monkeypatch.setattr(Whisper, "transcribe", lambda self, audios: ["a hypothesis"] * len(audios))
    notes: list[str] = []
    progress = SilentProgress()
    progress.note = notes.append
    result = run_benchmark(RunSpec(data_dir=str(tmp_path), device="none", output=str(tmp_path / "r.json")), progress)
    assert [u.id for u in result.utterances] == [f.stem for f in files]
    assert result.dataset.utterance_count == 2
    assert [u.id for u in result.unscored] == ["1089-134686-0900"]
    skipped, unscored = result.warnings
    assert "1 flac file(s) without a transcript line (e.g. " in skipped and "0901.flac" in skipped
    assert "1 transcript line(s) without a flac file (e.g. 1089-134686-0902 in " in skipped
    assert "1 utterance(s) not scored" in unscored and "1089-134686-0900 'HMM'" in unscored
    assert [n for n in notes if n.startswith("warning: ")] == [f"warning: {skipped}", f"warning: {unscored}"]
    assert RunResult.read(tmp_path / "r.json").warnings == result.warnings


def test_the_device_batch_is_chosen_for_the_runs_longest_utterance(tiny_en):
    """A Whisper utterance over 30 s is two windows a row: a batch chosen for 30 s stopped a
    200-utterance run on pi-zero-2w at its first long batch."""
    from qbench.embedded.devices import get_device_profile
    from qbench.embedded.memory import check_fit
    from qbench.embedded.session import DeviceSession, estimate_memory

    device = get_device_profile("pi-zero-2w")
    short = DeviceSession(tiny_en.model, device, None, longest_seconds=20.0)
    long = DeviceSession(tiny_en.model, device, None, longest_seconds=35.0)
    assert long.fits and long.batch_size < short.batch_size
    # the chosen batch of the longest utterances passes the check every batch gets
    assert check_fit(estimate_memory(tiny_en.model, long.store, device, long.batch_size, 35.0), device).fits
