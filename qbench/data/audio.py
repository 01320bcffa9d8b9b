"""Load one utterance's audio as the models expect it: float32 mono at 16 kHz in [-1, 1].

Every problem is an `AudioError` whose message is one line naming the file, because a benchmark
run over a thousand files must say which one was bad, not print a libsndfile traceback.
Nothing is silently "fixed": a stereo file is not down-mixed and a wrong rate is not resampled,
since either would change what the model hears and so the WER the benchmark reports.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import soundfile as sf

from qbench.errors import QBenchError, one_line

__all__ = ["AudioError", "audio_duration", "load_audio"]


class AudioError(QBenchError, ValueError):
    """An audio file that is missing, unreadable, or not 16 kHz mono finite audio."""


def audio_duration(path: str | os.PathLike[str]) -> float:
    """Seconds of audio in `path`, from its header alone (no decoding)."""
    p = Path(path)
    try:
        return float(sf.info(str(p)).duration)
    except Exception as exc:  # libsndfile raises several unrelated types for bad input
        raise AudioError(f"{p}: unreadable or corrupt audio file ({one_line(exc)})") from exc


def load_audio(path: str | os.PathLike[str], expected_rate: int = 16000) -> np.ndarray:
    """Read `path` with soundfile and return a 1-D float32 array in [-1, 1].

    Raises `AudioError` for a missing, unreadable, empty, multichannel, wrong-rate, non-finite
    or out-of-range file.
    """
    p = Path(path)
    if not p.exists():
        raise AudioError(f"{p}: audio file not found")
    if not p.is_file():
        raise AudioError(f"{p}: not a regular file")
    try:
        # Header first, so a wrong rate or channel count fails before decoding the whole file.
        info = sf.info(str(p))
    except Exception as exc:  # libsndfile raises several unrelated types for bad input
        raise AudioError(f"{p}: unreadable or corrupt audio file ({one_line(exc)})") from exc
    if info.channels != 1:
        raise AudioError(
            f"{p}: has {info.channels} channels, expected mono (not mixed down automatically)"
        )
    if info.samplerate != expected_rate:
        raise AudioError(
            f"{p}: sample rate is {info.samplerate} Hz, expected {expected_rate} Hz "
            "(not resampled automatically)"
        )
    if info.frames == 0:
        raise AudioError(f"{p}: empty audio file (0 samples)")
    try:
        data, rate = sf.read(str(p), dtype="float32", always_2d=True)
    except Exception as exc:
        raise AudioError(f"{p}: unreadable or corrupt audio file ({one_line(exc)})") from exc
    if rate != expected_rate:  # the header said otherwise; trust what was decoded
        raise AudioError(f"{p}: sample rate is {rate} Hz, expected {expected_rate} Hz")
    if data.shape[1] != 1:
        raise AudioError(f"{p}: has {data.shape[1]} channels, expected mono")
    audio = np.ascontiguousarray(data[:, 0])
    if audio.size == 0:
        raise AudioError(f"{p}: empty audio file (0 samples decoded)")
    finite = np.isfinite(audio)
    if not finite.all():
        bad = int(audio.size - np.count_nonzero(finite))
        raise AudioError(f"{p}: {bad} non-finite samples (NaN or inf)")
    # Integer formats decode into [-1, 1) by construction; only float files can exceed it, and
    # clipping them silently would hide a broken input, so it is an error.
    peak = float(np.max(np.abs(audio)))
    if peak > 1.0:
        raise AudioError(f"{p}: samples reach {peak:.4g}, outside [-1, 1]")
    return audio
