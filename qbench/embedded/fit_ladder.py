"""Which configurations fit each device rung, and what binds: `qbench fit --ladder`.

A configuration is the weights' bits per parameter (every matrix, the embedding included, at
that average; None: as stored, float16), the activation bits (None: float32, the numpy
implementation's memory model; else the lean embedded runtime's, `SpeechModel.lean_memory`),
whether the KV cache is stored at the activation bits, and the encoder window. Weights are sized
from the model's real buffers (every non-matrix parameter as stored, the matrices at the given
bits), so a row is what a quantizer at that average would need, before any audio is run.

For each rung the best fitting configuration is the first in `CONFIGURATIONS` order (most
weight bits, then the longest window, then the most activation precision) that fits; the binding
constraint is what stops the configuration before it.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, Field

from qbench.embedded.device_store import DeviceWeightStore
from qbench.embedded.memory import MemoryBreakdown, check_fit
from qbench.embedded.profile import DeviceProfile
from qbench.models.speech_model import SpeechModel


class FitConfiguration(BaseModel):
    weight_bits: float | None = Field(description="bits per parameter of every matrix; None: as stored")
    activation_bits: int | None = Field(description="bits of every linear input; None: float32")
    kv_cache_bits: int | None = Field(description="bits of the KV cache; None: float32")
    encoder_seconds: float | None = Field(description="audio per encoder pass; None: the model's default")

    @property
    def label(self) -> str:
        w = "fp16" if self.weight_bits is None else f"W{self.weight_bits:g}"
        a = "A32" if self.activation_bits is None else f"A{self.activation_bits}"
        kv = "" if self.kv_cache_bits is None else f" KV{self.kv_cache_bits}"
        enc = "" if self.encoder_seconds is None else f" {self.encoder_seconds:g} s window"
        return f"{w} {a}{kv}{enc}"


def _configurations() -> list[FitConfiguration]:
    out = []
    for w in (None, 8.25, 4.25, 3.25, 2.25):
        for enc in (None, 10.0, 5.0):
            for a, kv in ((None, None), (8, None), (8, 8), (4, 4)):
                out.append(FitConfiguration(weight_bits=w, activation_bits=a, kv_cache_bits=kv, encoder_seconds=enc))
    return out


#: best first: most weight bits, then the longest window (a shorter one changes what the
#: model sees), then the most activation precision
CONFIGURATIONS: tuple[FitConfiguration, ...] = tuple(_configurations())


class ConfigurationFit(BaseModel):
    configuration: FitConfiguration
    weights_bytes: int
    working_peak_bytes: int
    peak_phase: str
    total_ram_bytes: int
    fits: bool
    reason: str | None = None


class RungFit(BaseModel):
    device: DeviceProfile
    best: ConfigurationFit | None = Field(description="the first configuration (best first) that fits; None: none does")
    binding: str | None = Field(description="why the configuration before the best one does not fit")
    fitting: int = Field(description="how many of the configurations fit")


def weights_bytes(model: SpeechModel, bits: float | None) -> int:
    """Every parameter as stored, the weight matrices at `bits` per parameter (None: as stored)."""
    store = model.store
    if bits is None:
        return store.stored_bytes()
    matrices = {info.name + ".weight": info.numel for info in store.weight_infos()}
    rest = sum(int(np.asarray(p).nbytes) for name, p in store.params.items() if name not in matrices)
    return rest + int(np.ceil(sum(matrices.values()) * bits / 8))


def configuration_fit(model: SpeechModel, device: DeviceProfile, config: FitConfiguration) -> ConfigurationFit:
    """One configuration on one device, batch 1, one window (or utterance) of the model's fit length."""
    m = model.with_encoder_seconds(config.encoder_seconds)
    store = DeviceWeightStore.from_store(m.store)
    seconds = m.fit_audio_seconds
    if config.activation_bits is None and config.kv_cache_bits is None:
        working = m.working_memory(store, 1, seconds)
    else:
        act = 4.0 if config.activation_bits is None else config.activation_bits / 8  # float32: 4 bytes
        kv = 4.0 if config.kv_cache_bits is None else config.kv_cache_bits / 8
        working = m.lean_memory(store, 1, seconds, act, kv)
    stored = weights_bytes(m, config.weight_bits)
    peak = working.peak
    in_ram = 0 if device.weights_execute_in_place else stored
    breakdown = MemoryBreakdown(
        weights_stored_bytes=stored, weights_ram_bytes=in_ram, activations_bytes=peak.activations_bytes,
        kv_cache_bytes=peak.kv_cache_bytes, weight_block_bytes=peak.weight_block_bytes, buffers_bytes=peak.buffers_bytes,
        cache_bytes=peak.cache_bytes, working_peak_bytes=peak.total_bytes, peak_phase=working.peak_phase or "unknown",
        total_ram_bytes=in_ram + peak.total_bytes,
        phases={name: phase.total_bytes for name, phase in working.phases.items()},
    )
    report = check_fit(breakdown, device)
    return ConfigurationFit(configuration=config, weights_bytes=stored, working_peak_bytes=peak.total_bytes,
                            peak_phase=breakdown.peak_phase, total_ram_bytes=breakdown.total_ram_bytes,
                            fits=report.fits, reason=report.reason)


def ladder_fits(model: SpeechModel, devices: list[DeviceProfile]) -> list[RungFit]:
    """For each device, the best fitting configuration and what binds the one before it."""
    rungs = []
    for device in devices:
        fits = [configuration_fit(model, device, c) for c in CONFIGURATIONS]
        best = next((i for i, f in enumerate(fits) if f.fits), None)
        binding = None
        if best is None:
            binding = fits[-1].reason
        elif best > 0:
            binding = fits[best - 1].reason
        rungs.append(RungFit(device=device, best=fits[best] if best is not None else None, binding=binding,
                             fitting=sum(f.fits for f in fits)))
    return rungs
