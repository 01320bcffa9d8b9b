"""Running a model under an emulated device: the budget check before, during and after a run.

`DeviceSession` puts a model on a device: its weights in a `DeviceWeightStore` (float copies
only one row block at a time, plus a whole-layer cache when the budget leaves room), a compute
counter around it, and a `transcribe` that measures each batch's working memory with
tracemalloc and stops the run with `DoesNotFitError` as soon as the device is exceeded.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from qbench.embedded.compute import ComputeCountingStore, ComputeReport
from qbench.embedded.devices import DeviceProfile
from qbench.embedded.memory import (
    DEFAULT_BLOCK_BYTES,
    WAV2VEC2_AUDIO_SECONDS,
    DeviceWeightStore,
    FitReport,
    MemoryBreakdown,
    check_fit,
    estimate_wav2vec2_memory,
    estimate_whisper_memory,
    measure_peak,
)
from qbench.errors import QBenchError
from qbench.models.wav2vec2 import CHUNK_FRAMES, Wav2Vec2Config
from qbench.models.weight_store import WeightStore

_WINDOW_SECONDS = 30.0


class DoesNotFitError(QBenchError, RuntimeError):
    """The model does not fit the device; the message is the one-line verdict with the numbers."""


def _is_wav2vec2(model: Any) -> bool:
    return isinstance(getattr(model, "config", None), Wav2Vec2Config)


def estimate_memory(
    model: Any, store: WeightStore, device: DeviceProfile | None, batch_windows: int = 1,
    audio_seconds: float | None = None, cache_bytes: int = 0,
) -> MemoryBreakdown:
    """The accountant for `model`; architectures without an analytic model count weights only.

    Whisper: `batch_windows` 30 s windows, of an utterance of `audio_seconds` (default 30).
    wav2vec2: `batch_windows` utterances of up to `audio_seconds` (default
    `WAV2VEC2_AUDIO_SECONDS`, 35 s, about the longest LibriSpeech test utterance): they run one
    at a time, so only the waveforms add up. Without an analytic model the working memory is
    left to the measurement during the run.
    """
    if hasattr(model, "dims") and hasattr(model.dims, "n_audio_ctx"):
        seconds = _WINDOW_SECONDS if audio_seconds is None else audio_seconds
        return estimate_whisper_memory(model.dims, store, device, batch_windows, seconds, cache_bytes)
    if _is_wav2vec2(model):
        seconds = WAV2VEC2_AUDIO_SECONDS if audio_seconds is None else audio_seconds
        return estimate_wav2vec2_memory(
            model.config, store, device, seconds, getattr(store, "block_bytes", DEFAULT_BLOCK_BYTES), cache_bytes,
            getattr(model, "chunk_frames", CHUNK_FRAMES), batch_utterances=batch_windows)
    stored = store.stored_bytes()
    in_ram = 0 if device is not None and device.weights_execute_in_place else stored
    return MemoryBreakdown(
        weights_stored_bytes=stored, weights_ram_bytes=in_ram, activations_bytes=0, kv_cache_bytes=0,
        weight_block_bytes=0, buffers_bytes=0, working_peak_bytes=0, peak_phase="unknown", total_ram_bytes=in_ram,
    )


def fit_audio(model: Any) -> str:
    """What `fit_model` assumes a batch row is, for a table title."""
    if _is_wav2vec2(model):
        return f"one {WAV2VEC2_AUDIO_SECONDS:g} s utterance"
    return f"one {_WINDOW_SECONDS:g} s window"


def fit_model(model: Any, device: DeviceProfile, batch_windows: int = 1) -> FitReport:
    """Whether `model` (as quantized) fits `device` for `fit_audio(model)` per batch row (one
    30 s window for Whisper, one 35 s utterance for wav2vec2), no audio run."""
    store = DeviceWeightStore.from_store(model.store)
    report = check_fit(estimate_memory(model, store, device, batch_windows), device)
    report.batch_size = batch_windows
    return report


class DeviceSession:
    """One run's device: the wrapped model, the fit verdict so far and the compute counter."""

    def __init__(self, model: Any, device: DeviceProfile, batch_size: int = 1, block_bytes: int = DEFAULT_BLOCK_BYTES):
        self.device = device
        self.batch_size = batch_size
        self._base = model
        plain = DeviceWeightStore.from_store(model.store, 0, block_bytes)
        first = check_fit(estimate_memory(model, plain, device, batch_size), device)
        cache = 0
        if first.fits:
            # Half the RAM left over may hold float copies of whole layers (faster, and the
            # other half stays free for what the estimate cannot see, e.g. an OS).
            cache = max(0, (device.ram_bytes - first.breakdown.total_ram_bytes) // 2)
        self.store = DeviceWeightStore.from_store(model.store, cache, block_bytes)
        self.counter = ComputeCountingStore(self.store)
        self.report: FitReport = check_fit(estimate_memory(model, self.store, device, batch_size, cache_bytes=cache), device)
        self.report.batch_size = batch_size
        self.exceeded = False
        self.model = _BudgetedModel(model.with_store(self.counter), self)

    @property
    def fits(self) -> bool:
        return self.report.fits

    def _before(self, audios: list[np.ndarray]) -> None:
        seconds = max(len(a) for a in audios) / self._base.sample_rate
        if _is_wav2vec2(self._base):
            batch = len(audios)  # utterances, each run alone on its own length
        else:
            batch = len(audios) * max(1, int(np.ceil(seconds / _WINDOW_SECONDS)))
        estimate = estimate_memory(self._base, self.store, self.device, batch, seconds, self.store.cache_bytes)
        verdict = check_fit(estimate, self.device, self.report.measured_peak_bytes)
        if not verdict.fits:
            self._fail(verdict)

    def _after(self, audios: list[np.ndarray], peak: int) -> None:
        # the waveforms are part of the working set, though loaded before the measurement
        working = peak + sum(int(np.asarray(a).nbytes) for a in audios)
        self.report.measured_peak_bytes = max(self.report.measured_peak_bytes or 0, working)
        verdict = check_fit(self.report.breakdown, self.device, self.report.measured_peak_bytes)
        if not verdict.fits:
            self._fail(verdict)

    def _fail(self, verdict: FitReport) -> None:
        verdict.measured_peak_bytes = self.report.measured_peak_bytes
        verdict.batch_size = self.batch_size
        self.report = verdict
        self.exceeded = True
        raise DoesNotFitError(verdict.reason)

    def compute(self) -> ComputeReport:
        return self.counter.report()

    def record(self) -> dict[str, Any]:
        """What a result file's `device` field holds."""
        record = self.report.model_dump(mode="json")
        record["compute"] = self.compute().model_dump(mode="json")
        return record


class _BudgetedModel:
    """The model as the runner sees it: same interface, transcribe under the device budget."""

    def __init__(self, model: Any, session: DeviceSession):
        self._model = model
        self._session = session

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._model, attr)

    def transcribe(self, audios: list[np.ndarray]) -> list[str]:
        import time

        self._session._before(audios)
        t0 = time.perf_counter()
        texts, peak = measure_peak(lambda: self._model.transcribe(audios))
        self._session.counter.wall_seconds += time.perf_counter() - t0
        self._session._after(audios, peak)
        return texts
