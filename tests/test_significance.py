"""The paired bootstrap of WER differences, and the page column that shows it.

The bootstrap is checked against cases a reader can work out by hand, against a slow
pure-Python reference drawing the documented index matrix, and for what pairing by id promises
(input order never matters, only shared ids are compared, none shared is refused)."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import qbench.leaderboard.significance as significance
from qbench.leaderboard.entry import (
    LeaderboardEntry,
    read_entry,
    subset_score,
    write_entry,
)
from qbench.leaderboard.page import load_entries, md, render_markdown, wer_points
from qbench.leaderboard.significance import (
    PairingError,
    entry_wer_difference,
    paired_wer_difference,
    speaker_of,
)

COMMITTED = Path(__file__).resolve().parents[1] / "leaderboards" / "whisper-tiny.en" / "test-clean"
RTN8 = "rtn-bits8-group_size128-symmetrictrue.json"
RTN4 = "nf4-bits4-group_size64.json"  # a committed 4-bit entry


@dataclass(frozen=True)
class Utt:
    id: str
    word_errors: int
    words: int


def _system(errors: list[int], words: list[int], ids: list[str] | None = None) -> list[Utt]:
    ids = ids or [f"{1000 + i // 5}-1-{i:04d}" for i in range(len(errors))]
    return [Utt(i, e, w) for i, e, w in zip(ids, errors, words)]


def _random_pair(n: int, seed: int = 1) -> tuple[list[Utt], list[Utt]]:
    """A baseline and an entry that is a little worse on some utterances, better on others."""
    rng = np.random.default_rng(seed)
    words = rng.integers(1, 40, n).tolist()
    base = rng.integers(0, 4, n).tolist()
    entry = [max(0, b + int(d)) for b, d in zip(base, rng.integers(-1, 3, n))]
    ids = [f"{100 + i % 7}-{i % 3}-{i:04d}" for i in range(n)]  # 7 speakers
    return _system(entry, words, ids), _system(base, words, ids)


# -- cases worked out by hand ---------------------------------------------------------------------


def test_identical_systems_differ_by_exactly_zero_and_are_not_significant():
    a = _system([1, 0, 3, 2, 0, 5], [10, 8, 12, 9, 7, 20])
    d = paired_wer_difference(a, list(a))
    assert (d.difference, d.low, d.high) == (0.0, 0.0, 0.0)
    assert not d.significant
    assert d.entry_wer == d.baseline_wer == 11 / 66
    assert (d.n_units, d.n_utterances, d.unpaired_utterances, d.unit) == (6, 6, 0, "utterance")


def test_an_error_more_on_every_utterance_is_a_significant_increase_and_the_reverse_a_decrease():
    words = [10] * 20
    base = _system([i % 3 for i in range(20)], words)
    worse = _system([i % 3 + 1 for i in range(20)], words)
    d = paired_wer_difference(worse, base)
    # every resample has exactly one more error per 10 words: the difference is 0.1 in all of them
    assert d.difference == pytest.approx(0.1) and d.low == pytest.approx(0.1) and d.high == pytest.approx(0.1)
    assert d.significant
    reverse = paired_wer_difference(base, worse)
    assert reverse.difference == pytest.approx(-0.1) and reverse.high < 0 and reverse.significant


def test_two_utterances_give_the_enumerable_bootstrap_interval():
    """Units u0 (entry 1 error, baseline 0, 10 words) and u1 (0 and 0, 10 words): the four
    equally likely resamples {u0,u0}, {u0,u1}, {u1,u0}, {u1,u1} give differences 0.1, 0.05, 0.05
    and 0. Each extreme has probability 1/4, far more than the 2.5 % each tail cuts, so the 95 %
    interval is [0, 0.1], which includes 0: not significant, although the point difference is 0.05."""
    entry = _system([1, 0], [10, 10], ["1-1-0", "2-1-0"])
    base = _system([0, 0], [10, 10], ["1-1-0", "2-1-0"])
    d = paired_wer_difference(entry, base)
    assert d.difference == pytest.approx(0.05)
    assert d.low == 0.0 and d.high == pytest.approx(0.1)
    assert not d.significant


def _reference(entry: list[Utt], base: list[Utt], n_resamples: int, seed: int, unit: str) -> tuple[float, float, float]:
    """The same bootstrap in plain Python: units in sorted id order, resample r = row r of the
    documented index matrix, corpus WER of each system over the resampled units."""
    a = {u.id: u for u in entry}
    b = {u.id: u for u in base}
    shared = sorted(a.keys() & b.keys())
    key = speaker_of if unit == "speaker" else (lambda i: i)
    units: dict[str, list[int]] = {}
    for i in shared:
        sums = units.setdefault(key(i), [0, 0, 0, 0])
        for k, value in enumerate((a[i].word_errors, a[i].words, b[i].word_errors, b[i].words)):
            sums[k] += value
    rows = [units[k] for k in sorted(units)]
    index = np.random.default_rng(seed).integers(0, len(rows), size=(n_resamples, len(rows)))
    diffs = []
    for r in range(n_resamples):
        ea = wa = eb = wb = 0
        for j in index[r].tolist():
            ea, wa, eb, wb = ea + rows[j][0], wa + rows[j][1], eb + rows[j][2], wb + rows[j][3]
        diffs.append((ea / wa if wa else 0.0) - (eb / wb if wb else 0.0))
    ea, wa, eb, wb = (sum(r[k] for r in rows) for k in range(4))
    low, high = np.percentile(diffs, [2.5, 97.5])
    return ea / wa - eb / wb, float(low), float(high)


@pytest.mark.parametrize("unit", ["utterance", "speaker"])
def test_the_vectorized_bootstrap_matches_a_pure_python_reference(unit, monkeypatch):
    entry, base = _random_pair(40)
    expected = _reference(entry, base, 300, 7, unit)
    whole = paired_wer_difference(entry, base, n_resamples=300, seed=7, unit=unit)
    assert (whole.difference, whole.low, whole.high) == pytest.approx(expected, abs=1e-12)
    # drawn in many small chunks of rows, the draws (and so the result) are the same
    monkeypatch.setattr(significance, "_CHUNK_ELEMENTS", 50)
    assert paired_wer_difference(entry, base, n_resamples=300, seed=7, unit=unit) == whole


# -- pairing by id ----------------------------------------------------------------------------


def test_pairing_is_by_id_whatever_the_order():
    entry, base = _random_pair(60)
    d = paired_wer_difference(entry, base, n_resamples=2000)
    shuffled_entry, shuffled_base = entry[:], base[:]
    random.Random(3).shuffle(shuffled_entry)
    random.Random(4).shuffle(shuffled_base)
    for unit in ("utterance", "speaker"):
        assert paired_wer_difference(shuffled_entry, shuffled_base, n_resamples=2000, unit=unit) == \
            paired_wer_difference(entry, base, n_resamples=2000, unit=unit)
    assert d.significant == (d.low > 0 or d.high < 0)


def test_only_the_shared_ids_are_compared_and_their_number_reported():
    entry, base = _random_pair(30)
    extra_entry = entry + [Utt("999-1-0000", 50, 5)]
    extra_base = [Utt("998-1-0000", 0, 5)] + base
    d = paired_wer_difference(extra_entry, extra_base, n_resamples=1000)
    assert (d.n_utterances, d.unpaired_utterances) == (30, 2)
    assert d.model_dump(exclude={"unpaired_utterances"}) == \
        paired_wer_difference(entry, base, n_resamples=1000).model_dump(exclude={"unpaired_utterances"})


def test_entries_that_share_no_utterance_are_refused_naming_both():
    entry = _system([1, 2], [5, 5], ["1-1-0", "1-1-1"])
    base = _system([1, 2], [5, 5], ["2-1-0", "2-1-1"])
    with pytest.raises(PairingError) as info:
        paired_wer_difference(entry, base, entry_name="m/test-clean/rtn-bits4", baseline_name="m/test-clean/fp")
    message = str(info.value)
    assert "m/test-clean/rtn-bits4" in message and "m/test-clean/fp" in message and "share no utterance id" in message
    assert "\n" not in message


def test_an_id_listed_twice_is_refused():
    entry = _system([1, 2], [5, 5], ["1-1-0", "1-1-0"])
    with pytest.raises(PairingError, match="lists utterance '1-1-0' twice"):
        paired_wer_difference(entry, _system([0], [5], ["1-1-0"]), entry_name="the entry")


# -- speakers ---------------------------------------------------------------------------------


def test_speakers_are_the_first_id_field_and_are_resampled_whole():
    assert speaker_of("1089-134686-0000") == "1089"
    # speaker 1 has two chapters, speaker 22 one: two clusters
    entry = _system([1, 0, 4, 2], [10, 6, 9, 5], ["1-2-0000", "1-3-0001", "22-2-0000", "22-2-0001"])
    base = _system([0, 0, 1, 2], [10, 6, 9, 5], ["1-2-0000", "1-3-0001", "22-2-0000", "22-2-0001"])
    d = paired_wer_difference(entry, base, unit="speaker")
    assert (d.unit, d.n_units, d.n_utterances) == ("speaker", 2, 4)
    # the same as resampling one pseudo-utterance per speaker holding that speaker's sums
    merged_entry = _system([1, 6], [16, 14], ["1-0-0", "22-0-0"])
    merged_base = _system([0, 3], [16, 14], ["1-0-0", "22-0-0"])
    as_utterances = paired_wer_difference(merged_entry, merged_base)
    assert (d.difference, d.low, d.high) == (as_utterances.difference, as_utterances.low, as_utterances.high)
    # two speakers: resamples {1,1}, {1,22}, {22,1}, {22,22}, so the interval spans both speakers' own differences
    assert d.low == pytest.approx(1 / 16) and d.high == pytest.approx(3 / 14)


# -- determinism and speed --------------------------------------------------------------------


def test_the_result_is_a_function_of_the_seed():
    entry, base = _random_pair(80)
    first = paired_wer_difference(entry, base, seed=5)
    assert paired_wer_difference(entry, base, seed=5) == first
    other = paired_wer_difference(entry, base, seed=6)
    assert other.difference == first.difference and (other.low, other.high) != (first.low, first.high)


def test_ten_thousand_resamples_of_a_thousand_utterances_take_well_under_a_second():
    entry, base = _random_pair(1000)
    paired_wer_difference(entry, base, n_resamples=100)  # warm up
    start = time.perf_counter()
    paired_wer_difference(entry, base)
    # about 0.2 s on one core; the bound leaves room for the other jobs on a shared machine
    assert time.perf_counter() - start < 2.0


# -- the page ---------------------------------------------------------------------------------


def _as_entry_with_errors(path: Path, baseline: LeaderboardEntry, extra_errors) -> LeaderboardEntry:
    """The committed entry at `path` holding the baseline's utterances (same ids and hypotheses)
    with `extra_errors(index)` more word errors on each, its scores recomputed so it validates."""
    entry = read_entry(path)
    utterances = [u.model_copy(update={"word_errors": u.word_errors + extra_errors(i)})
                  for i, u in enumerate(baseline.utterances)]
    score = subset_score(utterances)
    return entry.model_copy(update={
        "utterances": utterances, "dataset": baseline.dataset, "hypotheses_sha256": baseline.hypotheses_sha256,
        "subsets": {baseline.dataset.subset: score}, "wer": score.wer, "cer": score.cer, "calibration": None,
    })


@pytest.fixture
def board(tmp_path: Path) -> tuple[Path, dict[str, LeaderboardEntry]]:
    """The committed float baseline, an 8-bit entry one word error worse on a single utterance
    (not significant) and a 4-bit entry one worse on every utterance (significant)."""
    root = tmp_path / "leaderboards"
    fp = read_entry(COMMITTED / "fp.json")
    entries = {
        "fp": fp,
        "close": _as_entry_with_errors(COMMITTED / RTN8, fp, lambda i: int(i == 0)),
        "worse": _as_entry_with_errors(COMMITTED / RTN4, fp, lambda i: 1),
    }
    for e in entries.values():
        write_entry(root, e)
    return root, entries


def _row(page: str, file_name: str) -> list[str]:
    line = next(line for line in page.splitlines() if line.startswith("| ") and f"/{file_name})" in line)
    return [cell.strip() for cell in line.strip("|").split(" | ")]


def test_the_page_shows_the_difference_to_the_float_baseline_and_marks_noise(board):
    root, entries = board
    page = render_markdown(load_entries(root))
    header = next(line for line in page.splitlines() if line.startswith("| class |"))
    cells = [c.strip() for c in header.strip("|").split(" | ")]
    assert cells[4:9] == ["bits/weight", "bits/param (all)", "WER %", "ΔWER vs float (95 % CI)", "CER %"]
    delta = cells.index("ΔWER vs float (95 % CI)")

    fp, close, worse = _row(page, "fp.json"), _row(page, RTN8), _row(page, RTN4)
    assert len(fp) == len(close) == len(worse) == len(cells) == 13
    assert fp[delta] == "-"
    close_diff = entry_wer_difference(entries["close"], entries["fp"])
    worse_diff = entry_wer_difference(entries["worse"], entries["fp"])
    assert not close_diff.significant and worse_diff.significant
    assert close[delta] == md(wer_points(close_diff)) and close[delta].endswith(" (n.s.)")
    assert worse[delta] == md(wer_points(worse_diff)) and "(n.s.)" not in worse[delta]
    # one error more on each of n utterances: the WER points, and every resample, move by 100 * n / words
    words, n = entries["fp"].subsets["test-clean"].words, len(entries["fp"].utterances)
    assert worse[delta].startswith(f"+{100 * n / words:.2f} \\[+")
    assert "paired bootstrap over utterances (10,000 resamples, seed 0" in page
    assert "(n.s.) marks a difference whose interval includes 0" in page
    # the speaker-level interval, in the detail list under the table
    speakers = entry_wer_difference(entries["close"], entries["fp"], unit="speaker")
    assert f"with the {speakers.n_units} speakers resampled instead" in page
    assert f"- {md(entries['close'].label)}: {md(wer_points(speakers))}" in page


def test_a_table_without_a_float_baseline_has_no_difference_column(board):
    root, _ = board
    (root / "whisper-tiny.en" / "test-clean" / "fp.json").unlink()
    page = render_markdown(load_entries(root))
    assert "ΔWER" not in page and "(n.s.)" not in page
    assert len(_row(page, RTN4)) == 12


def test_wer_points_never_shows_minus_zero():
    d = significance.WerDifference(unit="utterance", n_units=3, n_utterances=3, unpaired_utterances=0, n_resamples=10,
                                   seed=0, entry_wer=0.1, baseline_wer=0.1, difference=-1e-9, low=-0.0012, high=0.00004,
                                   significant=False)
    assert wer_points(d) == "+0.00 [-0.12, +0.00] (n.s.)"
