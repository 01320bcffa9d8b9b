"""faster-whisper (CTranslate2), the peer engine for parity and speed, run with qbench's settings.

Greedy (beam 1), temperature 0 with no fallback, no timestamps, no conditioning on previous
text, no VAD and no no-speech skipping: the same decoding the numpy harness does, so a
difference in transcripts is a difference in the engines, not in the recipe.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


class FasterWhisper:
    def __init__(self, model_dir: str | Path, compute_type: str = "float32", cpu_threads: int | None = None):
        try:
            from faster_whisper import WhisperModel
        except ImportError as exc:  # pragma: no cover - the peer is an optional test extra
            raise ImportError("faster-whisper is not installed: pip install 'qbench[test]'") from exc
        self.compute_type = compute_type
        self.model = WhisperModel(str(model_dir), device="cpu", compute_type=compute_type,
                                  cpu_threads=cpu_threads or os.cpu_count() or 1)

    def transcribe(self, audios: list[np.ndarray]) -> list[str]:
        texts = []
        for audio in audios:
            segments, _ = self.model.transcribe(
                audio, language="en", beam_size=1, best_of=1, temperature=0.0, without_timestamps=True,
                condition_on_previous_text=False, vad_filter=False, no_speech_threshold=None,
                log_prob_threshold=None, compression_ratio_threshold=None,
            )
            texts.append("".join(s.text for s in segments).strip())
        return texts
