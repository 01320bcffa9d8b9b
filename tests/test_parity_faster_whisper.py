"""Parity of the numpy Whisper with faster-whisper (CTranslate2 float32) on the same weights.

The first 100 sorted test-clean utterances: at least 95 identical normalized transcripts and
corpus WER within 0.3 points. Needs faster-whisper (the `test` extra); skips without it.

Both engines get the same input: the numpy model runs with faster-whisper's window padding
(`mel_padding="zeros"`), so this compares the networks and the decoding. qbench's default
padding (openai's) is a front-end choice checked by tests/test_mel.py.
"""

from __future__ import annotations

import pytest

from qbench.data.audio import load_audio
from qbench.data.librispeech import list_utterances
from qbench.models.whisper import Whisper
from qbench.data.scoring import corpus_rate, normalize, word_errors

N = 100


def test_same_transcripts_as_faster_whisper(tiny_en, data_dir):
    pytest.importorskip("faster_whisper")
    from qbench.peers.faster_whisper import FasterWhisper

    model = tiny_en.model
    model = Whisper(model.dims, model.store, model.vocab, model.name, mel_padding="zeros")
    utts = list_utterances(data_dir, "test-clean", limit=N)
    audios = [load_audio(u.path) for u in utts]
    ours = []
    for i in range(0, N, 8):
        ours += model.transcribe(audios[i : i + 8])
    theirs = FasterWhisper(tiny_en.path, compute_type="float32").transcribe(audios)

    refs = [normalize(u.transcript) for u in utts]
    ours_n, theirs_n = [normalize(t) for t in ours], [normalize(t) for t in theirs]
    same = sum(a == b for a, b in zip(ours_n, theirs_n))
    wer_ours = corpus_rate([word_errors(r, h) for r, h in zip(refs, ours_n)])
    wer_theirs = corpus_rate([word_errors(r, h) for r, h in zip(refs, theirs_n)])
    differing = [(u.id, a, b) for u, a, b in zip(utts, ours_n, theirs_n) if a != b]
    print(f"\nidentical {same}/{N}; WER numpy {100 * wer_ours:.2f} %, faster-whisper {100 * wer_theirs:.2f} %")
    for row in differing:
        print(" | ".join(row))
    assert same >= 95, differing
    assert abs(wer_ours - wer_theirs) <= 0.003
