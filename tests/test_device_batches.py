"""Device runs with sampled measurement and batches larger than one.

Every batch is checked by the accountant before it runs; tracemalloc measures the first batch
and every batch whose estimate is above all measured before (the result's device record says
which); without a batch size the session picks the largest of 1, 2, 4, 8 that fits with the
measured-peak margin, and that choice never changes a transcript.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import qbench.embedded.session as S
from qbench.cli import main
from qbench.embedded.devices import DeviceProfile
from qbench.embedded.memory import MemoryBreakdown
from qbench.embedded.session import (
    MEASURED_PEAK_MARGIN,
    BatchSizeError,
    DeviceSession,
    DoesNotFitError,
    estimate_memory,
)
from qbench.models import whisper as W
from tests.test_whisper_model import DIMS, random_params, tiny_vocab

MiB = 2**20


@pytest.fixture(scope="module")
def small():
    return W.Whisper.from_params(DIMS, random_params(DIMS), tiny_vocab(DIMS.n_vocab))


def _audio(seconds: float, seed: int = 0) -> np.ndarray:
    return (0.05 * np.random.default_rng(seed).standard_normal(int(seconds * 16000))).astype(np.float32)


def _device(ram: int) -> DeviceProfile:
    return DeviceProfile(name="test-board", ram_bytes=int(ram), storage_bytes=2**31, part="test")


def _ram_for(model, batch: int, seconds: float = 30.0) -> int:
    """RAM the accountant asks for `batch` rows of `seconds` on a store without cache."""
    store = S.DeviceWeightStore.from_store(model.store)
    return estimate_memory(model, store, None, batch, seconds).total_ram_bytes


def _measured_calls(monkeypatch) -> list[int]:
    """Record the batch sizes tracemalloc measures (the real measurement still runs)."""
    calls: list[int] = []
    real = S.measure_peak

    def spy(fn):
        result = real(fn)
        calls.append(len(result[0]))
        return result

    monkeypatch.setattr(S, "measure_peak", spy)
    return calls


# -- which batches are measured, and what is recorded ---------------------------------------------


def test_the_first_batch_and_each_new_highest_estimate_are_measured(small, monkeypatch):
    calls = _measured_calls(monkeypatch)
    session = DeviceSession(small, _device(2**31))
    # estimates follow the longest utterance: 5 s, 3 s, 45 s (two windows), 2 s, 45 s again, 65 s
    for seconds in (5, 3, 45, 2, 45, 65):
        session.model.transcribe([_audio(seconds)])
    record = session.record()
    assert record["batches"] == 6 and record["measurement"] == "first+highest-estimate"
    assert record["measured_batches"] == [0, 2, 5] and len(calls) == 3
    assert record["fits"] and record["measured_peak_bytes"] > 0
    assert record["batch_size"] == 1 and record["batch_size_chosen"] is False


def test_a_device_too_small_for_the_longest_batch_stops_before_it_runs(small, monkeypatch):
    """One 30 s window fits, the two windows of a 45 s utterance do not: refused by the
    accountant before transcribing, whether or not that batch would have been measured."""
    ran: list[int] = []
    device = _device((_ram_for(small, 1) + _ram_for(small, 2, 45.0)) // 2)
    session = DeviceSession(small, device)
    assert session.fits
    inner = session.model._model
    real = inner.transcribe
    monkeypatch.setattr(inner, "transcribe", lambda audios: ran.append(len(audios)) or real(audios))
    session.model.transcribe([_audio(5)])
    session.model.transcribe([_audio(4)])  # not a new highest estimate: checked, not measured
    assert session.report.measured_batches == [0] and session.report.batches == 2
    with pytest.raises(DoesNotFitError, match=r"does not fit on test-board: needs .* RAM, device has"):
        session.model.transcribe([_audio(45)])
    assert ran == [1, 1]  # the long batch never ran
    record = session.record()
    assert record["fits"] is False and session.exceeded and record["batches"] == 2


def test_a_measured_peak_above_the_budget_fails_on_a_sampled_batch(small, monkeypatch):
    """The accountant is made blind (it counts 1 KiB per second of audio): every batch passes
    the check before it runs, and the first batch fits the 2 MiB device, but the 45 s batch
    is measured (its estimate is a new highest) and its real peak stops the run."""

    def blind(model, store, device, utterances=1, audio_seconds=None, activations=None):
        seconds = 30.0 if audio_seconds is None else audio_seconds
        work = int(1024 * seconds)
        return MemoryBreakdown(weights_stored_bytes=1, weights_ram_bytes=1, activations_bytes=work, kv_cache_bytes=0,
                               weight_block_bytes=0, buffers_bytes=0, working_peak_bytes=work, peak_phase="x",
                               total_ram_bytes=1 + work)

    monkeypatch.setattr(S, "estimate_memory", blind)
    session = DeviceSession(small, _device(2**31))
    session.model.transcribe([_audio(0.2)])
    small_peak = session.report.measured_peak_bytes
    # a device that holds what the first batch measured, not two 30 s windows
    session.device = device = _device(small_peak + 2 * MiB)
    session.report = session.report.model_copy(update={"profile": device})
    with pytest.raises(DoesNotFitError, match=r"needs .* RAM \(measured\), device has"):
        session.model.transcribe([_audio(45)])
    assert session.report.measured_batches == [0, 1] and session.report.measured_peak_bytes > device.ram_bytes
    assert session.exceeded and not session.report.fits


# -- the batch size a device chooses ------------------------------------------------------------


def _rows_estimate(monkeypatch, per_row: int = 10 * MiB, weights: int = MiB) -> None:
    """An accountant whose working peak is `per_row` bytes per batch row (the small test
    model's peak is in its log-mel, which one utterance at a time holds whatever the batch)."""

    def estimate(model, store, device, utterances=1, audio_seconds=None, activations=None):
        work = per_row * utterances + sum(store.cached_layers().values())
        return MemoryBreakdown(weights_stored_bytes=weights, weights_ram_bytes=weights, activations_bytes=work,
                               kv_cache_bytes=0, weight_block_bytes=0, buffers_bytes=0, working_peak_bytes=work,
                               peak_phase="x", total_ram_bytes=weights + work)

    monkeypatch.setattr(S, "estimate_memory", estimate)


def test_the_default_batch_is_the_largest_that_fits_with_the_margin(small, monkeypatch):
    # on the real accountant and a generous device: 8, with the cache a batch of one gets
    one, auto = DeviceSession(small, _device(2**31)), DeviceSession(small, _device(2**31), None)
    assert auto.batch_size == 8 and auto.report.batch_size_chosen and auto.store.cache_bytes == one.store.cache_bytes
    assert auto.store.cached_layers() == one.store.cached_layers() != {}
    _rows_estimate(monkeypatch)
    # 1 MiB of weights + 4 rows of 10 MiB and their cache, no room to spare: 4 does not fit
    # with the margin, 2 does
    cache = sum(4 * i.numel for i in small.quantizable_weights())
    four = MiB + 40 * MiB + cache
    assert DeviceSession(small, _device(four), 4).fits  # but given, 4 is honoured
    two = DeviceSession(small, _device(four), None)
    assert two.batch_size == 2 and two.report.batch_size_chosen
    b = two.report.breakdown
    assert b.weights_ram_bytes + b.working_peak_bytes * (1 + MEASURED_PEAK_MARGIN) <= four
    # with 10 % to spare on 8 rows: 8
    assert DeviceSession(small, _device(MiB + 1.1 * (80 * MiB + cache) + 1), None).batch_size == 8
    # nothing larger fits: 1; nothing fits at all: 1 and the verdict
    assert DeviceSession(small, _device(MiB + 21 * MiB), None).batch_size == 1
    tiny = DeviceSession(small, _device(5 * MiB), None)
    assert tiny.batch_size == 1 and not tiny.fits and tiny.record()["batch_size"] == 1


def test_a_given_batch_size_is_refused_in_one_line_when_it_cannot_fit(small, monkeypatch):
    _rows_estimate(monkeypatch)
    device = _device(MiB + 35 * MiB)
    with pytest.raises(BatchSizeError) as err:
        DeviceSession(small, device, 8)
    message = str(err.value)
    assert "\n" not in message and message.startswith("batch size 8 does not fit on test-board: needs 81.0 MiB RAM")
    assert message.endswith("batch size 2 fits (the default on test-board)")
    # a size that fits only without the layer cache a batch of one gets runs with a smaller one
    session = DeviceSession(small, _device(MiB + 30 * MiB + 1000), 3)
    assert session.fits and session.store.cache_bytes < DeviceSession(small, _device(MiB + 30 * MiB + 1000)).store.cache_bytes


def test_batches_of_several_rows_transcribe_as_batches_of_one(small):
    """Rows of different lengths (one of two windows) in batches of 1, 3 and 8."""
    audios = [_audio(s, seed) for seed, s in enumerate((3, 7, 45, 1, 12, 5, 9, 2))]
    out = {}
    for batch in (1, 3, 8):
        session = DeviceSession(small, _device(2**31), batch)
        out[batch] = [t for i in range(0, len(audios), batch) for t in session.model.transcribe(audios[i : i + batch])]
    assert out[1] == out[3] == out[8] and any(out[1])


def test_real_utterances_same_hypotheses_at_batch_one_and_the_default(tiny_en, data_dir, tmp_path, capsys):
    """whisper-tiny.en on pi-zero-2w: the default batch (8, all five utterances in one) gives
    the hypotheses `--batch-size 1` gives, and both records say what was measured."""
    runs = {}
    for name, extra in (("default", []), ("one", ["--batch-size", "1"])):
        out = tmp_path / f"{name}.json"
        assert main(["run", "--limit", "5", "--data-dir", str(data_dir), "-o", str(out), "-q", *extra]) == 0
        runs[name] = json.loads(out.read_text())
    default, one = runs["default"]["device"], runs["one"]["device"]
    assert default["batch_size"] == 8 and default["batch_size_chosen"] and default["batches"] == 1
    assert one["batch_size"] == 1 and not one["batch_size_chosen"] and one["batches"] == 5
    assert default["measured_batches"] == [0] and one["measured_batches"][0] == 0
    assert runs["default"]["hypotheses_sha256"] == runs["one"]["hypotheses_sha256"]
    assert [u["hypothesis"] for u in runs["default"]["utterances"]] == [u["hypothesis"] for u in runs["one"]["utterances"]]
    capsys.readouterr()


def test_a_given_batch_too_large_is_refused_by_the_cli_in_one_line(tiny_en, data_dir, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["run", "--limit", "1", "--batch-size", "64", "--data-dir", str(data_dir), "-o", str(out), "-q"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "batch size 64 does not fit on pi-zero-2w" in err and "batch size 8 fits" in err and "Traceback" not in err


def test_larger_batches_work_in_threads_and_the_accountant_follows(tiny_en):
    """A batch of one runs in one thread of work, as committed entries did; a larger batch may
    encode its windows in threads, and the accountant counts each thread's encoder buffers at
    their peak: an upper bound (the threads need not peak together), never 10 % short of
    tracemalloc (two 30 s windows, 3 tokens, on this machine's threads)."""
    model = tiny_en.model
    device = _device(4 * 2**30)
    assert not DeviceSession(model, device).store.thread_safe
    store = DeviceSession(model, device, 2).store
    assert store.thread_safe and DeviceSession(model, device, None).store.thread_safe
    audio = [_audio(30, seed) for seed in (1, 2)]
    mels = np.stack([W.audio_windows(a)[0] for a in audio])
    from qbench.embedded.memory import measure_peak

    _, peak = measure_peak(lambda: W.greedy_decode(store, model.dims, model.vocab, mels, max_new_tokens=3))
    measured = peak + sum(a.nbytes for a in audio) + sum(m.nbytes for m in mels)
    estimate = estimate_memory(model, store, None, 2, 30.0).working_peak_bytes
    assert measured <= 1.10 * estimate and estimate <= 1.25 * measured, (estimate, measured)


def test_the_run_longest_utterance_decides_the_batch_not_the_recorded_figures(tiny_en):
    """The batch is chosen for the longest utterance (35 s: two windows a row), while the cache
    and the recorded breakdown stay at one 30 s window a row, so a rerun of a batch-1 entry
    records the figures it was submitted with, whatever its utterances."""
    from qbench.embedded.devices import get_device_profile

    model, device = tiny_en.model, get_device_profile("pi-zero-2w")
    plain, long = DeviceSession(model, device, 1), DeviceSession(model, device, 1, longest_seconds=35.0)
    assert long.report.breakdown == plain.report.breakdown and long.store.cache_bytes == plain.store.cache_bytes
    chosen = DeviceSession(model, device, None, longest_seconds=35.0)
    assert chosen.batch_size == 4 and DeviceSession(model, device, None, longest_seconds=20.0).batch_size == 8
    assert chosen.store.cached_layers() == plain.store.cached_layers()  # same arithmetic as batch 1
    # given, 8 rows of 35 s fit only with a smaller cache: honoured with it; 16 are refused
    eight = DeviceSession(model, device, 8, longest_seconds=35.0)
    assert eight.batch_size == 8 and eight.store.cache_bytes < plain.store.cache_bytes
    with pytest.raises(BatchSizeError, match="batch size 16 does not fit on pi-zero-2w: .* batch size 4 fits"):
        DeviceSession(model, device, 16, longest_seconds=35.0)
