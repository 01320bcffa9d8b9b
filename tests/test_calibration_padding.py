"""Calibration may count only the rows inference feeds a layer, not the padding that stacks them.

Whisper's calibration pass decodes every window teacher-forced in one padded batch; on the 44
shared dev-clean windows 65 % of the decoder's positions are padding past end of text, states
inference never reaches. They count by default (dropping them did not help on dev-clean);
`count_padding=False` drops them. These tests check that the statistics a calibrated quantizer
then gets are exactly those of each window decoded alone, that the default is the old pass,
and that entries and artifacts made the default way keep their bytes.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_whisper_model import DIMS, random_params, tiny_vocab

import qbench.quant.apply as apply
from qbench.leaderboard.entry import EntryCalibration
from qbench.models import whisper as W
from qbench.models.weight_store import WeightStore
from qbench.quant.apply import QuantizationPolicy, counted_rows, quantize_model
from qbench.quant.artifact import ArtifactCalibration
from qbench.quant.contract import LayerStats, QuantizedTensor, Quantizer
from qbench.run import RunSpec

#: transcripts of different lengths, so the stacked decoder batch has padding
TARGETS = [[3, 4], [5, 6, 7, 8, 9, 10, 11]]


class StatsBlindQuantizer(Quantizer):
    """Asks for calibration but rounds the same way whatever it is given, so two passes over
    different audio quantize every layer identically and feed later layers the same inputs."""

    name = "stats-blind"
    version = "1.0"
    needs_calibration = True

    def __init__(self, config=None):
        super().__init__(config)
        self.seen: list[LayerStats] = []

    def quantize(self, weight: np.ndarray, stats: LayerStats | None) -> QuantizedTensor:
        self.seen.append(stats)
        scale = np.abs(weight).max(axis=1, keepdims=True) / 7 + 1e-12
        codes = np.clip(np.rint(weight / scale), -8, 7).astype(np.int8)
        return QuantizedTensor(codes=codes, code_bits=4, scales=scale, signed=True)


@pytest.fixture
def whisper(monkeypatch):
    model = W.Whisper.from_params(DIMS, random_params(DIMS), tiny_vocab(DIMS.n_vocab))
    rng = np.random.default_rng(11)
    audios = [0.1 * rng.standard_normal(16000 * s).astype(np.float32) for s in (1, 2)]
    # a seeded model's own greedy transcripts all run to the length limit: give each window
    # a fixed transcript of its own length instead, told apart by its mel frames
    by_window = {model._windows(a)[0].tobytes(): t for a, t in zip(audios, TARGETS, strict=True)}
    monkeypatch.setattr(W, "greedy_decode", lambda store, dims, vocab, mels: [by_window[m.tobytes()] for m in mels])
    return model, audios


def calibration_stats(model, audios, count_padding=True) -> dict[str, LayerStats]:
    quantizer = StatsBlindQuantizer()
    quantize_model(model, quantizer, QuantizationPolicy(), audios, count_padding=count_padding)
    names = [info.name for info in model.quantizable_weights() if info.kind != "embedding"]
    return dict(zip(names, quantizer.seen, strict=True))


def test_the_stacked_pass_gives_each_layer_the_statistics_of_every_window_decoded_alone(whisper):
    model, audios = whisper
    stacked = calibration_stats(model, audios, count_padding=False)
    alone = [calibration_stats(model, [a], count_padding=False) for a in audios]
    prompt = len(model.vocab.sot_sequence())
    for name, stats in stacked.items():
        parts = [a[name] for a in alone]
        assert stats.n_rows == sum(p.n_rows for p in parts), name
        total = sum(p.xtx for p in parts)
        np.testing.assert_allclose(stats.xtx, total, rtol=1e-5, atol=1e-6 * np.abs(total).max(), err_msg=name)
    # the decoder counts the prompt and the transcript of each window (not its end of text)
    assert stacked["decoder.blocks.0.attn.qkv"].n_rows == sum(prompt + len(t) for t in TARGETS)
    assert stacked["encoder.blocks.0.attn.qkv"].n_rows == 2 * 1500


def test_by_default_the_padding_counts_and_dropping_it_changes_only_the_decoder(whisper):
    model, audios = whisper
    old = calibration_stats(model, audios)
    width = len(model.vocab.sot_sequence()) + max(len(t) for t in TARGETS) + 1
    assert old["decoder.blocks.0.attn.qkv"].n_rows == 2 * width
    new = calibration_stats(model, audios, count_padding=False)
    assert not np.allclose(old["decoder.blocks.0.mlp.fc2"].xtx, new["decoder.blocks.0.mlp.fc2"].xtx)
    np.testing.assert_array_equal(old["encoder.blocks.0.mlp.fc1"].xtx, new["encoder.blocks.0.mlp.fc1"].xtx)


def test_the_paired_pass_masks_both_halves_alike(whisper):
    model, audios = whisper
    stacked = calibration_stats(model, audios, count_padding=False)

    class PairedBlind(StatsBlindQuantizer):
        wants_float_inputs = True

    quantizer = PairedBlind()
    quantize_model(model, quantizer, QuantizationPolicy(), audios, count_padding=False)
    names = [info.name for info in model.quantizable_weights() if info.kind != "embedding"]
    for name, stats in zip(names, quantizer.seen, strict=True):
        assert stats.n_rows == stacked[name].n_rows, name
        assert stats.dxtx is not None and stats.dxtx.shape == stats.xtx.shape


def test_a_mask_that_does_not_fit_the_input_is_a_one_line_error():
    with pytest.raises(apply.CalibrationPassError, match="layer dec.fc got input of shape"):
        counted_rows("dec.fc", np.zeros((2, 5, 4)), np.ones((2, 6), dtype=bool))
    assert counted_rows("x", np.zeros((2, 5, 4)), np.eye(2, 5, dtype=bool)).shape == (2, 4)


def test_a_plain_store_ignores_the_mask():
    store = WeightStore({"l.weight": np.eye(3, dtype=np.float32)}, [W.WeightInfo("l", (3, 3), "linear")])
    x = np.arange(12, dtype=np.float32).reshape(2, 2, 3)
    with store.counting_rows(np.array([[True, False], [False, False]])):
        np.testing.assert_array_equal(store.linear("l", x), x)


def test_entries_and_artifacts_of_the_default_keep_their_bytes_and_record_the_other_way():
    record = {"subset": "dev-clean", "utterance_count": 1, "utterance_ids_sha256": "0" * 64, "utterance_ids": ["1-2-3"]}
    old = EntryCalibration.model_validate(record)
    assert old.counts_padding is True and json.loads(old.model_dump_json()) == record
    new = EntryCalibration.model_validate(record | {"counts_padding": False})
    assert json.loads(new.model_dump_json())["counts_padding"] is False
    art = {k: record[k] for k in ("subset", "utterance_ids", "utterance_ids_sha256")}
    assert ArtifactCalibration.model_validate(art).model_dump(mode="json") == art
    assert ArtifactCalibration.model_validate(art | {"counts_padding": False}).model_dump()["counts_padding"] is False


def test_the_spec_identity_of_a_default_run_is_what_it_was_before_the_choice():
    old = RunSpec(plugin="gptq")
    new = RunSpec(plugin="gptq", calibration_counts_padding=False)
    assert "calibration_counts_padding" not in old.identity_fields()
    assert new.identity_fields()["calibration_counts_padding"] is False
    assert old.identity() != new.identity()
    assert "calibration_counts_padding" not in RunSpec().identity_fields()  # the float baseline calibrates nothing
