"""Memory accounting: real buffer sizes, the accountant against tracemalloc, budget enforcement."""

from __future__ import annotations

import json

import numpy as np
import pytest

from qbench.cli import main
from qbench.embedded.device_store import DeviceWeightStore
from qbench.embedded.devices import DeviceProfile
from qbench.embedded.memory import measure_peak
from qbench.embedded.session import DeviceSession, DoesNotFitError, estimate_memory
from qbench.models import whisper as W
from qbench.quant.apply import quantize_model
from qbench.quant.contract import QuantizedTensor, Quantizer
from tests.test_whisper_model import DIMS, random_params, tiny_vocab


class _RTN4(Quantizer):
    """Symmetric 4-bit per-row RTN, local so the test does not depend on the plugin packages."""

    name = "test-rtn4"
    version = "0"
    needs_calibration = False

    def quantize(self, weight, stats):
        scale = np.maximum(np.abs(weight).max(axis=1, keepdims=True), 1e-8) / 7
        codes = np.clip(np.round(weight / scale), -8, 7).astype(np.int8)
        return QuantizedTensor(codes=codes, code_bits=4, scales=scale.astype(np.float64), signed=True)


@pytest.fixture(scope="module")
def small():
    return W.Whisper.from_params(DIMS, random_params(DIMS), tiny_vocab(DIMS.n_vocab))


@pytest.fixture(scope="module")
def small_rtn4(small):
    from pydantic import BaseModel

    class Cfg(BaseModel):
        pass

    _RTN4.Config = Cfg
    model, report = quantize_model(small, _RTN4(Cfg()))
    return model, report


def test_model_bytes_are_the_sum_of_real_buffers(small, small_rtn4):
    model, report = small_rtn4
    store = model.store
    packed = sum(pt.codes.nbytes + pt.scales.nbytes + (0 if pt.zeros is None else pt.zeros.nbytes) for pt in store.packed.values())
    rest = sum(np.asarray(p).nbytes for p in store.params.values())
    assert store.stored_bytes() == report.model_bytes == packed + rest
    for name, pt in store.packed.items():
        assert pt.codes.dtype == np.uint8 and pt.codes.nbytes == -(-pt.numel * 4 // 8), name
        assert pt.scales.dtype == np.float16
    assert not any(k[: -len(".weight")] in store.packed for k in store.params)  # no float originals kept
    device = DeviceWeightStore.from_store(store)
    assert device.stored_bytes() == store.stored_bytes()


@pytest.mark.parametrize("block_bytes,cache", [(256, 0), (10**6, 0), (256, 10**9)])
def test_device_store_computes_what_the_packed_store_computes(small_rtn4, block_bytes, cache):
    model, _ = small_rtn4
    device = DeviceWeightStore.from_store(model.store, cache_bytes=cache, block_bytes=block_bytes)
    x = np.random.default_rng(3).standard_normal((2, 5, DIMS.n_audio_state * 4)).astype(np.float32)
    for name in ("encoder.blocks.0.mlp.fc2", "decoder.token_embedding"):
        xi = x if name.endswith("fc2") else x[..., : DIMS.n_text_state]
        np.testing.assert_allclose(device.linear(name, xi), model.store.linear(name, xi), rtol=1e-5, atol=1e-5)
    assert device.cached_bytes() == (0 if cache == 0 else sum(i.numel * 4 for i in device.weight_infos() if device._full.get(i.name) is not None))


def _decode_window(model, store, audio, n_tokens):
    mels = np.stack(W.audio_windows(audio))
    return W.greedy_decode(store, model.dims, model.vocab, mels, max_new_tokens=n_tokens)


def test_accountant_agrees_with_tracemalloc_on_tiny_en(tiny_en):
    """Encode one 30 s window and decode 4 tokens, batch 1, on the device store."""
    model = tiny_en.model
    store = DeviceWeightStore.from_store(model.store)
    audio = (0.05 * np.random.default_rng(0).standard_normal(30 * 16000)).astype(np.float32)
    _, peak = measure_peak(lambda: _decode_window(model, store, audio, 4))
    measured = peak + audio.nbytes
    estimate = estimate_memory(model, store, None, 1, 30.0)
    assert abs(estimate.working_peak_bytes - measured) <= 0.05 * measured, (estimate.phases, measured)
    assert estimate.working_peak_bytes == max(estimate.phases.values())
    # the decoder-start phase holds every layer's cross-attention K/V: 4 layers x K,V x [1500, 384]
    assert estimate.phases["decoder-start"] > 2 * 4 * 1500 * 384 * 4


def test_accountant_agrees_with_tracemalloc_on_a_packed_random_model(small_rtn4):
    model, _ = small_rtn4
    store = DeviceWeightStore.from_store(model.store, block_bytes=512)
    audio = (0.05 * np.random.default_rng(1).standard_normal(30 * 16000)).astype(np.float32)
    _, peak = measure_peak(lambda: _decode_window(model, store, audio, 3))
    estimate = estimate_memory(model, store, None, 1, 30.0)
    measured = peak + audio.nbytes
    assert abs(estimate.working_peak_bytes - measured) <= 0.05 * measured, (estimate.phases, measured)


def test_the_store_caches_the_layers_its_memory_model_counts(small_rtn4):
    """`cached_layers` (what the accountant counts) is what `linear` really fills on a run."""
    model, _ = small_rtn4
    half = sum(4 * i.numel for i in model.quantizable_weights()) // 2
    store = DeviceWeightStore.from_store(model.store, cache_bytes=half)
    _decode_window(model, store, np.zeros(16000, np.float32), 2)
    assert 0 < store.cached_bytes() <= half
    assert store.cached_layers() == {name: wt.nbytes for name, wt in store._full.items()}


def test_whisper_batch_rows_are_the_windows_of_the_longest_utterance(small):
    """Two utterances of up to 45 s decode as four 30 s windows, counted at 45 s of audio."""
    store = DeviceWeightStore.from_store(small.store)
    four = W.transcribe_memory(DIMS, store, 4, 45.0)
    assert small.working_memory(store, 2, 45.0) == four != W.transcribe_memory(DIMS, store, 2, 45.0)
    assert small.working_memory(store, 3, 30.0) == W.transcribe_memory(DIMS, store, 3, 30.0)
    assert small.fit_audio == "one 30 s window" and small.fit_audio_seconds == 30.0


def test_a_model_without_a_memory_model_is_budgeted_by_its_weights(small):
    """No phases: the fit counts the weights alone and leaves the working memory to the run."""
    from qbench.embedded.session import fit_model
    from qbench.models.working_memory import WorkingMemory

    class NoMemoryModel:
        store, fit_audio_seconds = small.store, 1.0

        def working_memory(self, store, utterances, audio_seconds):
            return WorkingMemory()

    device = DeviceProfile(name="big", ram_bytes=2**31, storage_bytes=2**31, part="test")
    b = fit_model(NoMemoryModel(), device).breakdown
    assert b.peak_phase == "unknown" and b.working_peak_bytes == 0 and b.phases == {}
    assert b.total_ram_bytes == b.weights_ram_bytes == small.store.stored_bytes()


def test_measured_overrun_stops_the_run(small, monkeypatch):
    """The pre-check passes on a (deliberately wrong) estimate; the tracemalloc check catches it."""
    import qbench.embedded.session as dr
    from qbench.embedded.memory import MemoryBreakdown

    def blind(model, store, device, *a, **k):
        return MemoryBreakdown(weights_stored_bytes=1, weights_ram_bytes=1, activations_bytes=0, kv_cache_bytes=0,
                               weight_block_bytes=0, buffers_bytes=0, working_peak_bytes=0, peak_phase="x", total_ram_bytes=1)

    monkeypatch.setattr(dr, "estimate_memory", blind)
    device = DeviceProfile(name="small", ram_bytes=2 * 2**20, storage_bytes=2**30, part="test")
    session = DeviceSession(small, device)
    assert session.fits
    with pytest.raises(DoesNotFitError, match=r"does not fit on small: needs .* RAM \(measured\), device has 2.0 MiB"):
        session.model.transcribe([np.zeros(16000, np.float32)])
    assert session.exceeded and not session.report.fits and session.report.measured_peak_bytes > 2 * 2**20


def test_tiny_budget_fails_cleanly_and_is_recorded(tiny_en, data_dir, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["run", "--limit", "1", "--device", "esp32-s3", "--data-dir", str(data_dir), "-o", str(out), "-q"]) == 3
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = " ".join(err.split())
    assert "does not fit on esp32-s3" in line and "device has 8.5 MiB" in line and "activations" in line and "KV cache" in line
    r = json.loads(out.read_text())
    assert r["status"] == "failed" and r["utterances"] == []
    d = r["device"]
    assert d["fits"] is False and d["profile"]["name"] == "esp32-s3" and "does not fit" in d["reason"]
    assert d["breakdown"]["weights_stored_bytes"] == tiny_en.model.store.stored_bytes()
    assert d["breakdown"]["weights_ram_bytes"] == 0  # XIP


def test_generous_budget_passes_and_records_the_measurement(tiny_en, data_dir, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["run", "--limit", "1", "--device", "jetson-nano-4gb", "--data-dir", str(data_dir), "-o", str(out), "-q"]) == 0
    r = json.loads(out.read_text())
    d = r["device"]
    # no --batch-size: the largest of 1, 2, 4, 8 that fits 4 GiB; one utterance, one batch
    assert r["status"] == "complete" and d["fits"] is True and d["batch_size"] == 8 and d["batch_size_chosen"]
    assert d["batches"] == 1 and d["measurement"] == "first+highest-estimate" and d["measured_batches"] == [0]
    assert 0 < d["measured_peak_bytes"] <= d["breakdown"]["working_peak_bytes"] * 1.1
    assert d["compute"]["total_macs"] > 0 and d["compute"]["encoder_windows"] == 1
    assert "jetson-nano-4gb" in capsys.readouterr().out


def test_fit_answers_without_audio(tiny_en, capsys):
    assert main(["fit", "--json"]) == 0
    rows = {d["profile"]["name"]: d for d in json.loads(capsys.readouterr().out)["devices"]}
    assert rows["pi-zero-2w"]["fits"] and not rows["stm32h743"]["fits"]
    assert rows["esp32-s3"]["breakdown"]["weights_stored_bytes"] == tiny_en.model.store.stored_bytes()
