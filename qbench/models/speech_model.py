"""What the harness needs from any speech model: one interface for Whisper and wav2vec 2.0.

Quantizers, calibration, memory accounting and the runner only ever talk to this protocol, so
a new architecture is a new file in `qbench/models/` that satisfies it, its memory model
(`working_memory`) included.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from qbench.models.weight_store import WeightInfo, WeightStore
from qbench.models.working_memory import StreamingStore, WorkingMemory


class SpeechModel(Protocol):
    """A numpy ASR model whose every weight matmul goes through `self.store`."""

    #: registry name, e.g. "whisper-tiny.en"
    name: str
    #: the parameters; replace it (`with_store`) to run with quantized or packed weights
    store: WeightStore
    sample_rate: int
    #: the audio `qbench fit` assumes per batch row when none is at hand, in seconds
    fit_audio_seconds: float

    @property
    def fit_audio(self) -> str:
        """What that batch row is, for a table title: "one 30 s window"."""
        ...

    def quantizable_weights(self) -> list[WeightInfo]:
        """Every weight matrix the quantization policy may touch, in execution order."""
        ...

    def with_store(self, store: WeightStore) -> SpeechModel:
        """The same model running on other parameters (same names and shapes)."""
        ...

    def with_encoder_seconds(self, seconds: float | None) -> SpeechModel:
        """The same model encoding at most `seconds` of audio at a time (None: its default, a
        30 s Whisper window or a whole wav2vec2 utterance): Whisper encodes shorter windows
        (fewer positions, as whisper.cpp's `audio_ctx`), wav2vec2 independent chunks."""
        ...

    def lean_memory(self, store: StreamingStore, utterances: int, audio_seconds: float,
                    activation_bytes: float, kv_bytes: float) -> WorkingMemory:
        """What a lean embedded runtime holds, phase by phase, to transcribe like `transcribe`:
        only the buffers the computation needs alive, in the order the model runs, activations
        at `activation_bytes` per value where a linear's input is stored quantized, the KV cache
        at `kv_bytes`, the residual stream and accumulators in float32, weights read in place."""
        ...

    def transcribe(self, audios: list[np.ndarray]) -> list[str]:
        """Raw (unnormalized) transcripts of a batch of 16 kHz mono float32 waveforms."""
        ...

    def calibration_forward(self, audios: list[np.ndarray], count_padding: bool = True) -> None:
        """One forward pass over all calibration audio, for capturing layer inputs.

        Contract: every matrix of `quantizable_weights()` is passed through `store.linear`
        exactly once, with the inputs of all calibration utterances stacked along the leading
        axes, and layers are called in execution order with inputs computed by the layers before
        them as the store returns them. A store that quantizes a layer on first use therefore
        gets GPTQ's sequential calibration (each layer sees the outputs of the already-quantized
        layers before it) from a single pass.

        Where inputs are padded to stack them, the padded rows are calibration data too unless
        `count_padding` is False: then the pass marks the rows inference would feed with
        `store.counting_rows`, and only those count.
        """
        ...

    def teacher_forcing_targets(self, audios: list[np.ndarray]) -> list[Any]:
        """What `output_log_probs` conditions on, computed once with the float model: Whisper's
        own greedy transcript of each window (in-distribution text, as calibration uses; the
        upper-case LibriSpeech references are text Whisper never writes), nothing for CTC."""
        ...

    def output_log_probs(self, audios: list[np.ndarray], targets: list[Any], cache: dict | None = None) -> np.ndarray:
        """float32 `[positions, vocab]` log-probabilities of the output distribution at every
        scored position, teacher-forced on `targets` (Whisper: each target token's prediction;
        wav2vec2: every CTC frame), all utterances concatenated in order. Comparing these
        between the float and a quantized store measures a layer's damage (`qbench sensitivity`).
        `cache`, passed across calls on the same audio, lets the model keep work that depends on
        float layers only (Whisper's float encoder output when only decoder layers differ)."""
        ...

    def working_memory(self, store: StreamingStore, utterances: int, audio_seconds: float) -> WorkingMemory:
        """What `transcribe` of `utterances` utterances of up to `audio_seconds` each holds at its
        peak on a device store (`qbench.embedded.device_store.DeviceWeightStore`), phase by
        phase as the code is written; the weights at rest are the store's and not counted.

        An architecture without a memory model returns `WorkingMemory()` (no phases): its
        device runs are then checked by the measured peak alone.
        """
        ...
