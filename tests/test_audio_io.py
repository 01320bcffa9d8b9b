"""load_audio: the real LibriSpeech files load as 16 kHz mono float32; bad files fail by name."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from qbench.data.audio import AudioError, load_audio
from qbench.data.librispeech import DataNotFoundError, find_data_dir, list_utterances


def _tone(n: int, rate: int = 16000) -> np.ndarray:
    t = np.arange(n) / rate
    return (0.5 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32)


def _assert_one_line_naming(exc: pytest.ExceptionInfo[AudioError], path: Path) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    assert str(path) in msg
    return msg


# -- real data -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared_root() -> Path:
    try:
        root = find_data_dir(None)
    except DataNotFoundError as exc:
        pytest.skip(f"real LibriSpeech sample not available: {exc}")
    if not (root / "LibriSpeech" / "test-clean").is_dir():
        pytest.skip(f"{root} has no LibriSpeech/test-clean")
    return root


def _provenance_durations(root: Path) -> dict[str, float]:
    # PROVENANCE.tsv sits beside LibriSpeech/ in the shared sample only.
    prov = root / "PROVENANCE.tsv"
    if not prov.is_file():
        pytest.skip(f"{prov} absent (not the shared sample)")
    with prov.open(newline="") as fh:
        return {r["utt_id"]: float(r["duration_s"]) for r in csv.DictReader(fh, delimiter="\t")}


def test_real_flac_is_16k_mono_float32_in_range(shared_root: Path) -> None:
    durations = _provenance_durations(shared_root)
    utts = list_utterances(shared_root, "test-clean", limit=3)
    for u in utts:
        audio = load_audio(u.path)
        assert audio.dtype == np.float32
        assert audio.ndim == 1
        assert np.all(np.abs(audio) <= 1.0)
        assert float(np.max(np.abs(audio))) > 0.01  # real speech, not silence
        # sample count agrees with the independently recorded duration
        assert audio.size == pytest.approx(durations[u.id] * 16000, abs=2)


def test_real_flac_matches_int16_decode(shared_root: Path) -> None:
    u = list_utterances(shared_root, "dev-clean", limit=1)[0]
    ints, _ = sf.read(str(u.path), dtype="int16")
    np.testing.assert_array_equal(load_audio(u.path), ints.astype(np.float32) / 32768.0)


# -- synthetic error cases -------------------------------------------------------------------


def test_good_synthetic_file_roundtrips(tmp_path: Path) -> None:
    p = tmp_path / "ok.flac"
    sf.write(p, _tone(1600), 16000, subtype="PCM_16")
    audio = load_audio(p)
    assert audio.shape == (1600,)
    np.testing.assert_allclose(audio, _tone(1600), atol=1 / 32768 + 1e-7)


def test_missing_file(tmp_path: Path) -> None:
    p = tmp_path / "nope.flac"
    with pytest.raises(AudioError) as exc:
        load_audio(p)
    assert "not found" in _assert_one_line_naming(exc, p)


def test_directory_is_not_audio(tmp_path: Path) -> None:
    with pytest.raises(AudioError) as exc:
        load_audio(tmp_path)
    _assert_one_line_naming(exc, tmp_path)


def test_wrong_rate_is_an_error_not_resampled(tmp_path: Path) -> None:
    p = tmp_path / "eight_k.flac"
    sf.write(p, _tone(800, 8000), 8000, subtype="PCM_16")
    with pytest.raises(AudioError) as exc:
        load_audio(p)
    msg = _assert_one_line_naming(exc, p)
    assert "8000" in msg and "16000" in msg
    # the same file is fine when 8 kHz is what the caller asked for
    assert load_audio(p, expected_rate=8000).shape == (800,)


def test_stereo_is_an_error_not_mixed(tmp_path: Path) -> None:
    p = tmp_path / "stereo.flac"
    sf.write(p, np.stack([_tone(400), -_tone(400)], axis=1), 16000, subtype="PCM_16")
    with pytest.raises(AudioError) as exc:
        load_audio(p)
    msg = _assert_one_line_naming(exc, p)
    assert "2 channels" in msg and "mono" in msg


def test_empty_file(tmp_path: Path) -> None:
    p = tmp_path / "empty.wav"
    sf.write(p, np.zeros(0, dtype=np.float32), 16000, subtype="PCM_16")
    assert sf.info(str(p)).frames == 0
    with pytest.raises(AudioError) as exc:
        load_audio(p)
    assert "empty" in _assert_one_line_naming(exc, p)


def test_zero_byte_file(tmp_path: Path) -> None:
    p = tmp_path / "zero.flac"
    p.write_bytes(b"")
    with pytest.raises(AudioError) as exc:
        load_audio(p)
    _assert_one_line_naming(exc, p)


def test_corrupt_bytes(tmp_path: Path) -> None:
    p = tmp_path / "corrupt.flac"
    p.write_bytes(b"fLaC" + bytes(range(256)) * 8)
    with pytest.raises(AudioError) as exc:
        load_audio(p)
    assert "corrupt" in _assert_one_line_naming(exc, p)


def test_non_finite_samples(tmp_path: Path) -> None:
    p = tmp_path / "nan.wav"
    x = _tone(160)
    x[7] = np.nan
    x[9] = np.inf
    sf.write(p, x, 16000, subtype="FLOAT")
    with pytest.raises(AudioError) as exc:
        load_audio(p)
    assert "2 non-finite" in _assert_one_line_naming(exc, p)


def test_float_file_out_of_range(tmp_path: Path) -> None:
    p = tmp_path / "loud.wav"
    sf.write(p, _tone(160) * 3.0, 16000, subtype="FLOAT")
    with pytest.raises(AudioError) as exc:
        load_audio(p)
    assert "[-1, 1]" in _assert_one_line_naming(exc, p)
