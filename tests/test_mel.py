"""The log-mel front end against references computed independently here."""

from __future__ import annotations

import numpy as np
import pytest

from qbench.models.whisper import HOP_LENGTH, N_FFT, N_FRAMES, N_SAMPLES, audio_windows, log_mel_spectrogram, mel_filters


def slaney_mel_reference(n_mels: int = 80, sr: int = 16000, n_fft: int = 400) -> np.ndarray:
    """librosa.filters.mel(sr, n_fft, n_mels) re-derived from its definition, scalar by scalar."""

    def hz_to_mel(f: float) -> float:
        return f / (200 / 3) if f < 1000 else 15 + np.log(f / 1000) / (np.log(6.4) / 27)

    def mel_to_hz(m: float) -> float:
        return m * (200 / 3) if m < 15 else 1000 * np.exp((np.log(6.4) / 27) * (m - 15))

    centers = [mel_to_hz(m) for m in np.linspace(hz_to_mel(0), hz_to_mel(sr / 2), n_mels + 2)]
    bins = np.fft.rfftfreq(n_fft, 1 / sr)
    fb = np.zeros((n_mels, len(bins)))
    for i in range(n_mels):
        lo, c, hi = centers[i], centers[i + 1], centers[i + 2]
        for j, f in enumerate(bins):
            up, down = (f - lo) / (c - lo), (hi - f) / (hi - c)
            fb[i, j] = max(0.0, min(up, down)) * 2 / (hi - lo)
    return fb


def log_mel_reference(audio: np.ndarray) -> np.ndarray:
    """Frame-by-frame numpy FFT, float64: no shared code with the GEMM implementation."""
    padded = np.pad(audio.astype(np.float64), (N_FFT // 2, N_FFT // 2), mode="reflect")
    window = np.hanning(N_FFT + 1)[:-1]  # periodic Hann, as torch.hann_window
    n_frames = 1 + (len(padded) - N_FFT) // HOP_LENGTH
    spec = np.stack([np.abs(np.fft.rfft(padded[i * HOP_LENGTH : i * HOP_LENGTH + N_FFT] * window)) ** 2 for i in range(n_frames)])
    spec = spec[:-1]
    mel = spec @ slaney_mel_reference().T
    log = np.log10(np.maximum(mel, 1e-10))
    log = np.maximum(log, log.max() - 8.0)
    return (log + 4) / 4


def test_filterbank_matches_librosa_definition():
    np.testing.assert_allclose(mel_filters(80), slaney_mel_reference(), rtol=1e-5, atol=1e-7)


def test_log_mel_matches_independent_reference():
    rng = np.random.default_rng(0)
    t = np.arange(16000 * 2) / 16000
    audio = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)
    mine = log_mel_spectrogram(audio)
    ref = log_mel_reference(audio)
    assert mine.shape == ref.shape == (200, 80)
    assert mine.dtype == np.float32
    np.testing.assert_allclose(mine, ref, atol=2e-4)


def test_log_mel_on_real_speech_matches_reference(data_dir):
    from qbench.data.audio import load_audio
    from qbench.data.librispeech import list_utterances

    audio = load_audio(list_utterances(data_dir, "test-clean", limit=1)[0].path)
    np.testing.assert_allclose(log_mel_spectrogram(audio), log_mel_reference(audio), atol=2e-4)


def test_log_mel_matches_faster_whisper_feature_extractor(data_dir):
    fe_module = pytest.importorskip("faster_whisper.feature_extractor")
    from qbench.data.audio import load_audio
    from qbench.data.librispeech import list_utterances

    audio = load_audio(list_utterances(data_dir, "test-clean", limit=1)[0].path)
    theirs = fe_module.FeatureExtractor()(audio).T  # pads 160 samples, drops the last frame
    ours = log_mel_spectrogram(audio, padding=160)
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


def test_windows_are_30s_and_cover_long_audio():
    short = np.zeros(16000 * 3, dtype=np.float32)
    long = np.random.default_rng(1).standard_normal(N_SAMPLES + 16000 * 5).astype(np.float32) * 0.1
    assert [w.shape for w in audio_windows(short)] == [(N_FRAMES, 80)]
    windows = audio_windows(long)
    assert len(windows) == 2 and all(w.shape == (N_FRAMES, 80) for w in windows)
    # the second window starts exactly 30 s in: its first frames equal the full spectrogram's
    full = log_mel_spectrogram(long, padding=N_SAMPLES)
    np.testing.assert_array_equal(windows[1], full[N_FRAMES : 2 * N_FRAMES])


def test_zeros_padding_windows_match_faster_whisper_segments(data_dir):
    fe_module = pytest.importorskip("faster_whisper.feature_extractor")
    from faster_whisper.audio import pad_or_trim

    from qbench.data.audio import load_audio
    from qbench.data.librispeech import list_utterances

    audio = load_audio(list_utterances(data_dir, "test-clean", limit=1)[0].path)
    features = fe_module.FeatureExtractor()(audio)
    content = features.shape[-1] - 1  # as faster-whisper's transcribe counts it
    (window,) = audio_windows(audio, padding="zeros")
    np.testing.assert_allclose(window, pad_or_trim(features[:, :content]).T, atol=1e-4)
    assert not np.allclose(window, audio_windows(audio)[0], atol=1e-3)  # the conventions differ
