"""The wav2vec2 memory accountant against tracemalloc.

Real widths and norm modes of both checkpoint families (base: group norm, post-LN; large:
layer norm, pre-LN, conv bias) with seeded random weights and one transformer layer: the peak
does not depend on depth (a layer frees what it allocates), and one layer keeps a run short.
4 s peaks in the feature encoder's chunk, 20 s in the positional conv's im2col columns, 2 s
runs the unchunked feature encoder.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from qbench.memory_budget import DeviceWeightStore, estimate_wav2vec2_memory, measure_peak
from qbench.models.wav2vec2 import Wav2Vec2, Wav2Vec2Config, weight_infos
from qbench.quantize import quantize_model
from tests.test_memory_budget import _RTN4
from tests.test_wav2vec2_parity import FIXTURES, _random_model

BASE, LARGE = "wav2vec2-base-960h", "wav2vec2-large-960h-lv60-self"


def _one_layer(name: str) -> Wav2Vec2:
    hf = json.loads((FIXTURES / name / "config.json").read_text())
    hf["num_hidden_layers"] = 1
    return _random_model(Wav2Vec2Config.from_hf(hf))


@pytest.fixture(scope="module")
def models() -> dict[str, Wav2Vec2]:
    return {name: _one_layer(name) for name in (BASE, LARGE)}


@pytest.fixture(scope="module")
def base_rtn4(models) -> Wav2Vec2:
    from pydantic import BaseModel

    class Cfg(BaseModel):
        pass

    _RTN4.Config = Cfg
    model, _ = quantize_model(models[BASE], _RTN4(Cfg()))
    return model


def _audio(seconds: float, seed: int = 0) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(int(seconds * 16000))).astype(np.float32)


def _measured_and_estimated(model: Wav2Vec2, seconds: float, **store_kwargs):
    store = DeviceWeightStore.from_store(model.store, **store_kwargs)
    audio = _audio(seconds)
    _, peak = measure_peak(lambda: model.with_store(store).logits(audio))
    estimate = estimate_wav2vec2_memory(model.config, store, audio_seconds=seconds, **store_kwargs)
    # the waveform is part of the working set, though allocated before the measurement
    return peak + audio.nbytes, estimate


@pytest.mark.parametrize(("name", "seconds", "phase"), [
    (BASE, 2.0, "feature-encoder"),  # 100 frames: one unchunked pass
    (BASE, 4.0, "feature-encoder"),
    (BASE, 20.0, "positional-conv"),
    (LARGE, 4.0, "feature-encoder"),
    (LARGE, 20.0, "positional-conv"),
])
def test_accountant_agrees_with_tracemalloc(models, name, seconds, phase):
    measured, estimate = _measured_and_estimated(models[name], seconds)
    print(f"{name} {seconds:g} s: measured {measured}, estimated {estimate.working_peak_bytes} ({estimate.peak_phase})")
    assert abs(estimate.working_peak_bytes - measured) <= 0.10 * measured, (estimate.phases, measured)
    assert estimate.peak_phase == phase and estimate.working_peak_bytes == max(estimate.phases.values())
    assert estimate.kv_cache_bytes == 0 and estimate.cache_bytes == 0


@pytest.mark.parametrize("cache_bytes", [0, 30 * 2**20])
def test_accountant_agrees_with_tracemalloc_on_a_packed_store(base_rtn4, cache_bytes):
    """4-bit codes unpacked one row block at a time while the feature encoder's second conv
    layer runs (the 4 s peak); with a cache, float copies of whole layers fill it as layers
    first run: at that peak only the first two, not the 30 MB filled by the end."""
    measured, estimate = _measured_and_estimated(base_rtn4, 4.0, cache_bytes=cache_bytes)
    print(f"rtn4 4 s cache {cache_bytes}: measured {measured}, estimated {estimate.working_peak_bytes}")
    assert abs(estimate.working_peak_bytes - measured) <= 0.10 * measured, (estimate.phases, measured)
    assert estimate.peak_phase == "feature-encoder"
    if cache_bytes:
        first_two = sum(4 * i.numel for i in base_rtn4.quantizable_weights()[:2])
        assert estimate.cache_bytes == first_two and estimate.weight_block_bytes == 0
    else:
        assert estimate.cache_bytes == 0 and estimate.weight_block_bytes > 0


def _shapes_only(config: Wav2Vec2Config) -> DeviceWeightStore:
    """A device store of the real size without allocating it: every weight a broadcast zero."""
    params = {f"{i.name}.weight": np.broadcast_to(np.float32(0), i.shape) for i in weight_infos(config)}
    return DeviceWeightStore(params, weight_infos(config))


@pytest.mark.parametrize("name", [BASE, LARGE])
def test_estimate_follows_the_utterance_and_the_widths_not_the_depth(models, name):
    full = Wav2Vec2Config.from_hf(json.loads((FIXTURES / name / "config.json").read_text()))
    one = models[name]
    for seconds in (4.0, 20.0, 35.0):
        deep = estimate_wav2vec2_memory(full, _shapes_only(full), audio_seconds=seconds)
        shallow = estimate_wav2vec2_memory(one.config, DeviceWeightStore.from_store(one.store), audio_seconds=seconds)
        assert deep.phases == shallow.phases, seconds
    assert deep.weights_stored_bytes == 4 * sum(i.numel for i in weight_infos(full))
    short = estimate_wav2vec2_memory(full, _shapes_only(full), audio_seconds=20.0)
    assert deep.working_peak_bytes > 1.5 * short.working_peak_bytes  # 35 s: the positional conv grows


def test_large_widths_cost_more_than_base():
    base, large = (Wav2Vec2Config.from_hf(json.loads((FIXTURES / n / "config.json").read_text())) for n in (BASE, LARGE))
    small, big = (estimate_wav2vec2_memory(c, _shapes_only(c), audio_seconds=20.0) for c in (base, large))
    # d 1024 vs 768, and a layer norm (centred copy and square) after every conv layer
    assert big.phases["attention"] > 1.3 * small.phases["attention"]
    assert big.phases["feature-encoder"] > 1.25 * small.phases["feature-encoder"]
