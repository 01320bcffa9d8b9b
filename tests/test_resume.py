"""Resume and never lose: the run journal, reruns of the same spec, other specs, signals, kill -9.

The subprocess tests kill real `python -m qbench.cli run` processes on copies of the six shortest
shared test-clean utterances and check the final result equals an uninterrupted run's. The
in-process tests replace the model's transcription with a fake one (deterministic, instant):
they are about what happens to files, not about Whisper.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import soundfile as sf

from qbench.cli import main
from qbench.data.librispeech import list_utterances
from qbench.journal import (
    JournalError,
    JournalHeader,
    JournalRecord,
    OutputInUseError,
    RunJournal,
    journal_path,
    read_journal,
)
from qbench.models.whisper import Whisper
from qbench.results import RunResult, audio_digest
from qbench.run import RunSpec, run_benchmark

# the six shortest shared test-clean utterances (1.4-1.9 s), over five chapters
SHORT_IDS = ["2094-142345-0041", "2830-3980-0026", "5105-28241-0007", "5683-32879-0025", "7127-75947-0004",
             "7127-75947-0031"]
REPO = Path(__file__).resolve().parent.parent


def copy_utterances(data_dir: Path, root: Path, ids: list[str] | None = None, n: int | None = None) -> list[Path]:
    """A private LibriSpeech test-clean under `root` with the utterances `ids` (or the first `n`)."""
    present = list_utterances(data_dir, "test-clean")
    utts = [u for u in present if u.id in set(ids)] if ids is not None else list(present[:n])
    chapters: dict[Path, list[str]] = {}
    files = []
    for u in utts:
        chapter = root / "LibriSpeech" / "test-clean" / u.speaker / u.chapter
        chapter.mkdir(parents=True, exist_ok=True)
        shutil.copy(u.path, chapter / u.path.name)
        files.append(chapter / u.path.name)
        chapters.setdefault(chapter, []).append(f"{u.id} {u.transcript}")
    for chapter, lines in chapters.items():
        (chapter / f"{chapter.parent.name}-{chapter.name}.trans.txt").write_text("\n".join(lines) + "\n")
    return files


def journal_records(path: Path) -> int:
    """Finished record lines in a journal (0 when it is absent or holds only its header)."""
    try:
        return max(path.read_bytes().count(b"\n") - 1, 0)
    except FileNotFoundError:
        return 0


def same_result(a: dict, b: dict) -> None:
    """The parts of two result files that must not depend on interruptions (all but timing)."""
    assert a["hypotheses_sha256"] == b["hypotheses_sha256"]
    assert a["utterances"] == b["utterances"]
    assert a["identity"] == b["identity"] and a["model"]["sha256"] == b["model"]["sha256"]
    assert a["dataset"]["utterance_ids_sha256"] == b["dataset"]["utterance_ids_sha256"]
    timing = {"wall_seconds", "rtf", "rtfx", "peak_rss_bytes"}
    assert {k: v for k, v in a["metrics"].items() if k not in timing} == {k: v for k, v in b["metrics"].items() if k not in timing}


# -- real runs, killed -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def short_data(data_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("short")
    copy_utterances(data_dir, root, SHORT_IDS)
    return root


@pytest.fixture(scope="module")
def uninterrupted(tiny_en, short_data, tmp_path_factory) -> dict:
    """The reference: the same run as the CLI commands below, carried out without interruption."""
    out = tmp_path_factory.mktemp("reference") / "r.json"
    spec = RunSpec(data_dir=str(short_data), device="none", batch_size=1, threads=1, output=str(out))
    assert run_benchmark(spec).status == "complete"
    return json.loads(out.read_text())


def cli_run(data: Path, out: Path, *extra: str) -> subprocess.Popen:
    argv = [sys.executable, "-m", "qbench.cli", "run", "--data-dir", str(data), "--device", "none", "--batch-size", "1",
            "--threads", "1", "-o", str(out), "-q", *extra]
    return subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_records(proc: subprocess.Popen, journal: Path, at_least: int, timeout: float = 120) -> bool:
    """Poll until the journal has `at_least` records (and, for 0, exists); False if the run ended first."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        if journal.exists() and journal_records(journal) >= at_least:
            return True
        assert time.monotonic() < deadline, "the run never got there"
        time.sleep(0.005)
    return False


def test_kill_9_at_random_moments_then_rerun_gives_the_uninterrupted_result(short_data, uninterrupted, tmp_path):
    out = tmp_path / "r.json"
    journal = journal_path(out)
    rng = random.Random(20240611)
    # kill when the journal has 0 records (mid first batch), some, then all six (before the
    # result is final), each after a random pause; every rerun resumes the one before
    targets = [(0, rng.uniform(0.0, 1.0)), (rng.randint(1, 4), rng.uniform(0.0, 1.0)), (len(SHORT_IDS), 0.0)]
    killed = []
    for at_least, pause in targets:
        proc = cli_run(short_data, out)
        if wait_for_records(proc, journal, at_least):
            time.sleep(pause if at_least < len(SHORT_IDS) else 0.0)
            proc.send_signal(signal.SIGKILL)
        proc.communicate()
        killed.append(proc.returncode == -signal.SIGKILL)
        if proc.returncode == -signal.SIGKILL:
            header, records = read_journal(journal)  # a torn last line is dropped, never an error
            assert header.identity == uninterrupted["identity"]
            if out.exists():  # the result file never claims an utterance the journal lacks
                on_disk = json.loads(out.read_text())
                # complete only when the kill came after the final write, with every record in
                assert on_disk["status"] == "running" or len(records) == len(SHORT_IDS)
                assert {u["id"] for u in on_disk["utterances"]} <= set(records)
    # the first two kills landed in a live run (the last one may find the run just finished)
    assert killed[:2] == [True, True]
    proc = cli_run(short_data, out)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    final = json.loads(out.read_text())
    assert final["status"] == "complete" and not journal.exists()
    same_result(final, uninterrupted)


def test_sigterm_records_interrupted_and_the_rerun_completes(short_data, uninterrupted, tmp_path):
    ids = tmp_path / "ids.txt"
    ids.write_text("\n".join(SHORT_IDS[:3]) + "\n")
    out = tmp_path / "r.json"
    proc = cli_run(short_data, out, "--utterance-ids", str(ids))
    assert wait_for_records(proc, journal_path(out), 1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "interrupted by SIGTERM" in err and "resume" in err
    r = json.loads(out.read_text())
    assert r["status"] == "interrupted" and "SIGTERM" in r["error"]
    _, records = read_journal(journal_path(out))
    assert 1 <= len(records) < 3 and {u["id"] for u in r["utterances"]} <= set(records)  # journal intact

    proc = cli_run(short_data, out, "--utterance-ids", str(ids))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "resuming from" in err
    r = json.loads(out.read_text())
    assert r["status"] == "complete" and r["resumed_utterances"] == len(records)
    reference = {u["id"]: u for u in uninterrupted["utterances"]}
    assert r["utterances"] == [reference[i] for i in SHORT_IDS[:3]]


# -- in process, with a fake transcription ---------------------------------------------------------


@pytest.fixture
def fake_model(tiny_en, monkeypatch) -> list[list[int]]:
    """Whisper.transcribe answers instantly, from the audio; returns the batches it was given (sample counts)."""
    batches: list[list[int]] = []

    def transcribe(self, audios):
        batches.append([len(a) for a in audios])
        return [f"heard {len(a)} samples" for a in audios]

    monkeypatch.setattr(Whisper, "transcribe", transcribe)
    return batches


@pytest.fixture
def four(data_dir, tmp_path) -> list[Path]:
    return copy_utterances(data_dir, tmp_path / "data", n=4)


def spec_for(tmp_path: Path, **kw) -> RunSpec:
    return RunSpec(**{"data_dir": str(tmp_path / "data"), "device": "none", "batch_size": 1, "threads": 1,
                      "output": str(tmp_path / "r.json"), **kw})


def test_sigint_records_interrupted_exits_130_and_the_rerun_resumes(fake_model, four, tmp_path, monkeypatch, capsys):
    plain = Whisper.transcribe

    def interrupted_after_two(self, audios):
        if len(fake_model) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, caught by cmd_run's handler
        return plain(self, audios)

    monkeypatch.setattr(Whisper, "transcribe", interrupted_after_two)
    out = tmp_path / "r.json"
    argv = ["run", "--data-dir", str(tmp_path / "data"), "--device", "none", "--batch-size", "1", "-o", str(out), "-q"]
    # pytest's own handler, or SIG_IGN where the suite was started in the background
    before = signal.getsignal(signal.SIGINT)
    assert main(argv) == 130
    assert "interrupted by SIGINT" in capsys.readouterr().err
    r = RunResult.read(out)
    assert r.status == "interrupted" and len(r.utterances) == 2
    assert signal.getsignal(signal.SIGINT) is before  # cmd_run put the handler back

    monkeypatch.setattr(Whisper, "transcribe", plain)
    assert main(argv) == 0
    r = RunResult.read(out)
    assert r.status == "complete" and r.resumed_utterances == 2 and len(r.utterances) == 4
    assert len(fake_model) == 2 + 2  # the signal came as the third batch started: it and the fourth ran on resume
    assert not journal_path(out).exists()


def test_a_complete_result_is_returned_without_recomputing(fake_model, four, tmp_path):
    spec = spec_for(tmp_path)
    first = run_benchmark(spec)
    before = Path(spec.output).read_bytes()
    notes = []

    class Notes:
        def __getattr__(self, name):
            return lambda *a: notes.append(a[0]) if name == "note" else None

    again = run_benchmark(spec.model_copy(update={"threads": 2, "output": spec.output}), Notes())
    assert len(fake_model) == 4  # nothing transcribed the second time
    assert again == first and Path(spec.output).read_bytes() == before
    assert any("already holds this run's complete result" in n for n in notes)


def test_a_journal_left_beside_a_complete_result_is_spent_not_resumed(fake_model, four, tmp_path, monkeypatch):
    # a kill between the final write and the journal's removal leaves both files behind
    spec = spec_for(tmp_path)
    with monkeypatch.context() as patch:
        patch.setattr(RunJournal, "discard", lambda self: None)
        first = run_benchmark(spec)
    assert journal_path(Path(spec.output)).exists()
    again = run_benchmark(spec)
    assert again == first and len(fake_model) == 4
    assert not journal_path(Path(spec.output)).exists()


def test_a_different_spec_refuses_in_one_line_and_force_keeps_the_old_file(fake_model, four, tmp_path, capsys):
    out = tmp_path / "r.json"
    argv = ["run", "--data-dir", str(tmp_path / "data"), "--device", "none", "--batch-size", "1", "-o", str(out), "-q"]
    assert main([*argv, "--limit", "2"]) == 0
    before = out.read_bytes()
    capsys.readouterr()
    assert main([*argv, "--limit", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(out) in err and "different run" in err and "--force" in err
    assert out.read_bytes() == before

    assert main([*argv, "--limit", "1", "--force"]) == 0
    kept = [p for p in tmp_path.glob("r.*.json")]
    assert len(kept) == 1 and kept[0].read_bytes() == before
    assert "kept" in capsys.readouterr().err
    assert len(RunResult.read(out).utterances) == 1


def test_a_bad_first_file_never_replaces_a_complete_result(fake_model, four, tmp_path, capsys):
    out = tmp_path / "r.json"
    argv = ["run", "--data-dir", str(tmp_path / "data"), "--device", "none", "--batch-size", "1", "-o", str(out), "-q"]
    assert main(argv) == 0
    before = out.read_bytes()
    four[0].write_bytes(b"not audio")
    assert main(argv) == 0  # the same spec: the complete result stands
    assert out.read_bytes() == before
    assert main([*argv, "--limit", "3"]) == 2  # another spec: refused
    assert out.read_bytes() == before
    assert main([*argv, "--limit", "3", "--force"]) == 2  # forced: fails on the bad file, old result kept aside
    assert RunResult.read(out).status == "failed"
    assert [p.read_bytes() for p in tmp_path.glob("r.*.json")] == [before]


def test_other_weights_are_not_resumed(fake_model, four, tmp_path):
    spec = spec_for(tmp_path)
    run_benchmark(spec)
    doc = json.loads(Path(spec.output).read_text())
    doc["status"], doc["model"]["sha256"] = "interrupted", "0" * 64
    Path(spec.output).write_text(json.dumps(doc))
    with pytest.raises(OutputInUseError, match="other weights"):
        run_benchmark(spec)


def test_a_result_without_identity_is_not_overwritten(fake_model, four, tmp_path):
    spec = spec_for(tmp_path)
    Path(spec.output).write_text(json.dumps({"status": "complete"}))
    with pytest.raises(OutputInUseError, match="without a run identity"):
        run_benchmark(spec)


def test_journaled_audio_that_changed_is_transcribed_again(fake_model, four, tmp_path):
    spec = spec_for(tmp_path)
    first = run_benchmark(spec)
    # an unfinished run of this spec, then the second file changes on disk
    doc = json.loads(Path(spec.output).read_text())
    doc["status"] = "interrupted"
    Path(spec.output).write_text(json.dumps(doc))
    audio, rate = sf.read(four[1], dtype="float32")
    sf.write(four[1], audio[: len(audio) // 2], rate, format="FLAC")
    fake_model.clear()
    result = run_benchmark(spec)  # no journal left: resumes from the result file's utterances
    assert fake_model == [[len(audio) // 2]]  # only the changed one
    changed = next(u for u in result.utterances if u.id == four[1].stem)
    assert changed.audio_sha256 == audio_digest(sf.read(four[1], dtype="float32")[0]) != first.utterances[1].audio_sha256
    assert result.resumed_utterances == 3
    assert any("different audio" in w and four[1].stem in w for w in result.warnings)


def test_a_partly_journaled_batch_is_transcribed_whole(fake_model, four, tmp_path):
    # batches are cut as in an uninterrupted run: [0, 1] [2, 3]; the journal of a run killed
    # while writing the second batch's lines holds utterance 2 but not 3
    spec = spec_for(tmp_path, batch_size=2)
    done = run_benchmark(spec)
    header = JournalHeader(identity=spec.identity(), model_sha256=done.model.sha256, created_at=done.created_at,
                           spec=spec.identity_fields())
    records = [JournalRecord(id=u.id, audio_sha256=u.audio_sha256, duration=u.duration, hypothesis=u.hypothesis,
                             wall_seconds=0.0) for u in done.utterances[:3]]
    RunJournal.start(journal_path(Path(spec.output)), header, records).close()
    Path(spec.output).write_text(done.model_copy(update={"status": "interrupted", "utterances": done.utterances[:2]})
                                 .model_dump_json())
    fake_model.clear()
    again = run_benchmark(spec)
    assert fake_model == [[int(u.duration * 16000) for u in done.utterances[2:]]]
    assert again.utterances == done.utterances and again.resumed_utterances == 2


def test_a_torn_last_journal_line_is_dropped_and_a_corrupt_one_named(tmp_path):
    header = JournalHeader(identity="i", model_sha256="w", created_at="now", spec={})
    record = JournalRecord(id="1-2-0000", audio_sha256="a", duration=1.0, hypothesis="x", wall_seconds=0.1)
    path = tmp_path / "r.json.journal"
    RunJournal.start(path, header, [record]).close()
    with path.open("ab") as f:
        f.write(record.model_copy(update={"id": "1-2-0001"}).model_dump_json().encode()[:20])  # kill -9 mid-write
    assert read_journal(path) == (header, {"1-2-0000": record})
    path.write_text(header.model_dump_json() + "\n{oops\n" + record.model_dump_json() + "\n")
    with pytest.raises(JournalError, match=r"r\.json\.journal:2: corrupt journal line"):
        read_journal(path)
