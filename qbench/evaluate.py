"""Run a model over LibriSpeech utterances, score it, and keep the result file up to date.

Every batch is journaled (`qbench.journal`) before the result file is rewritten, so the file
never claims an utterance the journal lacks. A batch whose utterances are all in the journal of
an earlier attempt, with the same decoded audio, is rescored from it instead of transcribed:
batches are cut exactly as in an uninterrupted run, so a resumed result is the same.
"""

from __future__ import annotations

import resource
import signal
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
from qbench.journal import JournalRecord, RunJournal
from qbench.models.speech_model import SpeechModel
from qbench.results import (
    Metrics,
    RunResult,
    UnscoredUtterance,
    UtteranceResult,
    audio_digest,
    hypotheses_digest,
)


class RunFailed(QBenchError, RuntimeError):
    """A run stopped; `.result` holds everything finished before the failure (also on disk)."""

    def __init__(self, message: str, result: RunResult):
        super().__init__(message)
        self.result = result


class RunInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped the run (raised by the CLI's signal handlers). `.result` is what
    the result file now holds (`status: interrupted`), None when the signal came before any."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.result: RunResult | None = None


def peak_rss_bytes() -> int:
    # ru_maxrss is the kernel's own high-water mark (KiB on Linux): no sampling gaps
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def split_unscorable(utterances: list[Utterance]) -> tuple[list[Utterance], list[UnscoredUtterance]]:
    """The utterances whose reference has words after normalization, and those left out.

    A reference the normalizer empties (LibriSpeech-style "HMM", "UM": fillers it deletes) has
    no words to count errors against: scored, it would add its hypothesis as pure insertions
    (a rate over zero reference words) and make corpus WER depend on how the model spells a
    hesitation. Such utterances are excluded, as the Open ASR Leaderboard drops empty
    references, and recorded with a warning rather than refused, because one filler line must
    not stop a run over a thousand utterances.
    """
    scored, unscored = [], []
    for utt in utterances:
        if normalize(utt.transcript):
            scored.append(utt)
        else:
            unscored.append(UnscoredUtterance(id=utt.id, reference=utt.transcript,
                                              reason="reference has no words after normalization"))
    return scored, unscored


def unscored_warning(unscored: list[UnscoredUtterance]) -> str:
    first = unscored[0]
    return (f"{len(unscored)} utterance(s) not scored: the reference has no words after normalization "
            f"(e.g. {first.id} {first.reference!r})")


def score_utterance(utt: Utterance, duration: float, hypothesis: str, audio_sha256: str | None = None) -> UtteranceResult:
    ref_n, hyp_n = normalize(utt.transcript), normalize(hypothesis)
    words, chars = word_errors(ref_n, hyp_n), char_errors(ref_n, hyp_n)
    return UtteranceResult(
        id=utt.id, audio_sha256=audio_sha256, duration=duration, reference=utt.transcript, hypothesis=hypothesis,
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
    journal: RunJournal | None = None,
    finish: Callable[[RunResult], None] | None = None,
) -> RunResult:
    """Transcribe and score `utterances` in batches, journaling each batch and then writing
    `result` to `output`.

    A batch the journal already holds (same ids, same audio digests) is rescored without the
    model; one whose audio changed since is transcribed again and says so in `result.warnings`.
    Fails fast with a one-line error naming the utterance or batch at fault (bad audio, a
    non-finite model output) after saving what was done; on SIGINT/SIGTERM (KeyboardInterrupt)
    saves `status: interrupted` and re-raises. Wall time excludes audio loading and scoring,
    so it measures the model (a resumed batch counts the time it took when it was transcribed).
    `finish` completes `result` (the caller's end-of-run fields) just before it is written as
    complete.
    """
    wall = 0.0
    model_bytes = model.store.stored_bytes()
    journaled = dict(journal.records) if journal is not None else {}
    warnings_before = list(result.warnings)
    changed: list[str] = []  # journaled utterances whose audio is not what was transcribed
    unsaved: list[UtteranceResult] = []  # journaled, maybe not yet in `result` when a signal comes

    def save(status: str, error: str | None = None) -> None:
        result.status, result.error = status, error
        result.metrics = summarize(result.utterances, wall, model_bytes) if result.utterances else None
        result.hypotheses_sha256 = hypotheses_digest((u.id, u.hypothesis_normalized) for u in result.utterances)
        result.warnings = warnings_before + ([f"{len(changed)} journaled utterance(s) had different audio on disk "
                                              f"and were transcribed again (e.g. {changed[0]})"] if changed else [])
        if output is not None:
            result.write(output)

    try:
        for start in range(0, len(utterances), batch_size):
            batch = utterances[start : start + batch_size]
            try:
                audios = [load_audio(u.path, expected_rate=model.sample_rate) for u in batch]
                digests = [audio_digest(a) for a in audios]
                earlier = [journaled.get(u.id) for u in batch]
                if all(r is not None and r.audio_sha256 == d for r, d in zip(earlier, digests)):
                    records, resumed = earlier, True
                else:
                    changed += [u.id for u, r, d in zip(batch, earlier, digests) if r is not None and r.audio_sha256 != d]
                    t0 = time.perf_counter()
                    texts = model.transcribe(audios)
                    share = (time.perf_counter() - t0) / len(batch)
                    records = [JournalRecord(id=u.id, audio_sha256=d, duration=len(a) / model.sample_rate,
                                             hypothesis=text, wall_seconds=share)
                               for u, a, d, text in zip(batch, audios, digests, texts)]
                    resumed = False
            except Exception as exc:  # noqa: BLE001 - any failure is reported and the file kept
                ids = f"{batch[0].id}..{batch[-1].id}" if len(batch) > 1 else batch[0].id
                message = one_line(exc) or type(exc).__name__
                if not any(u.id in message or str(u.path) in message for u in batch):
                    message = f"batch {ids}: {message}"
                save("failed", message)
                raise RunFailed(message, result) from exc
            # scored from the record, fresh or journaled alike: a resumed utterance scores as a new one
            scored = [score_utterance(u, r.duration, r.hypothesis, r.audio_sha256) for u, r in zip(batch, records)]
            if journal is not None and not resumed:
                journal.append(records)  # durable before the result file names these utterances
            unsaved = scored
            result.utterances += scored
            unsaved = []
            result.resumed_utterances += len(batch) if resumed else 0
            wall += sum(r.wall_seconds for r in records)
            save("running")
            if on_batch is not None:
                on_batch(len(batch), wall)
        if finish is not None:
            finish(result)
        save("complete")
    except KeyboardInterrupt as exc:
        have = {u.id for u in result.utterances}
        result.utterances += [u for u in unsaved if u.id not in have]
        name = exc.args[0] if isinstance(exc, RunInterrupted) else "SIGINT"
        save("interrupted", f"interrupted by {name} after {len(result.utterances)} of {len(utterances)} utterances; "
                            "run the same spec again to resume")
        if isinstance(exc, RunInterrupted):
            exc.result = result
        raise
    return result
