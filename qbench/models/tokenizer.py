"""Whisper's vocabulary: token ids -> text by byte-level BPE decoding, and the special tokens.

Decoding needs no merges: every token string is a sequence of GPT-2 "byte characters" (each
byte 0..255 mapped to a printable unicode character), so text = utf-8 of the concatenated bytes.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from qbench.checkpoints.errors import CheckpointError

# Whisper English-only models' standard suppressed tokens (openai's `non_speech_tokens` plus the
# task/start tokens), as carried by their CTranslate2 `config.json` and Hugging Face
# `generation_config.json`; used only for checkpoints (openai .pt) that carry no list.
ENGLISH_SUPPRESS_IDS = (
    1, 2, 7, 8, 9, 10, 14, 25, 26, 27, 28, 29, 31, 58, 59, 60, 61, 62, 63, 90, 91, 92, 93, 357,
    366, 438, 532, 685, 705, 796, 930, 1058, 1220, 1267, 1279, 1303, 1343, 1377, 1391, 1635, 1782,
    1875, 2162, 2361, 2488, 3467, 4008, 4211, 4600, 4808, 5299, 5855, 6329, 7203, 9609, 9959,
    10563, 10786, 11420, 11709, 11907, 13163, 13697, 13700, 14808, 15306, 16410, 16791, 17992,
    19203, 19510, 20724, 22305, 22935, 27007, 30109, 30420, 33409, 34949, 40283, 40493, 40549,
    47282, 49146, 50257, 50357, 50358, 50359, 50360, 50361,
)


@lru_cache(maxsize=1)
def byte_decoder() -> dict[str, int]:
    """GPT-2's printable-character -> byte table (the inverse of `bytes_to_unicode`)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars)}


class WhisperVocabulary:
    """Token strings by id, the special tokens Whisper decoding needs, and `decode`."""

    def __init__(self, tokens: list[str], suppress_ids: tuple[int, ...] = ENGLISH_SUPPRESS_IDS,
                 suppress_ids_begin: tuple[int, ...] | None = None, source: str = ""):
        self.tokens = tokens
        self.source = source
        index = {tok: i for i, tok in enumerate(tokens)}
        try:
            self.eot = index["<|endoftext|>"]
            self.sot = index["<|startoftranscript|>"]
            self.no_timestamps = index["<|notimestamps|>"]
        except KeyError as exc:
            raise CheckpointError(f"{source}: vocabulary has no Whisper special token {exc}") from None
        self.timestamp_begin = self.no_timestamps + 1
        # openai's own test: English-only vocabularies have 51864 entries, multilingual 51865+
        self.is_multilingual = len(tokens) >= 51865
        self.suppress_ids = tuple(suppress_ids)
        # SuppressBlank: no leading space-only token and no immediate end of text
        self.suppress_ids_begin = tuple(suppress_ids_begin) if suppress_ids_begin is not None else (index.get("Ġ", 220), self.eot)

    def __len__(self) -> int:
        return len(self.tokens)

    def sot_sequence(self) -> list[int]:
        """Prompt for English transcription without timestamps."""
        if self.is_multilingual:
            index = {tok: i for i, tok in enumerate(self.tokens)}
            return [self.sot, index["<|en|>"], index["<|transcribe|>"], self.no_timestamps]
        return [self.sot, self.no_timestamps]

    def decode(self, ids: list[int]) -> str:
        """Text of the ordinary (non-special) tokens among `ids`."""
        table = byte_decoder()
        data = bytearray()
        for i in ids:
            if i >= self.eot:
                continue
            data.extend(table[ch] for ch in self.tokens[i])
        return data.decode("utf-8", errors="replace")

    # -- readers for the files each checkpoint format ships ---------------------------------
    @classmethod
    def from_directory(cls, directory: str | Path) -> WhisperVocabulary:
        """Read `vocabulary.txt` (+ `config.json`, CTranslate2) or `tokenizer.json` / `vocab.json` (HF)."""
        directory = Path(directory)
        suppress, begin = ENGLISH_SUPPRESS_IDS, None
        for config_name in ("config.json", "generation_config.json"):
            path = directory / config_name
            if path.is_file():
                config = json.loads(path.read_text())
                suppress = tuple(config.get("suppress_ids", config.get("suppress_tokens", suppress)))
                begin = config.get("suppress_ids_begin", config.get("begin_suppress_tokens", begin))
        if (directory / "vocabulary.txt").is_file():
            tokens = (directory / "vocabulary.txt").read_text(encoding="utf-8").split("\n")
            if tokens and tokens[-1] == "":
                tokens.pop()
            return cls(tokens, suppress, begin, source=str(directory / "vocabulary.txt"))
        if (directory / "tokenizer.json").is_file():
            data = json.loads((directory / "tokenizer.json").read_text(encoding="utf-8"))
            vocab = dict(data["model"]["vocab"])
            vocab.update({t["content"]: t["id"] for t in data.get("added_tokens", [])})
            return cls(_tokens_by_id(vocab), suppress, begin, source=str(directory / "tokenizer.json"))
        if (directory / "vocab.json").is_file():
            vocab = json.loads((directory / "vocab.json").read_text(encoding="utf-8"))
            added = directory / "added_tokens.json"
            if added.is_file():
                vocab.update(json.loads(added.read_text(encoding="utf-8")))
            return cls(_tokens_by_id(vocab), suppress, begin, source=str(directory / "vocab.json"))
        raise CheckpointError(f"{directory}: no Whisper vocabulary (vocabulary.txt, tokenizer.json or vocab.json)")


def _tokens_by_id(vocab: dict[str, int]) -> list[str]:
    tokens = [""] * (max(vocab.values()) + 1)
    for tok, i in vocab.items():
        tokens[i] = tok
    return tokens
