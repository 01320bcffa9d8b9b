"""`qbench errors`: the error kinds of an entry (substitutions, deletions, insertions, empty,
cut-short and looping hypotheses), re-aligned against the reference transcripts."""

from __future__ import annotations

from pathlib import Path

from qbench.cli import main
from qbench.leaderboard.entry import read_entry
from qbench.leaderboard.error_analysis import analyse_entry, has_loop

FP = Path(__file__).parent.parent / "leaderboards" / "whisper-tiny.en" / "test-clean" / "fp.json"


def test_a_loop_is_a_short_ngram_repeated_back_to_back():
    assert has_loop("the cat sat on the mat mat mat mat".split())
    assert has_loop("and then and then and then and then it ended".split())
    assert not has_loop("the the cat the the".split())
    assert not has_loop([])


def test_breakdown_counts_each_kind_against_the_references():
    entry = read_entry(FP)
    first, second, third = entry.utterances[:3]
    refs = {first.id: "a b c d", second.id: "e f g h i j", third.id: "k l m"}
    first.hypothesis, second.hypothesis, third.hypothesis = "a x c d", "e", "k l m m m m m"
    entry.utterances = [first, second, third]
    b = analyse_entry(entry, refs)
    assert (b.utterances, b.words) == (3, 13)
    assert (b.substitutions, b.deletions, b.insertions) == (1, 5, 4)
    assert (b.empty_hypotheses, b.truncated_hypotheses, b.looping_hypotheses) == (0, 1, 1)
    assert b.errors_in_loops == 4 / 10


def test_qbench_errors_prints_the_table(data_dir, capsys):
    assert main(["errors", str(FP), "--data-dir", str(data_dir)]) == 0
    out = capsys.readouterr().out
    assert "loops" in out and "fp" in out
