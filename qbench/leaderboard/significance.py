"""Is an entry's WER really different from its baseline's? A paired bootstrap says.

Two entries scored on the same 200 utterances can differ by a few tenths of a WER point by
chance alone: which utterances were drawn decides as much as the quantizer. The leaderboard
therefore shows each difference with a 95 % percentile interval from a paired bootstrap:
resample the scored units with replacement, recompute both systems' corpus-level WER
(sum of word errors / sum of reference words) on the *same* resample, and take the 2.5th and
97.5th percentiles of the differences. Pairing is what makes it sharp: an utterance that is hard
for one system is usually hard for the other, and resampling both together cancels that out.

Units are utterances or speakers. LibriSpeech ids are `speaker-chapter-utterance`; one speaker's
utterances are not independent (one voice, one microphone, one book), so resampling speakers as
clusters, each with all of their utterances, respects that; with few speakers (the committed
200-utterance sample holds nine) the cluster interval is itself rough, which is why the page
shows it beside the utterance-level one rather than instead of it.

The draws are a contract, so that anyone can reproduce an interval: resample `r` takes units
`default_rng(seed).integers(0, n_units, size=(n_resamples, n_units))[r]`, units ordered by
their sorted id (the input order never matters). The matrix is drawn in chunks of rows, which
numpy's generator produces as the same stream, and each chunk is turned into per-unit counts
(`bincount`) multiplied by the per-unit error and word arrays: 10,000 resamples of 1,000
utterances take a fraction of a second.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from qbench.errors import QBenchError
from qbench.leaderboard.entry import LeaderboardEntry

Unit = Literal["utterance", "speaker"]
CONFIDENCE = 0.95
N_RESAMPLES = 10_000
SEED = 0
#: elements of the index matrix drawn at a time (8 MiB of int64): bounds memory for any size
_CHUNK_ELEMENTS = 1 << 20


class PairingError(QBenchError, ValueError):
    """Two entries whose utterances cannot be paired (none shared, or an id listed twice)."""


class ScoredUtterance(Protocol):
    """What the bootstrap reads of an utterance (an `EntryUtterance`, or a run's `UtteranceResult`)."""

    @property
    def id(self) -> str: ...
    @property
    def word_errors(self) -> int: ...
    @property
    def words(self) -> int: ...


class WerDifference(BaseModel):
    """An entry's WER minus its baseline's over the utterances both scored, with its interval.

    WERs and differences are fractions like an entry's `wer` (0.0041 is 0.41 WER points)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    unit: Unit
    n_units: int = Field(ge=1, description="utterances, or speakers, resampled")
    n_utterances: int = Field(ge=1, description="utterances both entries scored (the ids they share)")
    unpaired_utterances: int = Field(ge=0, description="ids only one of the two entries scored (left out)")
    n_resamples: int = Field(ge=1)
    seed: int
    confidence: float = CONFIDENCE
    entry_wer: float = Field(ge=0, description="the entry's corpus-level WER over the shared utterances")
    baseline_wer: float = Field(ge=0, description="the baseline's corpus-level WER over the shared utterances")
    difference: float = Field(description="entry_wer - baseline_wer")
    low: float = Field(description="2.5th percentile of the resampled differences")
    high: float = Field(description="97.5th percentile of the resampled differences")
    significant: bool = Field(description="the interval excludes 0")


def speaker_of(utterance_id: str) -> str:
    """The speaker of a LibriSpeech id (`speaker-chapter-utterance`): its first field."""
    return utterance_id.split("-", 1)[0]


def _by_id(utterances: Iterable[ScoredUtterance], name: str) -> dict[str, tuple[int, int]]:
    table: dict[str, tuple[int, int]] = {}
    for u in utterances:
        if u.id in table:
            raise PairingError(f"{name} lists utterance {u.id!r} twice; its results cannot be paired by id")
        table[u.id] = (u.word_errors, u.words)
    return table


def _wer(errors: np.ndarray, words: np.ndarray) -> np.ndarray:
    # a resample without reference words has WER 0, as `subset_score` scores an empty set
    return np.divide(errors, words, out=np.zeros(np.shape(errors), dtype=np.float64), where=words > 0)


def resample_sums(unit_counts: np.ndarray, n_resamples: int, seed: int) -> np.ndarray:
    """Column sums of `unit_counts` (one row a unit) over each resample: [n_resamples, columns].

    Resample r takes rows `default_rng(seed).integers(0, n_units, size=(n_resamples, n_units))[r]`
    (drawn in chunks of rows, the same stream), counted per unit and multiplied by the counts."""
    n_units = unit_counts.shape[0]
    if n_units < 1 or n_resamples < 1:
        raise ValueError("resampling needs at least one unit and one resample")
    rng = np.random.default_rng(seed)
    values = unit_counts.astype(np.float64)  # integer sums stay exact below 2**53
    rows = max(1, _CHUNK_ELEMENTS // n_units)
    out = np.empty((n_resamples, unit_counts.shape[1]), dtype=np.float64)
    for start in range(0, n_resamples, rows):
        r = min(rows, n_resamples - start)
        index = rng.integers(0, n_units, size=(r, n_units))
        flat = (index + (np.arange(r) * n_units)[:, None]).ravel()
        counts = np.bincount(flat, minlength=r * n_units).reshape(r, n_units)
        out[start:start + r] = counts @ values
    return out


def paired_wer_difference(entry_utts: Sequence[ScoredUtterance], baseline_utts: Sequence[ScoredUtterance],
                          n_resamples: int = N_RESAMPLES, seed: int = SEED, unit: Unit = "utterance", *,
                          entry_name: str = "the entry", baseline_name: str = "the baseline") -> WerDifference:
    """The entry's WER minus the baseline's, paired by utterance id, with a 95 % bootstrap interval.

    Only the ids both scored are compared (their number is reported); none shared is a
    `PairingError` naming both. Deterministic given `seed`, whatever order the utterances come in."""
    if unit not in ("utterance", "speaker"):
        raise ValueError(f"unit must be 'utterance' or 'speaker', not {unit!r}")
    a, b = _by_id(entry_utts, entry_name), _by_id(baseline_utts, baseline_name)
    shared = sorted(a.keys() & b.keys())
    if not shared:
        raise PairingError(f"{entry_name} and {baseline_name} share no utterance id "
                           f"({len(a)} and {len(b)} utterances); their WERs cannot be compared pairwise")
    # columns: entry errors, entry words, baseline errors, baseline words
    per_utterance = np.array([a[i] + b[i] for i in shared], dtype=np.int64).reshape(len(shared), 4)
    if unit == "speaker":
        speakers = sorted({speaker_of(i) for i in shared})
        cluster = np.searchsorted(speakers, [speaker_of(i) for i in shared])
        per_unit = np.zeros((len(speakers), 4), dtype=np.int64)
        np.add.at(per_unit, cluster, per_utterance)
    else:
        per_unit = per_utterance
    total = per_unit.sum(axis=0)
    entry_wer, baseline_wer = float(_wer(total[0], total[1])), float(_wer(total[2], total[3]))
    sums = resample_sums(per_unit, n_resamples, seed)
    differences = _wer(sums[:, 0], sums[:, 1]) - _wer(sums[:, 2], sums[:, 3])
    tail = 100 * (1 - CONFIDENCE) / 2
    low, high = (float(x) for x in np.percentile(differences, [tail, 100 - tail]))
    return WerDifference(
        unit=unit, n_units=per_unit.shape[0], n_utterances=len(shared), unpaired_utterances=len(a.keys() ^ b.keys()),
        n_resamples=n_resamples, seed=seed, entry_wer=entry_wer, baseline_wer=baseline_wer,
        difference=entry_wer - baseline_wer, low=low, high=high, significant=bool(low > 0 or high < 0),
    )


def entry_wer_difference(entry: LeaderboardEntry, baseline: LeaderboardEntry, n_resamples: int = N_RESAMPLES,
                         seed: int = SEED, unit: Unit = "utterance") -> WerDifference:
    """`paired_wer_difference` of two leaderboard entries, errors naming them by model, subset and label."""
    def name(e: LeaderboardEntry) -> str:
        return f"{e.model.name}/{e.dataset.subset}/{e.label}"

    return paired_wer_difference(entry.utterances, baseline.utterances, n_resamples, seed, unit,
                                 entry_name=name(entry), baseline_name=name(baseline))

