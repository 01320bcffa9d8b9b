"""A static activation scheme's calibration: statistics of every layer input, scales from the plugin.

The harness runs the (weight-quantized) model's calibration pass once and measures each linear's
input as the layer's kernel would quantize it (after the layer's own input scales or rotation),
as `ActivationStats`; the scheme's plugin turns each into a `StaticActivationScale` in its own
process. Only the statistics cross to the plugin, never the audio.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from qbench.models.speech_model import SpeechModel
from qbench.quant.apply import RowCountingStore, counted_rows
from qbench.quant.activation_scheme import (
    ActivationStats,
    StaticActivationScale,
    collect_stats,
)


class _RecordingStore(RowCountingStore):
    """Delegates to `inner`; measures every `linear` input on the way. `params` are the float
    parameters, which a model's calibration pass reads to build its float twin (Whisper's
    teacher-forced targets come from the float model)."""

    thread_safe = False

    def __init__(self, inner, float_params):
        self.inner = inner
        self.params = float_params
        self.stats: dict[str, ActivationStats] = {}

    def __getattr__(self, attr):
        return getattr(self.inner, attr)

    def linear(self, name: str, x: np.ndarray) -> np.ndarray:
        pt = (getattr(self.inner, "packed", None) or {}).get(name)
        x_in = pt.transform_input(x) if pt is not None and pt.transforms_input else x
        if name in self.stats:  # a layer called again (it should not be, by the calibration contract)
            raise RuntimeError(f"calibration pass ran {name} twice")
        self.stats[name] = collect_stats([counted_rows(name, x_in, self._rows)])
        return self.inner.linear(name, x)


def activation_statistics(model: SpeechModel, audios: list[np.ndarray], float_params: Mapping[str, np.ndarray],
                          count_padding: bool = True) -> dict[str, ActivationStats]:
    """Every linear input's statistics over one calibration pass of `audios` on `model` (its
    weights as quantized); `float_params` are the unquantized model's parameters;
    `count_padding` as in `SpeechModel.calibration_forward`."""
    recorder = _RecordingStore(model.store, float_params)
    model.with_store(recorder).calibration_forward(audios, **({} if count_padding else {"count_padding": False}))
    return recorder.stats


def static_scales(model: SpeechModel, audios: list[np.ndarray], float_params: Mapping[str, np.ndarray],
                  calibrate: Callable[[str, ActivationStats], StaticActivationScale],
                  count_padding: bool = True) -> dict[str, StaticActivationScale]:
    """`calibrate(layer, stats)` of every linear input, in execution order."""
    stats = activation_statistics(model, audios, float_params, count_padding)
    return {name: calibrate(name, s) for name, s in stats.items()}
