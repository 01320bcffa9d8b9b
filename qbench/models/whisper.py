"""Whisper in numpy: log-mel front end, encoder, decoder with KV cache, greedy decoding.

Read top to bottom like openai/whisper's model.py. Parameter names (the canonical names every
checkpoint loader maps to):

    encoder.conv1.weight [d, n_mels, 3]      encoder.conv1.bias
    encoder.conv2.weight [d, d, 3]           encoder.conv2.bias
    encoder.positional_embedding [n_audio_ctx, d]
    encoder.blocks.{i}.attn_ln.{weight,bias}
    encoder.blocks.{i}.attn.qkv.{weight [3d, d], bias [3d]}   (query, key, value stacked;
                                                               the key has no bias: zeros)
    encoder.blocks.{i}.attn.out.{weight, bias}
    encoder.blocks.{i}.mlp_ln.{weight,bias}
    encoder.blocks.{i}.mlp.fc1.{weight [4d, d], bias}  encoder.blocks.{i}.mlp.fc2.{weight, bias}
    encoder.ln_post.{weight,bias}
    decoder.token_embedding.weight [n_vocab, d]   (also the output projection: tied)
    decoder.positional_embedding [n_text_ctx, d]
    decoder.blocks.{i}.attn_ln / attn.qkv / attn.out            masked self-attention
    decoder.blocks.{i}.cross_attn_ln / cross_attn.q / cross_attn.kv [2d, d] / cross_attn.out
    decoder.blocks.{i}.mlp_ln / mlp.fc1 / mlp.fc2
    decoder.ln.{weight,bias}
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from qbench.models.activations import gelu, layer_norm, log_softmax
from qbench.models.attention import score_block_bytes, split_heads
from qbench.models.parallel import blas_threads_at_most, compute_threads, parallel_map
from qbench.models.tokenizer import WhisperVocabulary
from qbench.models.weight_store import WeightInfo, WeightStore
from qbench.models.working_memory import F32, MemoryPhase, StreamingStore, WorkingMemory


@dataclass(frozen=True)
class ModelDimensions:
    n_mels: int
    n_audio_ctx: int
    n_audio_state: int
    n_audio_head: int
    n_audio_layer: int
    n_vocab: int
    n_text_ctx: int
    n_text_state: int
    n_text_head: int
    n_text_layer: int

    @property
    def audio_head_dim(self) -> int:
        return self.n_audio_state // self.n_audio_head

    @property
    def text_head_dim(self) -> int:
        return self.n_text_state // self.n_text_head


# ----------------------------------------------------------------------------------------------
# Front end: 16 kHz audio -> 80-bin log-mel spectrogram, as openai/whisper's audio.py defines it
# ----------------------------------------------------------------------------------------------
SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
CHUNK_LENGTH = 30
N_SAMPLES = CHUNK_LENGTH * SAMPLE_RATE  # 480000 samples in a 30 s window
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3000 mel frames in a 30 s window


def _hz_to_mel_slaney(freqs: np.ndarray) -> np.ndarray:
    # linear below 1 kHz, logarithmic above (Slaney's Auditory Toolbox, librosa's default)
    f_sp = 200.0 / 3
    mels = freqs / f_sp
    min_log_hz, min_log_mel, logstep = 1000.0, 1000.0 / f_sp, np.log(6.4) / 27.0
    log_region = freqs >= min_log_hz
    mels[log_region] = min_log_mel + np.log(freqs[log_region] / min_log_hz) / logstep
    return mels


def _mel_to_hz_slaney(mels: np.ndarray) -> np.ndarray:
    f_sp = 200.0 / 3
    freqs = f_sp * mels
    min_log_hz, min_log_mel, logstep = 1000.0, 1000.0 / f_sp, np.log(6.4) / 27.0
    log_region = mels >= min_log_mel
    freqs[log_region] = min_log_hz * np.exp(logstep * (mels[log_region] - min_log_mel))
    return freqs


@lru_cache(maxsize=4)
def mel_filters(n_mels: int = 80, sample_rate: int = SAMPLE_RATE, n_fft: int = N_FFT) -> np.ndarray:
    """Slaney-style mel filterbank `[n_mels, n_fft//2 + 1]` (= librosa.filters.mel defaults).

    Whisper ships this matrix precomputed from librosa; it is recomputed here so that no
    librosa or asset file is needed.
    """
    fft_freqs = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    mel_min, mel_max = _hz_to_mel_slaney(np.array([0.0, sample_rate / 2.0]))
    mel_f = _mel_to_hz_slaney(np.linspace(mel_min, mel_max, n_mels + 2))
    fdiff = np.diff(mel_f)
    ramps = mel_f[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_f[2 : n_mels + 2] - mel_f[:n_mels]))[:, None]  # Slaney area norm
    return weights.astype(np.float32)


@lru_cache(maxsize=1)
def _stft_basis(n_fft: int = N_FFT) -> tuple[np.ndarray, np.ndarray]:
    # the real DFT as two matrices with the periodic Hann window folded in: one GEMM per
    # utterance instead of a Python loop of FFTs, and float32 like torch.stft on CPU
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    k = np.arange(n_fft // 2 + 1)
    angle = 2 * np.pi * np.outer(np.arange(n_fft), k) / n_fft
    return (window[:, None] * np.cos(angle)).astype(np.float32), (window[:, None] * -np.sin(angle)).astype(np.float32)


def log_mel_spectrogram(audio: np.ndarray, n_mels: int = 80, padding: int = 0) -> np.ndarray:
    """Whisper's log-mel spectrogram `[n_frames, n_mels]` (time-major) of a 16 kHz waveform.

    STFT with n_fft 400, hop 160, periodic Hann window, centred with reflect padding; the last
    frame is dropped; power spectrum through the Slaney mel filterbank; log10 clamped at 1e-10
    and to (max - 8); then (x + 4) / 4. `padding` zeros are appended to the audio first, as
    `whisper.transcribe` does with 30 s of silence.
    """
    audio = np.asarray(audio, dtype=np.float32)
    if padding:
        audio = np.pad(audio, (0, padding))
    half = N_FFT // 2
    padded = np.pad(audio, (half, half), mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP_LENGTH][:-1]
    cos_basis, sin_basis = _stft_basis()
    power = (frames @ cos_basis) ** 2 + (frames @ sin_basis) ** 2
    mel = power @ mel_filters(n_mels).T
    log_spec = np.log10(np.maximum(mel, 1e-10))
    log_spec = np.maximum(log_spec, log_spec.max() - 8.0)
    return ((log_spec + 4.0) / 4.0).astype(np.float32)


def audio_windows(audio: np.ndarray, n_mels: int = 80, padding: str = "audio", frames: int = N_FRAMES) -> list[np.ndarray]:
    """30 s log-mel windows `[N_FRAMES, n_mels]` covering an utterance, as whisper seeks them
    (`frames` < N_FRAMES: shorter windows, for an encoder context below 30 s as whisper.cpp's
    `audio_ctx` runs it; the padding is then that window's length of silence).

    Without timestamps the seek advances a full window. `padding` says what fills a window past
    the end of the audio:
    - "audio" (openai's `transcribe`, the default): the spectrogram is computed over the audio
      plus 30 s of silence, so padding frames are the log-mel of zeros (max - 8, rescaled);
    - "zeros" (faster-whisper / CTranslate2): the spectrogram of the audio alone (plus one hop of
      silence), its last frame dropped, and the window padded with 0.0 feature values.
    The two conventions change a few greedy transcripts of tiny.en; the peer-parity test uses
    the peer's convention so that it compares the networks, not the padding.
    """
    if padding == "audio":
        mel = log_mel_spectrogram(audio, n_mels, padding=frames * HOP_LENGTH)
        content_frames = max(1, mel.shape[0] - frames)
        return [mel[start : start + frames] for start in range(0, content_frames, frames)]
    if padding == "zeros":
        mel = log_mel_spectrogram(audio, n_mels, padding=HOP_LENGTH)
        content_frames = max(1, mel.shape[0] - 1)
        windows = []
        for start in range(0, content_frames, frames):
            window = mel[start : min(start + frames, content_frames)]
            windows.append(np.pad(window, ((0, frames - window.shape[0]), (0, 0))))
        return windows
    raise ValueError(f"unknown mel padding {padding!r} (expected 'audio' or 'zeros')")


# ----------------------------------------------------------------------------------------------
# The network
# ----------------------------------------------------------------------------------------------
def conv1d(store: WeightStore, name: str, x: np.ndarray, stride: int = 1) -> np.ndarray:
    """`[B, T, C_in]` -> `[B, T_out, C_out]`, kernel 3, padding 1, through `store.linear`.

    im2col makes the convolution one matmul with the `[out, in * k]` weight, so quantizers and
    the packed store treat conv kernels exactly like linear layers.
    """
    k = 3
    xp = np.pad(x, ((0, 0), (1, 1), (0, 0)))
    cols = np.lib.stride_tricks.sliding_window_view(xp, k, axis=1)[:, ::stride]  # [B, T_out, C, k]
    cols = np.ascontiguousarray(cols).reshape(cols.shape[0], cols.shape[1], -1)
    return store.linear(name, cols)


def _ln(store: WeightStore, name: str, x: np.ndarray) -> np.ndarray:
    return layer_norm(x, store.param(name + ".weight"), store.param(name + ".bias"))


def encode(store: WeightStore, dims: ModelDimensions, mel: np.ndarray, threads: int = 1) -> np.ndarray:
    """Encoder: `[B, 3000, n_mels]` log-mel -> `[B, 1500, d]` audio features.

    `threads`: Python threads for the attention heads and GELU (see `qbench.models.parallel`);
    the linear layers use whatever BLAS threads the caller allows.
    """
    # GELU in place on the fresh GEMM outputs: no second activation-sized array
    x = conv1d(store, "encoder.conv1", mel)
    x = gelu(x, out=x, threads=threads)
    x = conv1d(store, "encoder.conv2", x, stride=2)
    x = gelu(x, out=x, threads=threads)
    x += store.param("encoder.positional_embedding")[: x.shape[1]]
    for i in range(dims.n_audio_layer):
        p = f"encoder.blocks.{i}"
        qkv = store.linear(f"{p}.attn.qkv", _ln(store, f"{p}.attn_ln", x))
        q, k, v = np.split(qkv, 3, axis=-1)
        h = dims.n_audio_head
        heads = store.attention("encoder_self", i, q, split_heads(k, h), split_heads(v, h), h, threads=threads)
        x += store.linear(f"{p}.attn.out", heads)
        del qkv, q, k, v, heads
        hidden = store.linear(f"{p}.mlp.fc1", _ln(store, f"{p}.mlp_ln", x))
        x += store.linear(f"{p}.mlp.fc2", gelu(hidden, out=hidden, threads=threads))
        del hidden
    return _ln(store, "encoder.ln_post", x)


@dataclass
class DecoderState:
    """Per-utterance decoder caches: cross-attention K/V (computed once) and self-attention K/V."""

    cross_k: list[np.ndarray]  # per layer [B, H, 1500, dh]
    cross_v: list[np.ndarray]
    self_k: list[np.ndarray]  # per layer [B, H, n_text_ctx, dh], filled up to `length`
    self_v: list[np.ndarray]
    length: int = 0

    def select(self, rows: np.ndarray) -> DecoderState:
        """Keep only `rows` of the batch (finished utterances leave the batch)."""
        pick = lambda arrays: [a[rows] for a in arrays]  # noqa: E731
        return DecoderState(pick(self.cross_k), pick(self.cross_v), pick(self.self_k), pick(self.self_v), self.length)

    def compact(self, rows: np.ndarray) -> DecoderState:
        """`select(rows)` for increasing `rows`, done in place: the kept rows move to the front of
        the same buffers and the caches become views of them (this state is reused).

        `select` copies every cache, so the old and new ones (150 MB of cross-attention K/V
        for 8 windows of whisper-tiny) briefly coexist, and copying the self-attention cache
        whole touches its not-yet-used pages; here nothing is allocated.
        """
        m = len(rows)
        for arrays, upto in ((self.cross_k, None), (self.cross_v, None), (self.self_k, self.length), (self.self_v, self.length)):
            for i, a in enumerate(arrays):
                for dst, src in enumerate(rows):
                    # src >= dst for increasing rows: a row is read before it is overwritten
                    if src != dst:
                        a[dst, :, :upto] = a[src, :, :upto]
                arrays[i] = a[:m]
        return self


def start_decoder(store: WeightStore, dims: ModelDimensions, audio_features: np.ndarray) -> DecoderState:
    """Cross-attention keys/values of every decoder layer, computed once per utterance."""
    state = _empty_decoder_state(dims, audio_features.shape[0], audio_features.shape[1])
    _fill_cross_kv(store, dims, audio_features, state, slice(None))
    return state


def _empty_decoder_state(dims: ModelDimensions, b: int, n_audio: int) -> DecoderState:
    h, dh = dims.n_text_head, dims.text_head_dim
    # np.zeros maps untouched pages lazily: the self-attention cache costs memory only as far
    # as the decoded text reaches
    new = lambda t: [np.zeros((b, h, t, dh), dtype=np.float32) for _ in range(dims.n_text_layer)]  # noqa: E731
    return DecoderState(new(n_audio), new(n_audio), new(dims.n_text_ctx), new(dims.n_text_ctx))


def _fill_cross_kv(store: WeightStore, dims: ModelDimensions, audio_features: np.ndarray, state: DecoderState, rows: slice) -> None:
    """Cross-attention K/V of `audio_features` into `state.cross_k/v[layer][rows]`."""
    b, t, _ = audio_features.shape
    h, dh = dims.n_text_head, dims.text_head_dim
    for i in range(dims.n_text_layer):
        kv = store.linear(f"decoder.blocks.{i}.cross_attn.kv", audio_features).reshape(b, t, 2, h, dh)
        state.cross_k[i][rows] = store.kv_cache_value("cross", i, kv[:, :, 0].transpose(0, 2, 1, 3))
        state.cross_v[i][rows] = store.kv_cache_value("cross", i, kv[:, :, 1].transpose(0, 2, 1, 3))


def decode_step(store: WeightStore, dims: ModelDimensions, tokens: np.ndarray, state: DecoderState) -> np.ndarray:
    """Decoder on new tokens `[B, T]` at positions `state.length...`; returns the last hidden `[B, T, d]`.

    Appends the new keys/values to the self-attention cache and advances `state.length`.
    """
    offset, t = state.length, tokens.shape[1]
    if offset + t > dims.n_text_ctx:
        raise ValueError(f"decoder context of {dims.n_text_ctx} tokens exceeded")
    h = dims.n_text_head
    x = store.embedding("decoder.token_embedding", tokens)
    x += store.param("decoder.positional_embedding")[offset : offset + t]
    for i in range(dims.n_text_layer):
        p = f"decoder.blocks.{i}"
        qkv = store.linear(f"{p}.attn.qkv", _ln(store, f"{p}.attn_ln", x))
        q, k, v = np.split(qkv, 3, axis=-1)
        state.self_k[i][:, :, offset : offset + t] = store.kv_cache_value("decoder_self", i, split_heads(k, h))
        state.self_v[i][:, :, offset : offset + t] = store.kv_cache_value("decoder_self", i, split_heads(v, h))
        keys = state.self_k[i][:, :, : offset + t]
        values = state.self_v[i][:, :, : offset + t]
        x += store.linear(f"{p}.attn.out", store.attention("decoder_self", i, q, keys, values, h, causal_offset=offset))
        q = store.linear(f"{p}.cross_attn.q", _ln(store, f"{p}.cross_attn_ln", x))
        x += store.linear(f"{p}.cross_attn.out", store.attention("cross", i, q, state.cross_k[i], state.cross_v[i], h))
        x += store.linear(f"{p}.mlp.fc2", gelu(store.linear(f"{p}.mlp.fc1", _ln(store, f"{p}.mlp_ln", x))))
    state.length = offset + t
    return _ln(store, "decoder.ln", x)


def output_logits(store: WeightStore, hidden: np.ndarray) -> np.ndarray:
    """Logits over the vocabulary: the token embedding used as the output projection (tied)."""
    return store.linear("decoder.token_embedding", hidden)


# ----------------------------------------------------------------------------------------------
# Greedy decoding
# ----------------------------------------------------------------------------------------------
#: 30 s windows per encoder call in `greedy_decode` (see there)
ENCODER_WINDOWS = 1


def encoder_parallelism(store: WeightStore, n_windows: int) -> tuple[int, int]:
    """`(encoder calls at once, attention threads per call)` in `greedy_decode` of `n_windows`.

    Several windows: that many encoder calls run at once in Python threads, each on a
    single-threaded BLAS. One window (or a store that keeps mutable state in `linear`, such as
    device caches, compute counters or calibration, and says `thread_safe = False`): one call,
    its linear layers on a threaded BLAS and its attention heads in threads. Measured on a
    quiet 2-core box (tiny.en): 0.52 s per window on one thread, 0.29 s with two windows in
    two threads.
    """
    threads = compute_threads()
    calls = min(-(-n_windows // ENCODER_WINDOWS), threads) if getattr(store, "thread_safe", False) else 1
    return max(1, calls), (1 if calls > 1 else threads)


def greedy_decode(
    store: WeightStore,
    dims: ModelDimensions,
    vocab: WhisperVocabulary,
    mels: np.ndarray,
    max_new_tokens: int | None = None,
) -> list[list[int]]:
    """Greedy English transcription without timestamps of a batch of 30 s windows.

    The prompt is the vocabulary's start sequence (`WhisperVocabulary.sot_sequence`): the
    start-of-transcript and no-timestamps tokens, with `<|en|> <|transcribe|>` between them for
    multilingual models, which are never left to guess the language. Each step suppresses the
    model's standard non-speech tokens (and timestamps), and at the first step also blanks and
    end-of-text.
    A row stops at end-of-text or after `max_new_tokens` (default: half the text context, as
    openai's `sample_len`); finished rows leave the batch so their caches stop costing work.
    """
    n = mels.shape[0]
    max_new_tokens = max_new_tokens or dims.n_text_ctx // 2
    prompt = np.array(vocab.sot_sequence(), dtype=np.int64)
    suppress = np.array(sorted(set(vocab.suppress_ids) | set(range(vocab.timestamp_begin, dims.n_vocab))), dtype=np.int64)
    suppress_begin = np.array(vocab.suppress_ids_begin, dtype=np.int64)
    results: list[list[int]] = [[] for _ in range(n)]
    threads = compute_threads()
    state = _empty_decoder_state(dims, n, (mels.shape[1] + 1) // 2)

    def encode_rows(start: int, attention_threads: int) -> None:
        # the encoder runs a few windows at a time: its activations (tens of MB per window)
        # then never exist for the whole batch at once, and 1500-row GEMMs are already
        # large enough for BLAS speed; each call fills its own rows of the cross-attention K/V
        rows = slice(start, min(start + ENCODER_WINDOWS, n))
        _fill_cross_kv(store, dims, encode(store, dims, mels[rows], attention_threads), state, rows)

    starts = range(0, n, ENCODER_WINDOWS)
    calls, attention_threads = encoder_parallelism(store, n)
    if calls > 1:
        parallel_map(lambda start: encode_rows(start, 1), starts, calls)
    else:
        with blas_threads_at_most(threads):
            for start in starts:
                encode_rows(start, attention_threads)
    # the decoder's batch on a threaded BLAS: the output projection alone streams the 80 MB
    # token embedding on every step (4 rows: 20.7 ms on one thread, 7.7 ms on two)
    with blas_threads_at_most(threads):
        _greedy_loop(store, dims, vocab, state, prompt, suppress, suppress_begin, max_new_tokens, results)
    return results


def _greedy_loop(
    store: WeightStore,
    dims: ModelDimensions,
    vocab: WhisperVocabulary,
    state: DecoderState,
    prompt: np.ndarray,
    suppress: np.ndarray,
    suppress_begin: np.ndarray,
    max_new_tokens: int,
    results: list[list[int]],
) -> None:
    n = len(results)
    active = np.arange(n)
    tokens = np.broadcast_to(prompt, (n, len(prompt)))
    for step in range(max_new_tokens):
        hidden = decode_step(store, dims, tokens, state)[:, -1]
        if not np.isfinite(hidden).all():
            # a broken quantizer shows up here; decoding garbage would hide it in a WER
            raise FloatingPointError("non-finite decoder activations (NaN or inf in the weights?)")
        logits = output_logits(store, hidden)
        logits[:, suppress] = -np.inf
        if step == 0:
            logits[:, suppress_begin] = -np.inf
        next_tokens = logits.argmax(axis=-1)
        still_running = next_tokens != vocab.eot
        for row, token in zip(active[still_running], next_tokens[still_running]):
            results[row].append(int(token))
        if not still_running.all():
            active = active[still_running]
            if active.size == 0:
                break
            state = state.compact(np.flatnonzero(still_running))
            next_tokens = next_tokens[still_running]
        if state.length >= dims.n_text_ctx:
            break
        tokens = next_tokens[:, None]


# ----------------------------------------------------------------------------------------------
# Memory on a device store: what transcribing holds at its peak
# ----------------------------------------------------------------------------------------------
def transcribe_memory(dims: ModelDimensions, store: StreamingStore, windows: int, audio_seconds: float,
                      positions: int | None = None) -> WorkingMemory:
    """Working memory of transcribing one utterance of `audio_seconds` as a batch of `windows`
    30 s windows (of `positions` encoder positions: default the model's 1500) on a device store
    (`greedy_decode` on `windows` rows).

    Each phase lists what is alive at its own high-water mark in the code above as written
    (which temporaries numpy makes there): activations, the decoder's KV caches, one block of
    dequantized weight, buffers (audio, log-mel, one (utterance, head) attention score block),
    and what the store's cache holds by the end of the run.
    """
    b, t, d = windows, positions or dims.n_audio_ctx, dims.n_audio_state
    dt, lt, ctx = dims.n_text_state, dims.n_text_layer, dims.n_text_ctx
    # the encoder runs a few of the batch's windows at once: its activations scale with that,
    # the decoder's caches with the whole batch
    calls, attention_threads = encoder_parallelism(store, b)
    e = min(b, calls * ENCODER_WINDOWS)
    frames_in = 2 * t
    samples = int(round(audio_seconds * SAMPLE_RATE))
    pad = 2 * t * HOP_LENGTH
    mel_frames = (samples + pad) // HOP_LENGTH
    stft_bins = N_FFT // 2 + 1
    audio = F32 * samples
    # the full log-mel (windows are views of it) and the stacked batch of windows
    mel = F32 * dims.n_mels * mel_frames + F32 * b * frames_in * dims.n_mels
    buffers = audio + mel
    td = F32 * e * t * d
    # one score block per attention thread (a call with several threads) or per call
    scores = score_block_bytes(t, t) * (calls if calls > 1 else min(attention_threads, dims.n_audio_head))
    # `greedy_decode` allocates every layer's cross-attention K/V and the self-attention cache
    # for the whole batch before the encoder runs (tracemalloc counts them whole from then on)
    kv = 2 * lt * F32 * b * t * dt + 2 * lt * F32 * b * ctx * dt
    block = store.weight_block_bytes()
    cached = sum(store.cached_layers().values())

    def product(name: str) -> int:
        # `x @ rows.T` for one row block of a streamed layer, before it is copied into the output
        return store.block_product_bytes(name, e * t)

    def phase(buffers: int, activations: int = 0, kv: int = 0, linear_runs: bool = False) -> MemoryPhase:
        # a weight row block (and its unpacking scratch) exists only while a linear runs
        return MemoryPhase(buffers_bytes=buffers, activations_bytes=activations, kv_cache_bytes=kv,
                           weight_block_bytes=block if linear_runs else 0, cache_bytes=cached)

    return WorkingMemory(phases={
        # STFT: two padded copies of the audio, then the larger of the cos and sin products
        # (numpy squares and adds them in place) and, at the end, the power spectrum with the
        # mel, log and output arrays `log_mel_spectrogram` keeps until it returns
        "mel": phase(audio + 2 * F32 * (samples + pad)
                     + max(2 * F32 * stft_bins * mel_frames, F32 * stft_bins * mel_frames + 4 * F32 * dims.n_mels * mel_frames)),
        # conv2: conv1's [2t, d] output, its padded copy, the [t, 3d] im2col columns, the output
        "conv": phase(buffers, 2 * td + 2 * td + 3 * td + td + product("encoder.conv2"), kv, linear_runs=True),
        # x, fused qkv, split K and V copies, scaled q, output, the score block
        "encoder-attention": phase(buffers + scores, 8 * td, kv),
        # fc1: x, the normalised input, the [t, 4d] output being filled (GELU then runs in place)
        "encoder-mlp": phase(buffers, td * (1 + 1 + 4) + product("encoder.blocks.0.mlp.fc1"), kv, linear_runs=True),
        # audio features, the previous layer's fused K/V output and the current one's
        "decoder-start": phase(buffers, td + 2 * (2 * F32 * e * t * dt) + product("decoder.blocks.0.cross_attn.kv"), kv,
                               linear_runs=True),
        # finished rows leave the batch in place: the caches do not grow; the logits row
        "decode": phase(buffers + F32 * b * dims.n_vocab, 0, kv, linear_runs=True),
    })


def lean_transcribe_memory(dims: ModelDimensions, windows: int, audio_seconds: float, positions: int,
                           activation_bytes: float, kv_bytes: float, prompt_tokens: int = 4) -> WorkingMemory:
    """What a lean embedded runtime holds to transcribe `windows` windows of `positions` encoder
    positions decoded together as `greedy_decode` does (`Whisper.lean_memory` counts one: a
    runtime takes the windows one at a time), phase by phase (the same arithmetic, scheduled to keep
    only what the next step needs):

    * audio: one window of 16-bit PCM at a time, streamed from storage;
    * a linear's input is stored at `activation_bytes` per value (its per-token float32 scales
      besides) and read by the kernel in place; a linear's output accumulates in float32;
    * the residual stream is float32; norms, GELU and the MLP run one token at a time (fc1's
      4d outputs for one token, never the `[t, 4d]` hidden state);
    * encoder attention runs head by head: that head's Q, K, V (float32 `[t, dh]`) from the
      normalised input, one query row of scores, the head's output into a float32 `[t, d]`
      buffer that the output projection reads once every head is done;
    * the cross-attention keys/values of every window of the batch, and the self-attention
      cache up to the prompt plus the longest transcript, at `kv_bytes` per value (plus a
      float32 scale per token and head when quantized); the windows are encoded one at a time;
    * weights execute in place (integer kernels read packed codes): no dequantized block.
    """
    b, t, d = windows, positions, dims.n_audio_state
    dt, lt, lh = dims.n_text_state, dims.n_text_layer, dims.n_text_head
    dh = dims.audio_head_dim
    a = activation_bytes
    quantized = a < F32
    token_scale = F32 if quantized else 0  # one scale per token of a stored linear input
    kv_scale = F32 * lh if kv_bytes < F32 else 0  # per token, one per head, for K and for V each
    window_samples = 2 * t * HOP_LENGTH
    pcm = 2 * min(window_samples, int(round(audio_seconds * SAMPLE_RATE)))
    mel = F32 * dims.n_mels * 2 * t
    x = F32 * t * d
    stored = lambda rows, width: int(a * rows * width) + token_scale * rows  # noqa: E731
    ctx = prompt_tokens + dims.n_text_ctx // 2
    cross_kv = b * lt * 2 * t * (int(kv_bytes * dt) + kv_scale)
    self_kv = b * lt * 2 * ctx * (int(kv_bytes * dt) + kv_scale)
    # caches of the windows encoded before the last one (all windows decode together)
    earlier = cross_kv * (b - 1) // b

    def phase(buffers: int, activations: int, kv: int = 0) -> MemoryPhase:
        return MemoryPhase(buffers_bytes=buffers, activations_bytes=activations, kv_cache_bytes=kv)

    return WorkingMemory(phases={
        # STFT one frame at a time into the log-mel window
        "mel": phase(pcm + mel + 3 * F32 * N_FFT, 0, earlier),
        # conv1's output (conv2's input) stored, conv2 accumulating into the residual stream
        "conv": phase(mel, stored(2 * t, d) + x, earlier),
        # residual, normalised input, one head's Q/K/V, a score row, the heads' output
        "encoder-attention": phase(0, x + stored(t, d) + 3 * F32 * t * dh + F32 * t + x, earlier),
        # residual plus one token's norm, fc1 output and stored GELU
        "encoder-mlp": phase(0, x + F32 * d + F32 * 4 * d + stored(1, 4 * d), earlier),
        # the normalised encoder output stored, every layer's cross K/V filled
        "decoder-start": phase(0, stored(t, d), cross_kv + self_kv),
        # per row: residual, norm, q, one head's scores, one token's MLP; the logits row
        "decode": phase(F32 * b * dims.n_vocab,
                        b * (F32 * dt + stored(1, dt) + F32 * dt + F32 * max(t, ctx) + F32 * 4 * dt + stored(1, 4 * dt)),
                        cross_kv + self_kv),
    })


# ----------------------------------------------------------------------------------------------
# The model object the harness drives (satisfies qbench.models.speech_model.SpeechModel)
# ----------------------------------------------------------------------------------------------
class Whisper:
    """A Whisper checkpoint ready to transcribe: dimensions, parameters (via a store), vocabulary."""

    sample_rate = SAMPLE_RATE

    def __init__(self, dims: ModelDimensions, store: WeightStore, vocab: WhisperVocabulary, name: str = "whisper",
                 mel_padding: str = "audio", encoder_seconds: float | None = None):
        self.dims = dims
        self.store = store
        self.vocab = vocab
        self.name = name
        self.mel_padding = mel_padding  # see `audio_windows`
        full = dims.n_audio_ctx * 2 * HOP_LENGTH / SAMPLE_RATE
        if encoder_seconds is not None and not 0 < encoder_seconds <= full:
            raise ValueError(f"encoder window of {encoder_seconds:g} s: Whisper's encoder takes at most {full:g} s")
        #: seconds of audio per encoder window (None: the full 30 s); shorter windows encode
        #: fewer positions, as whisper.cpp's `audio_ctx` does
        self.encoder_seconds = encoder_seconds
        self.window_frames = N_FRAMES if encoder_seconds is None else 2 * max(1, round(encoder_seconds * SAMPLE_RATE / HOP_LENGTH / 2))

    @property
    def fit_audio_seconds(self) -> float:
        """`qbench fit` assumes one window per batch row: the encoder's input, whatever the audio."""
        return self.window_frames * HOP_LENGTH / SAMPLE_RATE

    def with_encoder_seconds(self, seconds: float | None) -> Whisper:
        """The same model with encoder windows of `seconds` (None: 30 s)."""
        return Whisper(self.dims, self.store, self.vocab, self.name, self.mel_padding, seconds)

    def _windows(self, audio: np.ndarray) -> list[np.ndarray]:
        return audio_windows(audio, self.dims.n_mels, self.mel_padding, self.window_frames)

    @staticmethod
    def weight_infos(dims: ModelDimensions) -> list[WeightInfo]:
        """Every weight matrix in execution order (conv kernels flattened to `[out, in * 3]`)."""
        d, t = dims.n_audio_state, dims.n_text_state
        infos = [WeightInfo("encoder.conv1", (d, dims.n_mels * 3), "conv"), WeightInfo("encoder.conv2", (d, d * 3), "conv")]
        for i in range(dims.n_audio_layer):
            p = f"encoder.blocks.{i}"
            infos += [
                WeightInfo(f"{p}.attn.qkv", (3 * d, d), "linear"),
                WeightInfo(f"{p}.attn.out", (d, d), "linear"),
                WeightInfo(f"{p}.mlp.fc1", (4 * d, d), "linear"),
                WeightInfo(f"{p}.mlp.fc2", (d, 4 * d), "linear"),
            ]
        # cross-attention K/V run right after the encoder, before any decoder token
        infos += [WeightInfo(f"decoder.blocks.{i}.cross_attn.kv", (2 * t, d), "linear") for i in range(dims.n_text_layer)]
        for i in range(dims.n_text_layer):
            p = f"decoder.blocks.{i}"
            infos += [
                WeightInfo(f"{p}.attn.qkv", (3 * t, t), "linear"),
                WeightInfo(f"{p}.attn.out", (t, t), "linear"),
                WeightInfo(f"{p}.cross_attn.q", (t, t), "linear"),
                WeightInfo(f"{p}.cross_attn.out", (t, t), "linear"),
                WeightInfo(f"{p}.mlp.fc1", (4 * t, t), "linear"),
                WeightInfo(f"{p}.mlp.fc2", (t, 4 * t), "linear"),
            ]
        infos.append(WeightInfo("decoder.token_embedding", (dims.n_vocab, t), "embedding"))
        return infos

    @classmethod
    def from_params(cls, dims: ModelDimensions, params: dict[str, np.ndarray], vocab: WhisperVocabulary, name: str = "whisper") -> Whisper:
        return cls(dims, WeightStore(params, cls.weight_infos(dims)), vocab, name)

    def quantizable_weights(self) -> list[WeightInfo]:
        return self.store.weight_infos()

    def with_store(self, store: WeightStore) -> Whisper:
        return Whisper(self.dims, store, self.vocab, self.name, self.mel_padding, self.encoder_seconds)

    def transcribe(self, audios: list[np.ndarray]) -> list[str]:
        texts = []
        for ids_per_window in self.transcribe_windows(audios):
            texts.append(" ".join(self.vocab.decode(ids).strip() for ids in ids_per_window).strip())
        return texts

    def transcribe_windows(self, audios: list[np.ndarray]) -> list[list[list[int]]]:
        """Token ids per utterance and 30 s window; all windows of the batch decode together."""
        windows, owner = [], []
        for i, audio in enumerate(audios):
            for window in self._windows(audio):
                windows.append(window)
                owner.append(i)
        decoded = greedy_decode(self.store, self.dims, self.vocab, np.stack(windows))
        per_audio: list[list[list[int]]] = [[] for _ in audios]
        for i, ids in zip(owner, decoded):
            per_audio[i].append(ids)
        return per_audio

    @property
    def fit_audio(self) -> str:
        return f"one {self.fit_audio_seconds:g} s window"

    def working_memory(self, store: StreamingStore, utterances: int, audio_seconds: float) -> WorkingMemory:
        """`transcribe_memory` of `utterances` utterances of up to `audio_seconds`: each counted
        as long as the longest, all their windows decoded together."""
        windows = utterances * max(1, math.ceil(audio_seconds / self.fit_audio_seconds))
        return transcribe_memory(self.dims, store, windows, audio_seconds, self.window_frames // 2)

    def lean_memory(self, store: StreamingStore, utterances: int, audio_seconds: float,
                    activation_bytes: float, kv_bytes: float) -> WorkingMemory:
        """`lean_transcribe_memory` of one window: a lean runtime encodes and decodes one window
        at a time, whatever the batch the emulation runs (windows decode independently here,
        and no transcript depends on the batch, so the order changes nothing but the memory)."""
        return lean_transcribe_memory(self.dims, 1, min(audio_seconds, self.fit_audio_seconds), self.window_frames // 2,
                                      activation_bytes, kv_bytes, len(self.vocab.sot_sequence()))

    def teacher_forcing_targets(self, audios: list[np.ndarray]) -> list[list[int]]:
        float_model = self.with_store(WeightStore(self.store.params, self.store.weight_infos()))
        mels = np.stack([w for audio in audios for w in self._windows(audio)])
        return greedy_decode(float_model.store, self.dims, self.vocab, mels)

    def output_log_probs(self, audios: list[np.ndarray], targets: list[list[int]], cache: dict | None = None) -> np.ndarray:
        cache = {} if cache is None else cache
        mels = cache.get("mels")
        if mels is None:
            mels = cache["mels"] = np.stack([w for a in audios for w in self._windows(a)])
        packed = getattr(self.store, "packed", None) or {}
        # a store whose encoder is float encodes exactly as the float model: encode once
        float_encoder = not any(name.startswith("encoder.") for name in packed)
        features = cache.get("float_encoder_features") if float_encoder else None
        if features is None:
            features = encode(self.store, self.dims, mels)
            if float_encoder:
                cache["float_encoder_features"] = features
        tokens, lengths = self._teacher_forced_tokens(targets)
        logits = output_logits(self.store, decode_step(self.store, self.dims, tokens, start_decoder(self.store, self.dims, features)))
        # the positions that predict a target token or the end of text: from the prompt's last
        # token to the one before end of text
        start = len(self.vocab.sot_sequence()) - 1
        return log_softmax(np.concatenate([logits[i, start : n - 1] for i, n in enumerate(lengths)], axis=0), axis=1)

    def _teacher_forced_tokens(self, targets: list[list[int]]) -> tuple[np.ndarray, list[int]]:
        """`[windows, width]` prompt + target + end-of-text rows, padded with end-of-text (padded
        positions only ever attend to real ones: causal mask), and each row's real length."""
        sequences = [self.vocab.sot_sequence() + ids + [self.vocab.eot] for ids in targets]
        tokens = np.full((len(sequences), max(len(s) for s in sequences)), self.vocab.eot, dtype=np.int64)
        for row, seq in enumerate(sequences):
            tokens[row, : len(seq)] = seq
        return tokens, [len(s) for s in sequences]

    def calibration_forward(self, audios: list[np.ndarray], count_padding: bool = True) -> None:
        """Encoder on every calibration window, then the decoder teacher-forced on the model's
        own greedy transcript of each window (in-distribution text, unlike the upper-case
        LibriSpeech references), all rows stacked so each matrix is called exactly once.

        The transcripts come from the float model (`self` before any quantization): they are
        computed first with a plain float store over the same parameters.

        Transcripts differ in length, so the decoder runs on rows padded with end of text; on
        the 44 dev-clean windows 65 % of its positions are padding, states inference never
        reaches. They count as calibration rows unless `count_padding` is False: then only the
        positions inference feeds the decoder (the prompt and the transcript, not the end of
        text or the padding after it) do (`store.counting_rows`). The padding stays counted by
        default because dropping it did not help on dev-clean (the quip README's table): with
        ~570 real rows the decoder's 1536-wide Hessians are rank-deficient, and the padded
        rows fill them in.
        """
        float_model = self.with_store(WeightStore(self.store.params, self.store.weight_infos()))
        windows = [w for audio in audios for w in self._windows(audio)]
        mels = np.stack(windows)
        targets = greedy_decode(float_model.store, self.dims, self.vocab, mels)
        tokens, lengths = self._teacher_forced_tokens(targets)
        fed = np.arange(tokens.shape[1])[None, :] < np.asarray(lengths)[:, None] - 1
        features = encode(self.store, self.dims, mels)
        state = start_decoder(self.store, self.dims, features)
        with self.store.counting_rows(None if count_padding else fed):
            hidden = decode_step(self.store, self.dims, tokens, state)
            output_logits(self.store, hidden)


def count_parameters(dims: ModelDimensions, params: dict[str, np.ndarray]) -> int:
    """Parameters as openai counts them: no sinusoidal encoder table (a buffer) and no key bias
    (Whisper's key projections have none; the fused layout stores zeros in its place)."""
    total = sum(int(v.size) for k, v in params.items() if k != "encoder.positional_embedding")
    key_biases = dims.n_audio_layer * dims.n_audio_state + 2 * dims.n_text_layer * dims.n_text_state
    return total - key_biases
