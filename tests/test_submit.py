"""`qbench run --submit` writes only what `qbench validate` accepts: it scores the committed
entries' utterances by default, refuses other ones before running, and checks the would-be
entry with validate's own functions before writing it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import qbench.cli as cli
from qbench.cli import main
from qbench.leaderboard.validate import validate_leaderboards


@pytest.fixture(scope="module")
def board(tiny_en, data_dir, tmp_path_factory) -> Path:
    """A leaderboard holding one committed entry: the float baseline on the first 2 utterances."""
    root = tmp_path_factory.mktemp("lb")
    out = root.parent / "fp-result.json"
    assert main(["run", "--limit", "2", "--data-dir", str(data_dir), "--submit", "--leaderboards", str(root),
                 "-o", str(out), "-q"]) == 0
    assert validate_leaderboards(root, data_dir) == (1, [])
    return root


def _ids(path: Path) -> list[str]:
    return [u["id"] for u in json.loads(path.read_text())["utterances"]]


def test_submit_on_other_utterances_is_refused_before_running(board, data_dir, tmp_path, capsys):
    before = sorted(board.rglob("*.json"))
    out = tmp_path / "r.json"
    assert main(["run", "--limit", "3", "--data-dir", str(data_dir), "--plugin", "rtn", "--set", "bits=4", "--submit",
                 "--leaderboards", str(board), "-o", str(out), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "--submit: this run (--limit 3) would score 3 utterances, other than the 2" in err and "nothing was run" in err
    assert not out.exists() and sorted(board.rglob("*.json")) == before


def test_submit_without_a_selection_scores_the_committed_utterances(board, data_dir, tmp_path, capsys):
    assert main(["run", "--data-dir", str(data_dir), "--plugin", "rtn", "--set", "bits=4", "--submit",
                 "--leaderboards", str(board), "-o", str(tmp_path / "r.json"), "-q"]) == 0
    err = capsys.readouterr().err
    assert "--submit: scoring the 2 utterances of the committed entries" in err
    table = board / "whisper-tiny.en" / "test-clean"
    (new,) = [p for p in table.glob("*.json") if p.name != "fp.json"]
    assert _ids(new) == _ids(table / "fp.json")
    assert "checked as `qbench validate` checks it" in err
    n, problems = validate_leaderboards(board, data_dir)
    assert (n, problems) == (2, [])


def test_an_entry_validate_would_reject_is_not_written(board, data_dir, tmp_path, monkeypatch, capsys):
    """With the early check out of the way, the check before writing still refuses the entry,
    with validate's own words."""
    monkeypatch.setattr(cli, "plan_submission", lambda spec, root, progress: spec)
    before = sorted(board.rglob("*.json"))
    assert main(["run", "--limit", "1", "--data-dir", str(data_dir), "--plugin", "rtn", "--set", "bits=3", "--submit",
                 "--leaderboards", str(board), "-o", str(tmp_path / "r.json"), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: --submit: no entry written, `qbench validate` would reject it: ")
    assert f"scored other utterances than {board / 'whisper-tiny.en' / 'test-clean' / 'fp.json'}" in err
    assert "/tmp/tmp" not in err.replace(str(board), "")  # paths as they would be, not the scratch copy's
    assert sorted(board.rglob("*.json")) == before
    assert (tmp_path / "r.json").is_file()  # the run's own result is kept


def test_submission_problems_are_validates(board, data_dir):
    from qbench.leaderboard.entry import read_entry

    entry = read_entry(board / "whisper-tiny.en" / "test-clean" / "fp.json")
    assert cli.submission_problems(entry, board, data_dir) == []
    tampered = entry.model_copy(update={"wer": entry.wer + 0.01})
    (problem,) = cli.submission_problems(tampered, board, data_dir)
    assert problem.startswith(f"{board / 'whisper-tiny.en' / 'test-clean' / 'fp.json'}: wer: WER ")
