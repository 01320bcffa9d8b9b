"""Running a model under an emulated device: the budget check before, during and after a run.

`DeviceSession` puts a model on a device: its weights in a `DeviceWeightStore` (float copies
only one row block at a time, plus a whole-layer cache when the budget leaves room), a compute
counter around it, and a `transcribe` that checks every batch against the budget and stops the
run with `DoesNotFitError` as soon as the device is exceeded.

Every batch is checked by the model's memory model before it runs (its own length and rows).
The real measurement (tracemalloc) runs on a few batches only, because tracing every allocation
of a batch costs time and the accountant is held within 10 % of it by the tests
(tests/test_memory_budget.py, tests/test_wav2vec2_memory.py): the first batch (it also fills
the layer cache) and every batch whose estimate is above all those measured before it. The
batch with the largest estimate (the one holding the longest utterance) is therefore always
measured, and every batch left unmeasured has an estimate no higher than a measured one. A
measured peak above the budget stops the run as before; the device record says which batches
were measured (`measurement`, `measured_batches`).

Without a batch size the session picks the largest of `DEVICE_BATCH_SIZES` whose estimate fits
the RAM with `MEASURED_PEAK_MARGIN` to spare, keeping the layer cache a batch of one would get:
which layers are cached decides how a linear is computed (a cached layer is one matmul, a
streamed one a matmul per row block, and the two round differently), and every row of a batch
goes through the same matmuls as it would alone (`DeviceWeightStore.linear`), so the chosen
batch size never changes a transcript. Batches larger than one let the model work in threads
(`_threads_for`).
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from qbench.embedded.compute import ComputeCountingStore, ComputeReport
from qbench.embedded.device_store import DEFAULT_BLOCK_BYTES, DeviceWeightStore
from qbench.embedded.devices import DeviceProfile
from qbench.embedded.memory import FitReport, MemoryBreakdown, check_fit, measure_peak
from qbench.errors import QBenchError
from qbench.models.speech_model import SpeechModel
from qbench.quant.activation_scheme import ActivationRecord
from qbench.quant.activation_store import ActivationQuantizingStore

#: Batch sizes a device run chooses from when none is given (the largest that fits).
DEVICE_BATCH_SIZES = (1, 2, 4, 8)
#: Room kept above the accountant's working peak when the session chooses a batch size: the
#: tests hold the estimate within 10 % of tracemalloc, so a batch chosen with 10 % to spare is
#: not stopped later by its measured peak (an explicit batch size is checked without it).
MEASURED_PEAK_MARGIN = 0.10
#: What `measured_batches` holds, in a result's device record.
MEASUREMENT = "first+highest-estimate"


class DoesNotFitError(QBenchError, RuntimeError):
    """The model does not fit the device; the message is the one-line verdict with the numbers."""


class BatchSizeError(QBenchError, ValueError):
    """A batch size given for a device run that does not fit it, though a batch of one does."""


def estimate_memory(model: SpeechModel, store: DeviceWeightStore, device: DeviceProfile | None, utterances: int = 1,
                    audio_seconds: float | None = None, activations: ActivationRecord | None = None) -> MemoryBreakdown:
    """The model's memory model for `utterances` utterances of up to `audio_seconds` each
    (default: what `qbench fit` assumes, `model.fit_audio_seconds`) on `store`, and the weights.

    Float32 activations: the numpy implementation's own memory model (`working_memory`, held to
    tracemalloc by the tests). Quantized activations: the lean embedded runtime's
    (`lean_memory`), with activations and the KV cache at their stored precision; the numpy
    emulation, which computes in float32 and float64, is then not what a device would hold."""
    seconds = model.fit_audio_seconds if audio_seconds is None else audio_seconds
    if activations is None:
        return MemoryBreakdown.of(model.working_memory(store, utterances, seconds), store, device)
    act_bytes, kv_bytes = stored_activation_bytes(activations)
    return MemoryBreakdown.of(model.lean_memory(store, utterances, seconds, act_bytes, kv_bytes), store, device)


def stored_activation_bytes(activations: ActivationRecord | None) -> tuple[float, float]:
    """Bytes per stored activation value and per KV-cache value (packed codes: bits / 8)."""
    if activations is None:
        return 4.0, 4.0
    bits = activations.scheme.bits / 8
    return bits, bits if activations.kv_cache else 4.0


def fit_audio(model: SpeechModel) -> str:
    """What `fit_model` assumes a batch row is, for a table title ("one 30 s window")."""
    return model.fit_audio


def fit_model(model: SpeechModel, device: DeviceProfile, batch_size: int = 1,
              activations: ActivationRecord | None = None) -> FitReport:
    """Whether `model` (as quantized, with `activations` quantized so) fits `device` for
    `batch_size` rows of `fit_audio(model)`, no audio run."""
    store = DeviceWeightStore.from_store(model.store)
    report = check_fit(estimate_memory(model, store, device, batch_size, activations=activations), device)
    report.batch_size = batch_size
    return report


def _threads_for(batch_size: int) -> bool:
    """Whether a device store for batches of `batch_size` lets the model work in threads.

    A batch of one runs as before, in one thread of work (the runs of committed entries, and
    the memory models' exact case); a larger batch may spread independent work over the cores
    (the Whisper encoder's windows: 1.4x faster on two cores), which the memory model counts.
    Whisper's output is the same either way (OpenBLAS splits a GEMM without reordering sums).
    """
    return batch_size > 1


def fits_with_margin(report: FitReport, margin: float = MEASURED_PEAK_MARGIN) -> bool:
    """`report` fits, and would still with its working peak `margin` larger."""
    b = report.breakdown
    return report.fits and b.weights_ram_bytes + math.ceil(b.working_peak_bytes * (1 + margin)) <= report.profile.ram_bytes


class DeviceSession:
    """One run's device: the wrapped model, the fit verdict so far and the compute counter.

    `batch_size` None: the largest of `DEVICE_BATCH_SIZES` that fits with `MEASURED_PEAK_MARGIN`
    (1 when none larger does); a given size that does not fit while 1 does raises
    `BatchSizeError`, one that does not fit at all is the verdict (`fits` False).
    """

    def __init__(self, model: SpeechModel, device: DeviceProfile, batch_size: int | None = 1,
                 block_bytes: int = DEFAULT_BLOCK_BYTES, longest_seconds: float | None = None,
                 activations: ActivationRecord | None = None):
        self.device = device
        self.activations = activations
        self._base = model
        self._block_bytes = block_bytes
        # a batch size is chosen (and a given one refused) for the run's longest utterance (a
        # Whisper utterance over 30 s is two windows per row); the cache and the recorded
        # breakdown stay at the model's fit length, as `qbench fit` and committed entries count
        # them (a rerun of an entry records the same figures), and every batch is checked at
        # its own length before it runs
        self._seconds = longest_seconds
        first = self._verdict(1, 0, None)
        cache = 0
        if first.fits:
            # Half the RAM a batch of one leaves over may hold float copies of whole layers
            # (faster, and the other half stays free for what the estimate cannot see).
            cache = max(0, (device.ram_bytes - first.breakdown.total_ram_bytes) // 2)
        chosen = batch_size is None
        if chosen:
            batch_size = self._largest_batch(cache)
        elif batch_size > 1 and not self._verdict(batch_size, cache).fits:
            plain = self._verdict(batch_size, 0)
            if not plain.fits and first.fits:
                raise BatchSizeError(f"batch size {batch_size} {plain.reason}; batch size {self._largest_batch(cache)} "
                                     f"fits (the default on {device.name})")
            # a batch too large for that cache gets the cache its own leftover allows
            cache = max(0, (device.ram_bytes - plain.breakdown.total_ram_bytes) // 2) if plain.fits else 0
        self.batch_size = batch_size
        self.store = DeviceWeightStore.from_store(model.store, cache, block_bytes, _threads_for(batch_size))
        inner = self.store if activations is None else ActivationQuantizingStore(self.store, activations)
        self.counter = ComputeCountingStore(inner)
        self.report: FitReport = check_fit(estimate_memory(model, self.store, device, batch_size,
                                                           activations=activations), device)
        self.report.batch_size = batch_size
        self.report.batch_size_chosen = chosen
        self.report.measurement = MEASUREMENT
        self.exceeded = False
        self._highest_measured = -1  # the largest estimate among the measured batches
        self.model = _BudgetedModel(model.with_store(self.counter), self)

    def _verdict(self, batch_size: int, cache: int, seconds: float | None | str = "longest") -> FitReport:
        """The fit of `batch_size` rows of `seconds` (default: the run's longest utterance, if
        known; None: the model's fit length) with a `cache`-byte layer cache."""
        seconds = self._seconds if seconds == "longest" else seconds
        store = DeviceWeightStore.from_store(self._base.store, cache, self._block_bytes, _threads_for(batch_size))
        return check_fit(estimate_memory(self._base, store, self.device, batch_size, seconds, self.activations), self.device)

    def _largest_batch(self, cache: int) -> int:
        """The largest of `DEVICE_BATCH_SIZES` that fits with a `cache`-byte layer cache and
        `MEASURED_PEAK_MARGIN` to spare; 1 when no larger one does."""
        return next((n for n in sorted(DEVICE_BATCH_SIZES, reverse=True)
                     if n > 1 and fits_with_margin(self._verdict(n, cache))), 1)

    @property
    def fits(self) -> bool:
        return self.report.fits

    def _before(self, audios: list[np.ndarray]) -> bool:
        """Check the batch against the budget before it runs; True if it is to be measured."""
        seconds = max(len(a) for a in audios) / self._base.sample_rate
        estimate = estimate_memory(self._base, self.store, self.device, len(audios), seconds, self.activations)
        verdict = check_fit(estimate, self.device, self._binding_peak())
        if not verdict.fits:
            self._fail(verdict)
        index = self.report.batches
        self.report.batches += 1
        if index == 0 or estimate.working_peak_bytes > self._highest_measured:
            self._highest_measured = max(self._highest_measured, estimate.working_peak_bytes)
            self.report.measured_batches.append(index)
            return True
        return False

    def _after(self, audios: list[np.ndarray], peak: int, held: int = 0) -> None:
        # the waveforms are part of the working set, though loaded before the measurement, and
        # so are the float layers cached by earlier batches (`held`), which the estimate counts
        working = peak + held + sum(int(np.asarray(a).nbytes) for a in audios)
        self.report.measured_peak_bytes = max(self.report.measured_peak_bytes or 0, working)
        verdict = check_fit(self.report.breakdown, self.device, self._binding_peak())
        if not verdict.fits:
            self._fail(verdict)

    def _binding_peak(self) -> int | None:
        """The measured peak the budget holds a run to: tracemalloc's where the numpy
        implementation is what the device runs (float32 activations); with quantized activations
        the emulation's float buffers are not a device's, and the lean accountant alone binds
        (the measurement stays in the record)."""
        return self.report.measured_peak_bytes if self.activations is None else None

    def _fail(self, verdict: FitReport) -> None:
        verdict.measured_peak_bytes = self.report.measured_peak_bytes
        for field in ("batch_size", "batch_size_chosen", "batches", "measurement", "measured_batches"):
            setattr(verdict, field, getattr(self.report, field))
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
        session = self._session
        measure = session._before(audios)
        held = session.store.cached_bytes()
        t0 = time.perf_counter()
        if measure:
            texts, peak = measure_peak(lambda: self._model.transcribe(audios))
        else:
            texts = self._model.transcribe(audios)
        session.counter.wall_seconds += time.perf_counter() - t0
        if measure:
            session._after(audios, peak, held)
        return texts
