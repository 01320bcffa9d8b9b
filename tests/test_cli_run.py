"""`qbench run` end to end on real weights and real audio, and its failure modes."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import soundfile as sf

from qbench.cli import main
from qbench.data.librispeech import utterance_digest


def test_run_writes_a_complete_result(tiny_en, data_dir, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["run", "--limit", "3", "--data-dir", str(data_dir), "-o", str(out), "-q"]) == 0
    r = json.loads(out.read_text())
    assert r["status"] == "complete" and r["error"] is None
    ids = [u["id"] for u in r["utterances"]]
    assert ids == sorted(ids) and len(ids) == 3 == r["dataset"]["utterance_count"]
    assert r["dataset"]["utterance_ids_sha256"] == utterance_digest(ids)
    assert r["dataset"]["partial_subset"] is True  # 1000 of 2620 are shared
    assert r["model"]["sha256"] == tiny_en.sha256
    m = r["metrics"]
    assert 0 <= m["wer"] < 0.2 and m["audio_seconds"] > 5 and m["model_bytes"] == tiny_en.model.store.stored_bytes()
    assert "WER" in capsys.readouterr().out


def _copy_subset(data_dir, tmp_path, n):
    """A private copy of the first n test-clean utterances, to break on purpose."""
    from qbench.data.librispeech import list_utterances

    utts = list_utterances(data_dir, "test-clean", limit=n)
    chapter = tmp_path / "LibriSpeech" / "test-clean" / utts[0].speaker / utts[0].chapter
    chapter.mkdir(parents=True)
    lines = []
    for u in utts:
        shutil.copy(u.path, chapter / u.path.name)
        lines.append(f"{u.id} {u.transcript}")
    (chapter / f"{utts[0].speaker}-{utts[0].chapter}.trans.txt").write_text("\n".join(lines) + "\n")
    return [chapter / u.path.name for u in utts]


def test_bad_audio_mid_run_names_the_file_and_keeps_finished_utterances(tiny_en, data_dir, tmp_path, capsys):
    files = _copy_subset(data_dir, tmp_path, 3)
    sf.write(files[2], np.zeros(8000, dtype=np.float32), 8000, format="FLAC")  # wrong rate
    out = tmp_path / "r.json"
    assert main(["run", "--data-dir", str(tmp_path), "--batch-size", "1", "-o", str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert files[2].name in err and "8000" in err
    r = json.loads(out.read_text())
    assert r["status"] == "failed" and files[2].name in r["error"]
    assert [u["id"] for u in r["utterances"]] == [f.stem for f in files[:2]]
    assert r["metrics"]["utterances"] == 2


def test_missing_data_names_every_option(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("QBENCH_DATA_DIR", str(tmp_path / "nowhere"))
    assert main(["run", "--limit", "1", "-q"]) == 2
    assert "nowhere" in capsys.readouterr().err


def test_unknown_model_lists_known_ones(capsys):
    assert main(["run", "--model", "whisper-huge", "-q"]) == 2
    assert "whisper-tiny.en" in capsys.readouterr().err


def test_missing_weights_path_is_named(tmp_path, capsys):
    assert main(["run", "--weights", str(tmp_path / "absent"), "-q", "--limit", "1"]) == 2
    assert "absent" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["models"]])
def test_models_lists_the_registry(argv, capsys):
    assert main(argv) == 0
    assert "whisper-tiny.en" in capsys.readouterr().out


def test_threads_change_no_transcript(tiny_en, data_dir, tmp_path, monkeypatch):
    from qbench.models import parallel

    monkeypatch.delenv("QBENCH_THREADS", raising=False)
    runs = {}
    for threads in ("1", "3"):
        out = tmp_path / f"t{threads}.json"
        assert main(["run", "--limit", "2", "--threads", threads, "--data-dir", str(data_dir), "-o", str(out), "-q"]) == 0
        runs[threads] = json.loads(out.read_text())
    assert runs["1"]["machine"]["threads"] == 1 and runs["3"]["machine"]["threads"] == 3
    assert runs["1"]["hypotheses_sha256"] == runs["3"]["hypotheses_sha256"]
    assert main(["run", "--limit", "1", "--threads", "0", "-q"]) == 2


def test_errors_stay_on_one_line_when_piped_at_80_columns(tmp_path):
    """rich wraps at the console width (80 when piped, or $COLUMNS): an error must not be wrapped."""
    import os
    import subprocess
    import sys

    absent = tmp_path / ("a-folder-name-long-enough-to-pass-eighty-columns-" * 3) / "absent"
    env = {**os.environ, "COLUMNS": "80", "TERM": "dumb"}
    proc = subprocess.run([sys.executable, "-m", "qbench.cli", "run", "--weights", str(absent), "--limit", "1", "-q"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(absent) in lines[0] and len(lines[0]) > 160
