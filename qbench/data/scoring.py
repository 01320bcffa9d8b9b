"""Word and character error rates after the Whisper English text normalizer.

Both references and hypotheses go through `EnglishTextNormalizer` (the normalizer of the
Whisper paper and the Open ASR Leaderboard), so casing, punctuation, numbers and British/
American spellings do not count as errors; jiwer aligns and counts.
"""

from __future__ import annotations

from functools import lru_cache

import jiwer
from pydantic import BaseModel
from whisper_normalizer.english import EnglishTextNormalizer


@lru_cache(maxsize=1)
def _normalizer() -> EnglishTextNormalizer:
    return EnglishTextNormalizer()


def normalize(text: str) -> str:
    """Whisper's English normalization, with whitespace collapsed."""
    return " ".join(_normalizer()(text).split())


class ErrorCounts(BaseModel):
    """Edit operations of a word (or character) alignment and the reference length."""

    substitutions: int
    deletions: int
    insertions: int
    reference_length: int

    @property
    def errors(self) -> int:
        return self.substitutions + self.deletions + self.insertions

    @property
    def rate(self) -> float:
        return self.errors / self.reference_length if self.reference_length else float(self.errors > 0)


def _counts(output) -> ErrorCounts:
    return ErrorCounts(
        substitutions=output.substitutions,
        deletions=output.deletions,
        insertions=output.insertions,
        reference_length=output.substitutions + output.deletions + output.hits,
    )


def word_errors(reference: str, hypothesis: str) -> ErrorCounts:
    """Word edit counts between two already-normalized strings (either may be empty)."""
    if not reference:
        return ErrorCounts(substitutions=0, deletions=0, insertions=len(hypothesis.split()), reference_length=0)
    if not hypothesis:
        n = len(reference.split())
        return ErrorCounts(substitutions=0, deletions=n, insertions=0, reference_length=n)
    return _counts(jiwer.process_words(reference, hypothesis))


def char_errors(reference: str, hypothesis: str) -> ErrorCounts:
    """Character edit counts (spaces included, as jiwer's CER counts them)."""
    if not reference or not hypothesis:
        return ErrorCounts(substitutions=0, deletions=len(reference), insertions=len(hypothesis), reference_length=len(reference))
    return _counts(jiwer.process_characters(reference, hypothesis))


def corpus_rate(counts: list[ErrorCounts]) -> float:
    """Corpus-level rate: total errors over total reference length (not a mean of rates)."""
    ref = sum(c.reference_length for c in counts)
    return sum(c.errors for c in counts) / ref if ref else 0.0
