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
from qbench.embedded.device_store import DEFAULT_BLOCK_BYTES, DeviceWeightStore
from qbench.embedded.devices import DeviceProfile
from qbench.embedded.memory import FitReport, MemoryBreakdown, check_fit, measure_peak
from qbench.errors import QBenchError
from qbench.models.speech_model import SpeechModel


class DoesNotFitError(QBenchError, RuntimeError):
    """The model does not fit the device; the message is the one-line verdict with the numbers."""


def estimate_memory(model: SpeechModel, store: DeviceWeightStore, device: DeviceProfile | None, utterances: int = 1,
                    audio_seconds: float | None = None) -> MemoryBreakdown:
    """The model's memory model for `utterances` utterances of up to `audio_seconds` each
    (default: what `qbench fit` assumes, `model.fit_audio_seconds`) on `store`, and the weights."""
    seconds = model.fit_audio_seconds if audio_seconds is None else audio_seconds
    return MemoryBreakdown.of(model.working_memory(store, utterances, seconds), store, device)


def fit_audio(model: SpeechModel) -> str:
    """What `fit_model` assumes a batch row is, for a table title ("one 30 s window")."""
    return model.fit_audio


def fit_model(model: SpeechModel, device: DeviceProfile, batch_size: int = 1) -> FitReport:
    """Whether `model` (as quantized) fits `device` for `batch_size` rows of `fit_audio(model)`,
    no audio run."""
    store = DeviceWeightStore.from_store(model.store)
    report = check_fit(estimate_memory(model, store, device, batch_size), device)
    report.batch_size = batch_size
    return report


class DeviceSession:
    """One run's device: the wrapped model, the fit verdict so far and the compute counter."""

    def __init__(self, model: SpeechModel, device: DeviceProfile, batch_size: int = 1, block_bytes: int = DEFAULT_BLOCK_BYTES):
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
        self.report: FitReport = check_fit(estimate_memory(model, self.store, device, batch_size), device)
        self.report.batch_size = batch_size
        self.exceeded = False
        self.model = _BudgetedModel(model.with_store(self.counter), self)

    @property
    def fits(self) -> bool:
        return self.report.fits

    def _before(self, audios: list[np.ndarray]) -> None:
        seconds = max(len(a) for a in audios) / self._base.sample_rate
        estimate = estimate_memory(self._base, self.store, self.device, len(audios), seconds)
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
