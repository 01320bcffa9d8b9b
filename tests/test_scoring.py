"""WER/CER after the Whisper English normalizer."""

from __future__ import annotations

import pytest

from qbench.data.scoring import char_errors, corpus_rate, normalize, word_errors


def test_normalizer_removes_case_punctuation_and_standardizes_spelling():
    assert normalize("Mr. Smith's colour, TWENTY dollars!") == normalize("mister smith's color twenty dollars")
    assert normalize("HELLO   World") == "hello world"


def test_word_errors_count_each_operation():
    c = word_errors("a b c d e f", "a x c e f g")
    assert (c.substitutions, c.deletions, c.insertions, c.reference_length) == (1, 1, 1, 6)
    assert c.rate == pytest.approx(3 / 6)


def test_empty_hypothesis_is_all_deletions_and_empty_reference_all_insertions():
    assert word_errors("a b c", "").deletions == 3
    assert word_errors("", "a b").insertions == 2


def test_char_errors():
    c = char_errors("abcd", "abxd")
    assert (c.substitutions, c.reference_length) == (1, 4)


def test_corpus_rate_weights_by_length_not_by_utterance():
    short = word_errors("a", "b")  # 100 % on 1 word
    long = word_errors("a b c d e f g h i j", "a b c d e f g h i j")  # 0 % on 10 words
    assert corpus_rate([short, long]) == pytest.approx(1 / 11)
