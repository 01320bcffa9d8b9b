"""Whisper's vocabulary: token ids -> text by byte-level BPE decoding, and the special tokens.

Decoding needs no merges: every token string is a sequence of GPT-2 "byte characters" (each
byte 0..255 mapped to a printable unicode character), so text = utf-8 of the concatenated bytes.

Two vocabularies exist. English-only models (`*.en`, distil-whisper's English models) have
51864 entries: GPT-2's 50256 byte-level tokens, then `<|endoftext|>` (50256), the start, task
and language tokens and 1501 timestamps. Multilingual models have 51865 or more: a different
byte-level BPE of 50257 tokens, so every special token sits one id higher (`<|endoftext|>`
50257, `<|startoftranscript|>` 50258, `<|en|>` 50259, `<|transcribe|>` 50359,
`<|notimestamps|>` 50363). Which one a model has is decided as openai does, by the model's
`n_vocab` (>= 51865: multilingual); the special tokens are then looked up by name, never by a
fixed id, so a vocabulary file that is off by one is an error rather than a silent shift.
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

# The multilingual models' list, as their Hugging Face `generation_config.json` carries it
# (openai/whisper-base's, for one): the same symbols in the multilingual BPE, plus the start
# (50258), translate/transcribe (50358/50359), start-of-LM/-previous (50360/50361) and
# no-speech (50362) tokens. Used only for checkpoints that carry no list.
MULTILINGUAL_SUPPRESS_IDS = (
    1, 2, 7, 8, 9, 10, 14, 25, 26, 27, 28, 29, 31, 58, 59, 60, 61, 62, 63, 90, 91, 92, 93, 359,
    503, 522, 542, 873, 893, 902, 918, 922, 931, 1350, 1853, 1982, 2460, 2627, 3246, 3253, 3268,
    3536, 3846, 3961, 4183, 4667, 6585, 6647, 7273, 9061, 9383, 10428, 10929, 11938, 12033,
    12331, 12562, 13793, 14157, 14635, 15265, 15618, 16553, 16604, 18362, 18956, 20075, 21675,
    22520, 26130, 26161, 26435, 28279, 29464, 31650, 32302, 32470, 36865, 42863, 47425, 49870,
    50254, 50258, 50358, 50359, 50360, 50361, 50362,
)

#: openai's rule (`ModelDimensions.n_vocab >= 51865`): the smallest multilingual vocabulary
MULTILINGUAL_MIN_VOCAB = 51865
#: timestamps `<|0.00|>` .. `<|30.00|>` follow `<|notimestamps|>`, one per 20 ms
N_TIMESTAMPS = 1501


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
    """Token strings by id, the special tokens Whisper decoding needs, and `decode`.

    `n_vocab` is the model's vocabulary size (its token embedding's rows); it decides whether
    the model is multilingual, and a token list shorter than it (a Hugging Face tokenizer.json
    that leaves the timestamps out) is completed with the timestamp tokens it lacks.
    `suppress_ids` None: the standard list of the model's kind (`ENGLISH_SUPPRESS_IDS` or
    `MULTILINGUAL_SUPPRESS_IDS`).
    """

    def __init__(self, tokens: list[str], suppress_ids: tuple[int, ...] | None = None,
                 suppress_ids_begin: tuple[int, ...] | None = None, source: str = "", n_vocab: int | None = None):
        self.source = source
        index = {tok: i for i, tok in enumerate(tokens)}
        try:
            self.eot = index["<|endoftext|>"]
            self.sot = index["<|startoftranscript|>"]
            self.no_timestamps = index["<|notimestamps|>"]
        except KeyError as exc:
            raise CheckpointError(f"{source}: vocabulary has no Whisper special token {exc}") from None
        self.timestamp_begin = self.no_timestamps + 1
        n_vocab = len(tokens) if n_vocab is None else n_vocab
        if len(tokens) < n_vocab:
            if len(tokens) < self.timestamp_begin or n_vocab - self.timestamp_begin > N_TIMESTAMPS:
                raise CheckpointError(f"{source}: {len(tokens)} tokens, but the model has {n_vocab}")
            tokens = tokens + [f"<|{0.02 * i:.2f}|>" for i in range(len(tokens) - self.timestamp_begin,
                                                                     n_vocab - self.timestamp_begin)]
        elif len(tokens) > n_vocab:
            raise CheckpointError(f"{source}: {len(tokens)} tokens, but the model has only {n_vocab}")
        self.tokens = tokens
        self.is_multilingual = self.multilingual_size(n_vocab)
        if self.is_multilingual:
            # multilingual models are told the language and the task: English, transcribed
            for special in ("<|en|>", "<|transcribe|>"):
                if special not in index:
                    raise CheckpointError(f"{source}: multilingual vocabulary has no {special} token")
            self.english, self.transcribe = index["<|en|>"], index["<|transcribe|>"]
        if suppress_ids is None:
            suppress_ids = MULTILINGUAL_SUPPRESS_IDS if self.is_multilingual else ENGLISH_SUPPRESS_IDS
        self.suppress_ids = tuple(suppress_ids)
        # SuppressBlank: no leading space-only token and no immediate end of text
        self.suppress_ids_begin = tuple(suppress_ids_begin) if suppress_ids_begin is not None else (index.get("Ġ", 220), self.eot)

    @staticmethod
    def multilingual_size(n_vocab: int) -> bool:
        """Whether a model of `n_vocab` tokens is multilingual: openai's own test, on the model's
        size (English-only 51864, multilingual 51865 and up)."""
        return n_vocab >= MULTILINGUAL_MIN_VOCAB

    def __len__(self) -> int:
        return len(self.tokens)

    def sot_sequence(self) -> list[int]:
        """Prompt for English transcription without timestamps.

        English-only models: `<|startoftranscript|> <|notimestamps|>`. Multilingual ones are not
        left to detect the language: `<|startoftranscript|> <|en|> <|transcribe|> <|notimestamps|>`
        (the benchmark is English; a detected language would be one more thing that can differ).
        """
        if self.is_multilingual:
            return [self.sot, self.english, self.transcribe, self.no_timestamps]
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
    def from_directory(cls, directory: str | Path, n_vocab: int | None = None) -> WhisperVocabulary:
        """Read `vocabulary.txt` or `vocabulary.json` (+ `config.json`, CTranslate2) or
        `tokenizer.json` / `vocab.json` (HF), for a model of `n_vocab` tokens (None: as many as
        the file lists)."""
        directory = Path(directory)
        suppress, begin = None, None
        for config_name in ("config.json", "generation_config.json"):
            path = directory / config_name
            if path.is_file():
                config = json.loads(path.read_text())
                listed = config.get("suppress_ids", config.get("suppress_tokens"))
                suppress = tuple(listed) if listed is not None else suppress
                begin = config.get("suppress_ids_begin", config.get("begin_suppress_tokens", begin))
        if (directory / "vocabulary.txt").is_file():
            tokens = (directory / "vocabulary.txt").read_text(encoding="utf-8").split("\n")
            if tokens and tokens[-1] == "":
                tokens.pop()
            return cls(tokens, suppress, begin, source=str(directory / "vocabulary.txt"), n_vocab=n_vocab)
        if (directory / "vocabulary.json").is_file():
            # what CTranslate2 >= 3 writes (faster-whisper's large-v3 and distil conversions): a list
            tokens = json.loads((directory / "vocabulary.json").read_text(encoding="utf-8"))
            if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
                raise CheckpointError(f"{directory / 'vocabulary.json'}: not a JSON list of token strings")
            return cls(tokens, suppress, begin, source=str(directory / "vocabulary.json"), n_vocab=n_vocab)
        if (directory / "tokenizer.json").is_file():
            data = json.loads((directory / "tokenizer.json").read_text(encoding="utf-8"))
            vocab = dict(data["model"]["vocab"])
            vocab.update({t["content"]: t["id"] for t in data.get("added_tokens", [])})
            return cls(_tokens_by_id(vocab), suppress, begin, source=str(directory / "tokenizer.json"), n_vocab=n_vocab)
        if (directory / "vocab.json").is_file():
            vocab = json.loads((directory / "vocab.json").read_text(encoding="utf-8"))
            added = directory / "added_tokens.json"
            if added.is_file():
                vocab.update(json.loads(added.read_text(encoding="utf-8")))
            return cls(_tokens_by_id(vocab), suppress, begin, source=str(directory / "vocab.json"), n_vocab=n_vocab)
        raise CheckpointError(f"{directory}: no Whisper vocabulary (vocabulary.txt, vocabulary.json, tokenizer.json "
                              "or vocab.json)")


def _tokens_by_id(vocab: dict[str, int]) -> list[str]:
    tokens = [""] * (max(vocab.values()) + 1)
    for tok, i in vocab.items():
        tokens[i] = tok
    return tokens
