"""The wav2vec2 memory accountant against tracemalloc, and `qbench fit` / device runs using it.

Real widths and norm modes of both checkpoint families (base: group norm, post-LN; large:
layer norm, pre-LN, conv bias) with seeded random weights and one transformer layer: the peak
does not depend on depth (a layer frees what it allocates), and one layer keeps a run short.
4 s peaks in the feature encoder's chunk, 20 s in the positional conv's im2col columns, 2 s
runs the unchunked feature encoder.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from qbench.cli import main
from qbench.embedded.device_store import DeviceWeightStore
from qbench.embedded.devices import DeviceProfile
from qbench.embedded.memory import MemoryBreakdown, measure_peak
from qbench.embedded.session import DeviceSession, DoesNotFitError, estimate_memory, fit_model
from qbench.models.wav2vec2 import Wav2Vec2, Wav2Vec2Config, logits_memory, weight_infos
from qbench.quant.apply import quantize_model
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
    estimate = estimate_memory(model, store, None, 1, seconds)
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
    assert abs(estimate.working_peak_bytes - measured) <= 0.05 * measured, (estimate.phases, measured)
    assert estimate.peak_phase == phase and estimate.working_peak_bytes == max(estimate.phases.values())
    assert estimate.kv_cache_bytes == 0 and estimate.cache_bytes == 0


@pytest.mark.parametrize("cache_bytes", [0, 30 * 2**20])
def test_accountant_agrees_with_tracemalloc_on_a_packed_store(base_rtn4, cache_bytes):
    """4-bit codes unpacked one row block at a time while the feature encoder's second conv
    layer runs (the 4 s peak); with a cache, float copies of whole layers fill it as layers
    first run: at that peak only the first two, not the 30 MB filled by the end."""
    measured, estimate = _measured_and_estimated(base_rtn4, 4.0, cache_bytes=cache_bytes)
    print(f"rtn4 4 s cache {cache_bytes}: measured {measured}, estimated {estimate.working_peak_bytes}")
    assert abs(estimate.working_peak_bytes - measured) <= 0.05 * measured, (estimate.phases, measured)
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


def _estimate(config: Wav2Vec2Config, store: DeviceWeightStore, seconds: float,
              device: DeviceProfile | None = None) -> MemoryBreakdown:
    """The memory model of one utterance of `seconds` on `store`, without a model object."""
    return MemoryBreakdown.of(logits_memory(config, store, seconds), store, device)


@pytest.mark.parametrize("name", [BASE, LARGE])
def test_estimate_follows_the_utterance_and_the_widths_not_the_depth(models, name):
    full = Wav2Vec2Config.from_hf(json.loads((FIXTURES / name / "config.json").read_text()))
    one = models[name]
    for seconds in (4.0, 20.0, 35.0):
        deep = _estimate(full, _shapes_only(full), seconds)
        shallow = _estimate(one.config, DeviceWeightStore.from_store(one.store), seconds)
        assert deep.phases == shallow.phases, seconds
    assert deep.weights_stored_bytes == 4 * sum(i.numel for i in weight_infos(full))
    short = _estimate(full, _shapes_only(full), 20.0)
    assert deep.working_peak_bytes > 1.5 * short.working_peak_bytes  # 35 s: the positional conv grows


def test_large_widths_cost_more_than_base():
    base, large = (Wav2Vec2Config.from_hf(json.loads((FIXTURES / n / "config.json").read_text())) for n in (BASE, LARGE))
    small, big = (_estimate(c, _shapes_only(c), 20.0) for c in (base, large))
    # d 1024 vs 768, and a layer norm (centred copy and square) after every conv layer
    assert big.phases["attention"] > 1.3 * small.phases["attention"]
    assert big.phases["feature-encoder"] > 1.25 * small.phases["feature-encoder"]


def test_fit_reports_a_working_peak_for_wav2vec2(models, monkeypatch, capsys):
    """`qbench fit --model wav2vec2-base-960h` judged weights alone; now the 35 s accountant."""
    model = models[BASE]
    device = DeviceProfile(name="big", ram_bytes=2**31, storage_bytes=2**31, part="test")
    report = fit_model(model, device)
    b = report.breakdown
    expected = _estimate(model.config, DeviceWeightStore.from_store(model.store), 35.0, device)
    assert b.working_peak_bytes == expected.working_peak_bytes > 50 * 2**20
    assert b.peak_phase == "positional-conv" and b.total_ram_bytes == b.weights_ram_bytes + b.working_peak_bytes

    monkeypatch.setattr("qbench.checkpoints.loader.load_model", lambda name, weights=None: SimpleNamespace(model=model))
    assert main(["fit", "--model", BASE, "--json"]) == 0
    rows = {d["profile"]["name"]: d for d in json.loads(capsys.readouterr().out)["devices"]}
    assert all(d["breakdown"]["working_peak_bytes"] == b.working_peak_bytes for d in rows.values())
    assert main(["fit", "--model", BASE, "--device", "pi-zero-2w"]) == 0
    assert "one 35 s utterance" in " ".join(capsys.readouterr().out.split())


def test_device_session_checks_each_batch_at_its_own_length(models):
    """The pre-run check uses 35 s; each batch is checked at its longest utterance before it
    runs, and the measured peak agrees with the estimate for that length."""
    model = models[BASE]
    plain = DeviceWeightStore.from_store(model.store)
    at = {s: estimate_memory(model, plain, None, 1, s).total_ram_bytes for s in (35.0, 60.0)}
    # a batch's utterances run one at a time: only their waveforms add up
    assert estimate_memory(model, plain, None, 3, 35.0).total_ram_bytes == at[35.0] + 2 * 4 * 35 * 16000
    # fits 35 s (and leaves room for a small cache), not 60 s
    device = DeviceProfile(name="mid", ram_bytes=(at[35.0] + at[60.0]) // 2, storage_bytes=2**31, part="test")
    session = DeviceSession(model, device)
    assert session.fits and session.report.breakdown.working_peak_bytes > 0
    session.model.transcribe([_audio(4.0)])
    expected = estimate_memory(model, session.store, device, 1, 4.0).working_peak_bytes
    measured = session.report.measured_peak_bytes
    assert abs(expected - measured) <= 0.05 * measured, (expected, measured)
    with pytest.raises(DoesNotFitError, match="peak in positional-conv"):
        session.model.transcribe([np.zeros(60 * 16000, np.float32)])  # refused before it runs
