"""The calibration audio a quantizer sees: disjoint from what is scored, and recorded exactly."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import numpy as np
from pydantic import BaseModel, Field

from qbench.data.audio import load_audio
from qbench.data.librispeech import list_utterances, utterance_digest
from qbench.errors import QBenchError


class CalibrationError(QBenchError, ValueError):
    """Calibration utterances that are missing or overlap the evaluation set."""


class CalibrationSet(BaseModel):
    subset: str
    utterance_count: int
    utterance_ids_sha256: str
    utterance_ids: list[str]
    audio_seconds: float


MIN_SPEED, MAX_SPEED = 0.5, 2.0
#: a speed `speed_perturbed` accepts, for the records that name one
CalibrationSpeed = Annotated[float, Field(ge=MIN_SPEED, le=MAX_SPEED)]


def speed_perturbed(audio: np.ndarray, factor: float) -> np.ndarray:
    """`audio` played `factor` times faster, tempo and pitch together (Kaldi's speed perturbation,
    Ko et al., Interspeech 2015), by band-limited resampling: the spectrum is kept up to the new
    Nyquist frequency (or zero-padded) and read back at the new length."""
    if not MIN_SPEED <= factor <= MAX_SPEED:
        raise CalibrationError(f"calibration speed {factor}: must be between {MIN_SPEED:g} and {MAX_SPEED:g}")
    n = max(2, int(round(len(audio) / factor)))
    spectrum = np.fft.rfft(audio.astype(np.float64))
    kept = np.zeros(n // 2 + 1, dtype=np.complex128)
    keep = min(len(spectrum), len(kept))
    kept[:keep] = spectrum[:keep]
    return (np.fft.irfft(kept, n) * (n / len(audio))).astype(np.float32)


def load_calibration(data_dir: Path, subset: str, limit: int | None, eval_ids: set[str],
                     ids: list[str] | None = None,
                     speeds: tuple[float, ...] = ()) -> tuple[list[np.ndarray], CalibrationSet]:
    """Audio of the calibration utterances (default: every shared dev-clean one) and its record.

    Refuses any overlap with the evaluation utterances: calibrating on the test set would
    flatter every calibrated quantizer. Each of `speeds` adds a `speed_perturbed` copy of every
    utterance after the originals: more distinct calibration rows from the same utterances (the
    decoder's Hessians are rank-deficient on dev-clean's ~1150 transcript positions). The record
    describes the utterances; the caller records the speeds.
    """
    utts = list_utterances(data_dir, subset, limit if ids is None else None)
    if ids is not None:
        wanted = set(ids)
        utts = [u for u in utts if u.id in wanted]
        if len(utts) != len(wanted):
            raise CalibrationError(f"calibration ids: {len(wanted) - len(utts)} of {len(wanted)} are not in {subset}")
    overlap = sorted(eval_ids.intersection(u.id for u in utts))
    if overlap:
        raise CalibrationError(f"calibration set {subset} overlaps the evaluation set ({len(overlap)} utterances, e.g. {overlap[0]})")
    originals = [load_audio(u.path) for u in utts]
    audios = originals + [speed_perturbed(a, f) for f in speeds for a in originals]
    record = CalibrationSet(
        subset=subset, utterance_count=len(utts), utterance_ids_sha256=utterance_digest(u.id for u in utts),
        utterance_ids=[u.id for u in utts], audio_seconds=sum(len(a) for a in originals) / 16000,
    )
    return audios, record
