"""A run's bytes on an emulated device, measured peaks, and whether the model fits.

Two views of the same run that must agree (tests hold them within 10 %):

* the model's memory model (`SpeechModel.working_memory`) counts, phase by phase, what its
  code allocates at its peak on a `DeviceWeightStore`; `MemoryBreakdown.of` adds the weights,
  in RAM or executed in place as the device decides;
* `measure_peak` runs real work under tracemalloc, which sees every numpy data allocation.

`check_fit` applies the device's storage and RAM rules to both.
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, Field

from qbench.embedded.devices import DeviceProfile
from qbench.models.weight_store import WeightStore
from qbench.models.working_memory import WorkingMemory


class MemoryBreakdown(BaseModel):
    """Bytes of one run on one device, at the working-memory peak."""

    weights_stored_bytes: int = Field(description="every parameter buffer as stored (packed codes, scales, fp16 rest)")
    weights_ram_bytes: int = Field(description="weights held in RAM: 0 when the device executes them in place")
    activations_bytes: int = Field(description="hidden states and numpy temporaries live at the peak")
    kv_cache_bytes: int = Field(description="decoder self- and cross-attention keys/values live at the peak")
    weight_block_bytes: int = Field(description="one dequantized row block plus its unpacking scratch (in the phases that run a linear)")
    buffers_bytes: int = Field(description="audio, log-mel, attention scores live at the peak")
    cache_bytes: int = Field(0, description="float copies of whole layers kept because the budget allows")
    working_peak_bytes: int
    peak_phase: str = Field(description="the model's phase where the working memory peaks (its `working_memory` "
                                        "names them, e.g. encoder-attention for Whisper, positional-conv for wav2vec2); "
                                        "unknown without a memory model")
    total_ram_bytes: int = Field(description="weights_ram_bytes + working_peak_bytes")
    #: every phase's working bytes, to show how far the others are from the peak
    phases: dict[str, int] = Field(default_factory=dict)

    @classmethod
    def of(cls, working: WorkingMemory, store: WeightStore, device: DeviceProfile | None) -> MemoryBreakdown:
        """The model's working memory on `store`, with the weights in RAM unless `device`
        executes them in place (no device: in RAM)."""
        stored = store.stored_bytes()
        in_ram = 0 if device is not None and device.weights_execute_in_place else stored
        peak = working.peak
        return cls(
            weights_stored_bytes=stored,
            weights_ram_bytes=in_ram,
            activations_bytes=peak.activations_bytes,
            kv_cache_bytes=peak.kv_cache_bytes,
            weight_block_bytes=peak.weight_block_bytes,
            buffers_bytes=peak.buffers_bytes,
            cache_bytes=peak.cache_bytes,
            working_peak_bytes=peak.total_bytes,
            peak_phase=working.peak_phase or "unknown",
            total_ram_bytes=in_ram + peak.total_bytes,
            phases={name: phase.total_bytes for name, phase in working.phases.items()},
        )


# -- measuring ------------------------------------------------------------------------------


def measure_peak(fn: Callable[[], Any]) -> tuple[Any, int]:
    """`fn()` and the peak bytes numpy (and Python) allocated above what was live at the start.

    tracemalloc sees numpy's data buffers (numpy reports them to it), so this is the working
    memory of the call; arrays that existed before (the weights) are not counted.
    """
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        result = fn()
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        if started:
            tracemalloc.stop()
    return result, max(0, peak)


# -- the verdict ----------------------------------------------------------------------------


class FitReport(BaseModel):
    """Whether a model fits a device, as recorded in a result's `device` field."""

    profile: DeviceProfile
    fits: bool
    reason: str | None = None
    breakdown: MemoryBreakdown
    measured_peak_bytes: int | None = Field(None, description="largest tracemalloc working peak over the measured batches")
    batch_size: int = 1
    batch_size_chosen: bool = Field(False, description="the session chose the batch size (the largest of 1, 2, 4, 8 "
                                                       "that fits with the measured-peak margin); False: given")
    batches: int = Field(0, description="batches transcribed on the device, each checked by the accountant before it ran")
    measurement: str | None = Field(None, description="which batches tracemalloc measured: 'first+highest-estimate' is "
                                                      "the first and every one whose estimate was above all measured before")
    measured_batches: list[int] = Field(default_factory=list, description="0-based indices, among the batches "
                                                                          "transcribed, of those measured")


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def check_fit(breakdown: MemoryBreakdown, device: DeviceProfile, measured_peak: int | None = None) -> FitReport:
    """Apply the device's storage and RAM rules to the accounting (and a measured peak, if any)."""
    b = breakdown
    working = max(b.working_peak_bytes, measured_peak or 0)
    needs = b.weights_ram_bytes + working
    problems = []
    if b.weights_stored_bytes > device.storage_bytes:
        problems.append(f"weights need {_mb(b.weights_stored_bytes)} of storage, device has {_mb(device.storage_bytes)}")
    if needs > device.ram_bytes:
        measured = " (measured)" if measured_peak is not None and measured_peak > b.working_peak_bytes else ""
        problems.append(f"needs {_mb(needs)} RAM{measured}, device has {_mb(device.ram_bytes)}")
    reason = None
    if problems:
        reason = (
            f"does not fit on {device.name}: {'; '.join(problems)} (weights {_mb(b.weights_ram_bytes)} in RAM, "
            f"activations {_mb(b.activations_bytes)}, KV cache {_mb(b.kv_cache_bytes)}, weight block {_mb(b.weight_block_bytes)}, "
            f"buffers {_mb(b.buffers_bytes)}, cache {_mb(b.cache_bytes)}; peak in {b.peak_phase})"
        )
    return FitReport(profile=device, fits=reason is None, reason=reason, breakdown=b, measured_peak_bytes=measured_peak)
