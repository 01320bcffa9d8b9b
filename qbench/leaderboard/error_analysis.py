"""What kind of errors an entry makes: the breakdown a WER alone hides.

A quantized model that fails rarely fails the way a noisy one does. The usual low-bit failure
modes of an encoder-decoder recogniser are distinct and each has its own signature:

- **deletions**: the decoder stops early (end of text too soon) or outputs nothing;
- **hallucinated loops**: the decoder repeats a phrase until the token limit, so insertions
  dwarf the reference (WER over 100 % comes from here);
- **substitutions**: the acoustic evidence is read wrongly, the transcript keeps its length.

`analyse_entry` re-aligns each hypothesis of an entry with the reference transcript (read from
the LibriSpeech data, normalized the way scoring does) and counts these, so a closing note or a
plugin author can say which one a method suffers from. A loop is a hypothesis in which some
n-gram (n = 1..4) occurs at least `LOOP_REPEATS` times in a row.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from pydantic import BaseModel

from qbench.data.librispeech import list_utterances
from qbench.data.scoring import normalize, word_errors
from qbench.leaderboard.entry import LeaderboardEntry

LOOP_REPEATS = 4


class ErrorBreakdown(BaseModel):
    """Word-level error kinds of one entry over its utterances (fractions of reference words)."""

    utterances: int
    words: int
    substitutions: int
    deletions: int
    insertions: int
    empty_hypotheses: int
    looping_hypotheses: int
    #: utterances whose hypothesis is less than half the reference's length (stopped early)
    truncated_hypotheses: int
    #: share of all word errors made on the looping utterances
    errors_in_loops: float

    @property
    def wer(self) -> float:
        return (self.substitutions + self.deletions + self.insertions) / self.words if self.words else 0.0


def has_loop(words: list[str], repeats: int = LOOP_REPEATS) -> bool:
    """True if some 1..4-gram occurs `repeats` times back to back in `words`."""
    for n in range(1, 5):
        span = n * repeats
        for start in range(0, len(words) - span + 1):
            gram = words[start : start + n]
            if all(words[start + k * n : start + (k + 1) * n] == gram for k in range(1, repeats)):
                return True
    return False


def references(data_dir: Path, subset: str, ids: Iterable[str]) -> dict[str, str]:
    """Normalized reference transcripts of `ids` from the LibriSpeech data."""
    wanted = set(ids)
    return {u.id: normalize(u.transcript) for u in list_utterances(data_dir, subset) if u.id in wanted}


def analyse_entry(entry: LeaderboardEntry, refs: dict[str, str]) -> ErrorBreakdown:
    """The error kinds of `entry`'s hypotheses against `refs` (utterances without one are skipped)."""
    subs = dels = ins = words = empty = loops = truncated = 0
    loop_errors = all_errors = 0
    n = 0
    for utt in entry.utterances:
        ref = refs.get(utt.id)
        if ref is None:
            continue
        n += 1
        counts = word_errors(ref, utt.hypothesis)
        subs, dels, ins = subs + counts.substitutions, dels + counts.deletions, ins + counts.insertions
        words += counts.reference_length
        hyp = utt.hypothesis.split()
        empty += not hyp
        truncated += bool(hyp) and len(hyp) < 0.5 * len(ref.split())
        all_errors += counts.errors
        if has_loop(hyp):
            loops += 1
            loop_errors += counts.errors
    return ErrorBreakdown(utterances=n, words=words, substitutions=subs, deletions=dels, insertions=ins,
                          empty_hypotheses=empty, looping_hypotheses=loops, truncated_hypotheses=truncated,
                          errors_in_loops=loop_errors / all_errors if all_errors else 0.0)
