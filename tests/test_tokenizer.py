"""Byte-level BPE decoding and Whisper's special tokens."""

from __future__ import annotations

import json

from qbench.models.tokenizer import ENGLISH_SUPPRESS_IDS, WhisperVocabulary, byte_decoder


def _vocab(tokens: list[str]) -> WhisperVocabulary:
    return WhisperVocabulary(tokens + ["<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>"])


def test_byte_table_is_a_bijection_over_256_bytes():
    table = byte_decoder()
    assert sorted(table.values()) == list(range(256))
    assert table["Ġ"] == 32 and table["A"] == 65 and table["Ċ"] == 10


def test_decode_joins_byte_level_tokens_and_skips_specials():
    vocab = _vocab(["Hello", "Ġworld", "Ã©", "!"])  # "Ã©" is the two UTF-8 bytes of "é"
    eot = vocab.eot
    assert vocab.decode([0, 1, 3]) == "Hello world!"
    assert vocab.decode([0, 2, eot, 1]) == "Helloé world"  # specials (>= eot) are not text


def test_multibyte_character_split_across_tokens():
    vocab = _vocab(["Ã", "©"])
    assert vocab.decode([0, 1]) == "é"
    assert vocab.decode([0]) == "\ufffd"  # half a character decodes to the replacement mark


def test_real_tiny_en_vocabulary(tiny_en):
    vocab = tiny_en.model.vocab
    assert len(vocab) == 51864 and not vocab.is_multilingual
    assert (vocab.eot, vocab.sot, vocab.no_timestamps) == (50256, 50257, 50362)
    assert vocab.sot_sequence() == [50257, 50362]
    assert vocab.decode([15496, 995]) == "Hello world"  # GPT-2 ids of "Hello" and " world"
    config = json.loads((tiny_en.path / "config.json").read_text())
    assert tuple(config["suppress_ids"]) == ENGLISH_SUPPRESS_IDS == vocab.suppress_ids
    assert vocab.suppress_ids_begin == (220, 50256)
