"""Run a model over LibriSpeech utterances, score it, and keep the result file up to date."""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from pathlib import Path

from qbench.data.audio import load_audio
from qbench.data.librispeech import Utterance
from qbench.data.scoring import (
    ErrorCounts,
    char_errors,
    corpus_rate,
    normalize,
    word_errors,
)
from qbench.errors import QBenchError, one_line
from qbench.models.speech_model import SpeechModel
from qbench.results import Metrics, RunResult, UtteranceResult, hypotheses_digest


class RunFailed(QBenchError, RuntimeError):
    """A run stopped; `.result` holds everything finished before the failure (also on disk)."""

    def __init__(self, message: str, result: RunResult):
        super().__init__(message)
        self.result = result


def peak_rss_bytes() -> int:
    # ru_maxrss is the kernel's own high-water mark (KiB on Linux): no sampling gaps
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def score_utterance(utt: Utterance, duration: float, hypothesis: str) -> UtteranceResult:
    ref_n, hyp_n = normalize(utt.transcript), normalize(hypothesis)
    words, chars = word_errors(ref_n, hyp_n), char_errors(ref_n, hyp_n)
    return UtteranceResult(
        id=utt.id, duration=duration, reference=utt.transcript, hypothesis=hypothesis,
        reference_normalized=ref_n, hypothesis_normalized=hyp_n,
        word_errors=words.errors, words=words.reference_length,
        char_errors=chars.errors, chars=chars.reference_length,
    )


def summarize(utterances: list[UtteranceResult], wall_seconds: float, model_bytes: int) -> Metrics:
    audio = sum(u.duration for u in utterances)
    words = [ErrorCounts(substitutions=u.word_errors, deletions=0, insertions=0, reference_length=u.words) for u in utterances]
    chars = [ErrorCounts(substitutions=u.char_errors, deletions=0, insertions=0, reference_length=u.chars) for u in utterances]
    return Metrics(
        wer=corpus_rate(words), cer=corpus_rate(chars), utterances=len(utterances),
        audio_seconds=audio, wall_seconds=wall_seconds,
        rtf=wall_seconds / audio if audio else 0.0, rtfx=audio / wall_seconds if wall_seconds else 0.0,
        model_bytes=model_bytes, peak_rss_bytes=peak_rss_bytes(),
    )


def evaluate(
    model: SpeechModel,
    utterances: list[Utterance],
    result: RunResult,
    output: Path | None,
    batch_size: int = 8,
    on_batch: Callable[[int, float], None] | None = None,
) -> RunResult:
    """Transcribe and score `utterances` in batches, writing `result` to `output` after each.

    Fails fast with a one-line error naming the utterance or batch at fault (bad audio, a
    non-finite model output) after saving what was done; wall time excludes audio loading
    and scoring, so it measures the model.
    """
    wall = 0.0
    model_bytes = model.store.stored_bytes()

    def save(status: str, error: str | None = None) -> None:
        result.status, result.error = status, error
        result.metrics = summarize(result.utterances, wall, model_bytes) if result.utterances else None
        result.hypotheses_sha256 = hypotheses_digest((u.id, u.hypothesis_normalized) for u in result.utterances)
        if output is not None:
            result.write(output)

    for start in range(0, len(utterances), batch_size):
        batch = utterances[start : start + batch_size]
        try:
            audios = [load_audio(u.path, expected_rate=model.sample_rate) for u in batch]
            t0 = time.perf_counter()
            texts = model.transcribe(audios)
            wall += time.perf_counter() - t0
        except Exception as exc:  # noqa: BLE001 - any failure is reported and the file kept
            ids = f"{batch[0].id}..{batch[-1].id}" if len(batch) > 1 else batch[0].id
            message = one_line(exc) or type(exc).__name__
            if not any(u.id in message or str(u.path) in message for u in batch):
                message = f"batch {ids}: {message}"
            save("failed", message)
            raise RunFailed(message, result) from exc
        for utt, audio, text in zip(batch, audios, texts):
            result.utterances.append(score_utterance(utt, len(audio) / model.sample_rate, text))
        save("running")
        if on_batch is not None:
            on_batch(len(batch), wall)
    save("complete")
    return result

