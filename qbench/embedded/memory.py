"""Memory accounting for a run on an emulated device: weights, working memory, and the check.

Two views of the same run that must agree (a test holds them within 10 %):

* `estimate_whisper_memory` computes, from the model dimensions and batch size alone, what the
  numpy Whisper allocates at its peak on the device path: activations (including the
  temporaries numpy makes), the decoder's KV caches, one block of dequantized weight, and
  buffers (mel, one (utterance, head) attention score matrix).
* `estimate_wav2vec2_memory` does the same for the numpy wav2vec2 from its config and the
  utterance length (an encoder: no KV cache, but memory that grows with the audio).
* `measure_peak` runs real work under tracemalloc, which sees every numpy data allocation.

`DeviceWeightStore` is the store a device run uses: packed (or stored-precision) weights are
turned into float32 one row block at a time when a layer runs and released afterwards, unless
the device budget leaves room for an LRU cache of whole float matrices (`cache_bytes`).
"""

from __future__ import annotations

import tracemalloc
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from qbench.embedded.devices import DeviceProfile
from qbench.models.activations import GELU_SCRATCH_BYTES
from qbench.models.attention import QUERY_BLOCK
from qbench.models.wav2vec2 import CHUNK_FRAMES, Wav2Vec2, Wav2Vec2Config, store_threads
from qbench.models.weight_store import WeightInfo, WeightStore
from qbench.quant.apply import PackedWeightStore
from qbench.quant.contract import apply_scales
from qbench.quant.packing import PackedTensor

#: Float32 bytes of one dequantized row block when a layer is streamed. Small enough that the
#: block and its unpacking temporaries are noise next to the activations, large enough that
#: the Python loop over blocks costs little.
DEFAULT_BLOCK_BYTES = 256 * 1024
F32 = 4


class DeviceWeightStore(PackedWeightStore):
    """Weights at rest as stored (packed or float16); float32 only one row block at a time.

    Unlike `WeightStore`, nothing float is kept between calls unless it fits `cache_bytes`:
    neither transposed matrices nor upcast norms/biases, so the working set is what a device
    would hold. Outputs equal the plain store's up to float32 summation order.
    """

    thread_safe = False  # a device runs one layer at a time; the cache fill is not locked

    def __init__(
        self,
        params: Mapping[str, np.ndarray],
        matrices: Iterable[WeightInfo],
        packed: Mapping[str, PackedTensor] | None = None,
        cache_bytes: int = 0,
        block_bytes: int = DEFAULT_BLOCK_BYTES,
    ):
        super().__init__(params, matrices, packed or {}, cache_bytes=cache_bytes)
        self.block_bytes = int(block_bytes)
        self._full: OrderedDict[str, np.ndarray] = OrderedDict()

    @classmethod
    def from_store(cls, store: WeightStore, cache_bytes: int = 0, block_bytes: int = DEFAULT_BLOCK_BYTES) -> DeviceWeightStore:
        packed = getattr(store, "packed", None) if isinstance(store, PackedWeightStore) else None
        return cls(store.params, store.weight_infos(), packed, cache_bytes, block_bytes)

    def param(self, name: str) -> np.ndarray:
        # Upcast on use and drop: a device keeps norms and biases at their stored precision.
        return np.asarray(self.params[name], dtype=np.float32)

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Float32 rows `[start, stop)` of a layer's `[out, in]` weight, built from storage."""
        pt = self.packed.get(name)
        if pt is None:
            w = self.params[name + ".weight"]
            return np.asarray(w.reshape(w.shape[0], -1)[start:stop], dtype=np.float32)
        in_f = pt.shape[1]
        # PackedTensor reads any flat code range without unpacking the rest of the layer.
        codes = pt._codes_range(start * in_f, stop * in_f).reshape(stop - start, in_f)
        scales = pt.scales if pt.scales.shape[0] == 1 else pt.scales[start:stop]
        zeros = None if pt.zeros is None else (pt.zeros if pt.zeros.shape[0] == 1 else pt.zeros[start:stop])
        return apply_scales(pt._values(codes), scales, zeros, pt.group_size)

    def block_rows(self, name: str) -> int:
        return max(1, self.block_bytes // (self.infos[name].shape[1] * F32))

    def _cached_t(self, name: str) -> np.ndarray | None:
        wt = self._full.get(name)
        if wt is not None:
            return wt
        out_f, in_f = self.infos[name].shape
        nbytes = out_f * in_f * F32
        # Fill once, never evict: a model's layers are used in a fixed cycle, where an LRU
        # smaller than the model misses on every access and only adds work.
        if nbytes == 0 or self._lru_bytes + nbytes > self.cache_bytes:
            return None
        wt = np.empty((in_f, out_f), dtype=np.float32)
        step = self.block_rows(name)
        for r0 in range(0, out_f, step):
            r1 = min(out_f, r0 + step)
            wt[:, r0:r1] = self.rows(name, r0, r1).T
        self._full[name] = wt
        self._lru_bytes += nbytes
        return wt

    def matrix_t(self, name: str) -> np.ndarray:
        wt = self._cached_t(name)
        return wt if wt is not None else np.ascontiguousarray(self.rows(name, 0, self.infos[name].shape[0]).T)

    def linear(self, name: str, x: np.ndarray) -> np.ndarray:
        wt = self._cached_t(name)
        if wt is not None:
            y = x @ wt
        else:
            out_f = self.infos[name].shape[0]
            step = self.block_rows(name)
            y = np.empty((*x.shape[:-1], out_f), dtype=np.float32)
            for r0 in range(0, out_f, step):
                r1 = min(out_f, r0 + step)
                y[..., r0:r1] = x @ self.rows(name, r0, r1).T
        bias_name = name + ".bias"
        if bias_name in self.params:
            y += self.param(bias_name)
        return y

    def cached_bytes(self) -> int:
        return self._lru_bytes


# -- the analytic accountant ----------------------------------------------------------------

#: Peak bytes of unpacking temporaries per code while one block is dequantized (`unpack_bits`
#: shifts codes in uint64 words: 2 x 8 B per code, then int16 and float32 copies).
_UNPACK_SCRATCH_PER_CODE = {"int": 18, "trit5": 12, "float": 4}
#: STFT bins of the log-mel front end (n_fft 400).
_STFT_BINS = 201


class MemoryBreakdown(BaseModel):
    """Bytes of one run on one device, at the working-memory peak."""

    weights_stored_bytes: int = Field(description="every parameter buffer as stored (packed codes, scales, fp16 rest)")
    weights_ram_bytes: int = Field(description="weights held in RAM: 0 when the device executes them in place")
    activations_bytes: int = Field(description="hidden states and numpy temporaries live at the peak")
    kv_cache_bytes: int = Field(description="decoder self- and cross-attention keys/values live at the peak")
    weight_block_bytes: int = Field(description="one dequantized row block plus its unpacking scratch (in the phases that run a linear)")
    buffers_bytes: int = Field(description="audio, log-mel, attention scores live at the peak")
    cache_bytes: int = Field(0, description="float copies of whole layers kept because the budget allows")
    working_peak_bytes: int
    peak_phase: str = Field(description="where the peak is: mel, conv, encoder-attention, encoder-mlp, decoder-start, decode "
                                        "(Whisper); normalize, group-norm-stats, feature-encoder, feature-projection, "
                                        "positional-conv, attention, mlp, lm-head (wav2vec2)")
    total_ram_bytes: int = Field(description="weights_ram_bytes + working_peak_bytes")
    #: every phase's working bytes, to show how far the others are from the peak
    phases: dict[str, int] = Field(default_factory=dict)


def _attention_scores_bytes(t: int) -> int:
    """One `[block, t]` score buffer of the encoder's self-attention over `t` frames (each
    attention thread holds one while it works through its (utterance, head) pairs)."""
    return F32 * min(QUERY_BLOCK, t) * t


def weight_block_bytes(store: WeightStore, block_bytes: int = DEFAULT_BLOCK_BYTES) -> int:
    """Float block plus unpacking scratch of the largest row block any layer is streamed in."""
    packed = getattr(store, "packed", {}) or {}
    worst = 0
    for info in store.weight_infos():
        out_f, in_f = info.shape
        rows = min(out_f, max(1, block_bytes // (in_f * F32)))
        pt = packed.get(info.name)
        kind = "float" if pt is None else pt.packing
        worst = max(worst, rows * in_f * (F32 + _UNPACK_SCRATCH_PER_CODE[kind]))
    return worst


def _cached_layers(store: WeightStore, cache_bytes: int) -> dict[str, int]:
    """Layers `DeviceWeightStore` ends up caching, with their float bytes: in first-use order,
    every layer that still fits."""
    used, cached = 0, {}
    for info in store.weight_infos():
        nbytes = info.numel * F32
        if used + nbytes <= cache_bytes:
            used += nbytes
            cached[info.name] = nbytes
    return cached


def cache_fill_bytes(store: WeightStore, cache_bytes: int) -> int:
    """Bytes `DeviceWeightStore` ends up caching: layers in first-use order until one does not fit."""
    return sum(_cached_layers(store, cache_bytes).values())


def estimate_whisper_memory(
    dims: Any,
    store: WeightStore,
    device: DeviceProfile | None = None,
    batch_windows: int = 1,
    audio_seconds: float = 30.0,
    cache_bytes: int = 0,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> MemoryBreakdown:
    """Peak memory of `Whisper.transcribe` on one utterance of `audio_seconds` (batch of windows).

    Each phase lists what is alive at its own high-water mark in `qbench.models.whisper` as
    written (which temporaries numpy makes there); the run's working peak is the largest phase.
    """
    from qbench.models import whisper

    b, t, d = batch_windows, dims.n_audio_ctx, dims.n_audio_state
    dt, lt, ctx = dims.n_text_state, dims.n_text_layer, dims.n_text_ctx
    # the encoder runs a few of the batch's windows at once: its activations scale with that,
    # the decoder's caches with the whole batch
    calls, attention_threads = whisper.encoder_parallelism(store, b)
    e = min(b, calls * whisper.ENCODER_WINDOWS)
    frames_in = 2 * t
    samples = int(round(audio_seconds * 16000))
    pad = 30 * 16000
    mel_frames = (samples + pad) // 160
    audio = F32 * samples
    # the full log-mel (windows are views of it) and the stacked batch of windows
    mel = F32 * dims.n_mels * mel_frames + F32 * b * frames_in * dims.n_mels
    buffers = audio + mel
    td = F32 * e * t * d
    # one score buffer per attention thread (a call with several threads) or per call
    scores = _attention_scores_bytes(t) * (calls if calls > 1 else min(attention_threads, dims.n_audio_head))
    # `greedy_decode` allocates every layer's cross-attention K/V and the self-attention cache
    # for the whole batch before the encoder runs (tracemalloc counts them whole from then on)
    kv = 2 * lt * F32 * b * t * dt + 2 * lt * F32 * b * ctx * dt
    block = weight_block_bytes(store, block_bytes)
    cached = cache_fill_bytes(store, cache_bytes)

    def product(in_features: int, out_features: int) -> int:
        # `x @ rows.T` for one row block of a streamed layer, before it is copied into the output
        return F32 * e * t * min(out_features, max(1, block_bytes // (F32 * in_features)))

    phases: dict[str, dict[str, int]] = {
        # STFT: |X|^2 of cos and sin parts alive together with their sum, plus two padded copies
        "mel": {"buffers": audio + 2 * F32 * (samples + pad) + 3 * F32 * _STFT_BINS * mel_frames, "activations": 0, "kv": 0},
        # conv2: conv1's [2t, d] output, its padded copy, the [t, 3d] im2col columns, the output
        "conv": {"buffers": buffers, "activations": 2 * td + 2 * td + 3 * td + td + product(3 * d, d), "kv": kv},
        # x, fused qkv, split K and V copies, scaled q, output, the score buffer
        "encoder-attention": {"buffers": buffers + scores, "activations": 8 * td, "kv": kv},
        # fc1: x, the normalised input, the [t, 4d] output being filled (GELU then runs in place)
        "encoder-mlp": {"buffers": buffers, "activations": td * (1 + 1 + 4) + product(d, 4 * d), "kv": kv},
        # audio features, the previous layer's fused K/V output and the current one's
        "decoder-start": {"buffers": buffers, "activations": td + 2 * (2 * F32 * e * t * dt) + product(d, 2 * dt), "kv": kv},
        # finished rows leave the batch in place: the caches do not grow; the logits row
        "decode": {"buffers": buffers + F32 * b * dims.n_vocab, "activations": 0, "kv": kv},
    }
    # a weight row block (and its unpacking scratch) exists only while a linear runs
    with_block = {"conv", "encoder-mlp", "decoder-start", "decode"}
    totals = {name: sum(p.values()) + (block if name in with_block else 0) + cached for name, p in phases.items()}
    peak_phase = max(totals, key=totals.get)
    p = phases[peak_phase]
    stored = store.stored_bytes()
    in_ram = 0 if device is not None and device.weights_execute_in_place else stored
    return MemoryBreakdown(
        weights_stored_bytes=stored,
        weights_ram_bytes=in_ram,
        activations_bytes=p["activations"],
        kv_cache_bytes=p["kv"],
        weight_block_bytes=block if peak_phase in with_block else 0,
        buffers_bytes=p["buffers"],
        cache_bytes=cached,
        working_peak_bytes=totals[peak_phase],
        peak_phase=peak_phase,
        total_ram_bytes=in_ram + totals[peak_phase],
        phases=totals,
    )


# -- wav2vec2 -------------------------------------------------------------------------------

#: Utterance length the wav2vec2 accountant assumes when no audio is at hand (`qbench fit`):
#: wav2vec2 has no fixed window, its memory grows with the utterance, and 35 s is about the
#: longest LibriSpeech test utterance.
WAV2VEC2_AUDIO_SECONDS = 35.0


def _streamed_linear_bytes(store: WeightStore, name: str, rows_in: int, block_bytes: int,
                           cached: Mapping[str, int]) -> tuple[int, int]:
    """`(product, weight block)` bytes `DeviceWeightStore.linear` holds besides its output while
    layer `name` runs on `rows_in` rows: one row block's `x @ rows.T` and the float rows."""
    if name in cached:
        return 0, 0  # one GEMM straight into the output
    out_f, in_f = store.infos[name].shape
    step = min(out_f, max(1, block_bytes // (in_f * F32)))
    product, codes = F32 * rows_in * step, step * in_f
    pt = (getattr(store, "packed", None) or {}).get(name)
    if pt is None:
        # float32 at rest: `rows` is a view of the stored weight; other dtypes are upcast
        return product, 0 if store.params[name + ".weight"].dtype == np.float32 else F32 * codes
    # the unpacking temporaries are freed before the product is allocated; the rows are not
    return product, max(F32 * codes, _UNPACK_SCRATCH_PER_CODE[pt.packing] * codes - product)


def estimate_wav2vec2_memory(
    config: Wav2Vec2Config,
    store: WeightStore,
    device: DeviceProfile | None = None,
    audio_seconds: float = WAV2VEC2_AUDIO_SECONDS,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    cache_bytes: int = 0,
    chunk_frames: int | None = CHUNK_FRAMES,
    batch_utterances: int = 1,
) -> MemoryBreakdown:
    """Peak memory of `Wav2Vec2.logits` on one utterance of `audio_seconds` on a `DeviceWeightStore`,
    while the caller holds the waveforms of `batch_utterances` (`transcribe` runs them one at a
    time, so nothing else adds up).

    As in `estimate_whisper_memory`, each phase counts what is alive at its own high-water mark
    in `qbench.models.wav2vec2` as written, numpy's temporaries included, and the working peak
    is the largest phase. The feature encoder's memory is bounded by its chunk of
    `chunk_frames` frames (the model's `chunk_frames`; None: unchunked); everything after it
    grows with the utterance: the positional conv's im2col columns (`[frames, d / G * K]`,
    built and then concatenated, so twice) overtake the feature encoder's chunk at about
    17 s for the base and large configs. `device` only decides whether the weights count in
    RAM (not when executed in place). On a store without state in `linear` the model runs
    chunks, positional-conv groups and heads in threads: their memory is counted once per
    thread (an upper bound: threads need not peak together).
    """
    c = config
    threads = store_threads(store)
    cached = _cached_layers(store, cache_bytes)
    # the cache fills as layers first run, in `weight_infos` order: bytes filled once `name` ran
    filled, so_far = {}, 0
    for info in store.weight_infos():
        so_far += cached.get(info.name, 0)
        filled[info.name] = so_far
    Mark = tuple[int, int, int, int]  # (buffers, activations, weight block, cache) at a high-water mark

    def mark(activations: int, after: str | None = None, buffers: int = 0) -> Mark:
        """Bytes alive when no linear runs, `after` the last layer that ran."""
        return buffers, activations, 0, filled[after] if after else 0

    def linear(name: str, rows_in: int, output: int) -> Mark:
        """While layer `name` runs on `rows_in` rows: `output` plus one row block's product and rows."""
        product, block = _streamed_linear_bytes(store, name, rows_in, block_bytes, cached)
        return 0, output + product, block, filled[name]

    def largest(*marks: Mark) -> Mark:
        return max(marks, key=sum)

    def plus(m: Mark, buffers: int = 0, activations: int = 0, times: int = 1) -> Mark:
        """`m` happening in `times` threads at once, on top of shared `buffers` and `activations`."""
        return buffers + times * m[0], activations + times * m[1], times * m[2], m[3]

    samples = int(round(audio_seconds * Wav2Vec2.sample_rate))
    t = c.num_frames(samples)
    audio = F32 * samples * batch_utterances  # the caller's waveforms, alive throughout
    normalized = F32 * samples  # normalize_audio's copy, alive through the feature encoder
    phases: dict[str, Mark] = {}
    if t == 0:  # shorter than one receptive field: `logits` returns before any work
        phases["normalize"] = mark(0, buffers=audio)
    else:
        # x - mean and the quotient (numpy may reuse the first for the second)
        phases["normalize"] = mark(2 * normalized, buffers=audio)

        # -- feature encoder: every conv layer over one chunk (or, short audio, all of it)
        chunked = chunk_frames is not None and t > chunk_frames
        layer_norm = c.feat_extract_norm == "layer"
        last_conv = f"feature_encoder.conv.{len(c.conv_dim) - 1}"

        def conv_stack(frames: int, first: bool) -> list[Mark]:
            """The conv layers over the samples of `frames` output frames; `first`: the first
            chunk, which fills the cache as it goes (later ones find every conv layer there)."""
            n = (frames - 1) * c.total_stride + c.receptive_field if chunked else samples
            c_in, x_held, y_held = 1, 0, 0  # the layer's input, and the last conv output besides it
            marks: list[Mark] = []
            for l, (c_out, k, s) in enumerate(zip(c.conv_dim, c.conv_kernel, c.conv_stride)):
                name = f"feature_encoder.conv.{l}"
                n = (n - k) // s + 1
                # im2col of the one-channel waveform is a strided view; the stacked pass copies it
                cols = 0 if chunked and c_in == 1 else F32 * n * c_in * k
                y = F32 * n * c_out
                # the input stays bound until the layer's norm is done (the stacked pass's
                # `del xs` leaves its im2col loop variable), a chunk's previous conv output
                # until the linear returns
                marks.append(linear(name, n, x_held + y_held + cols + y))
                # layer_norm: a centred copy and its square; the unchunked group norm's
                # statistics: y - mean and its square; the chunked group norm runs in place
                temps = 2 * y if layer_norm or (l == 0 and not chunked) else 0
                marks.append(mark(x_held + y + max(temps, (y if layer_norm else 0) + GELU_SCRATCH_BYTES), name))
                # the output is the next input; with a layer norm, `one_chunk` also keeps the
                # raw conv output bound (the stacked pass deletes it)
                x_held, y_held = y, (y if layer_norm and chunked else 0)
                c_in = c_out
            if not first:
                marks = [(*m[:3], filled[last_conv]) for m in marks]
            return marks

        if chunked:
            # the first chunk, and the largest later one; chunks run one per thread, writing
            # into `out` [frames, c_last] allocated before them
            later = conv_stack(min(chunk_frames, t - chunk_frames), first=False)
            out = F32 * t * c.conv_dim[-1]
            in_flight = min(threads, -(-t // chunk_frames))
            phases["feature-encoder"] = plus(largest(*conv_stack(chunk_frames, first=True), *later),
                                             audio + normalized, out, in_flight)
            if c.feat_extract_norm == "group":
                # `_first_layer_stats`: the first layer's im2col rows (a view) as float64, and
                # its weight as float32 and float64
                rows0 = (samples - c.conv_kernel[0]) // c.conv_stride[0] + 1
                weight0 = (F32 + 8) * c.conv_dim[0] * c.conv_kernel[0]
                phases["group-norm-stats"] = mark(8 * rows0 * c.conv_kernel[0] + weight0, buffers=audio + normalized)
        else:
            phases["feature-encoder"] = plus(largest(*conv_stack(t, first=True)), audio + normalized)

        # -- transformer: `_encode` holds the conv features to its end
        d, ffn, heads = c.hidden_size, c.intermediate_size, c.num_attention_heads
        feats = F32 * t * c.conv_dim[-1]
        td = F32 * t * d
        # layer_norm of the features: a centred copy and its square
        phases["feature-projection"] = plus(
            largest(mark(2 * feats, last_conv), linear("feature_projection.proj", t, feats + td)), audio, feats)

        k_pos, groups = c.num_conv_pos_embeddings, c.num_conv_pos_embedding_groups
        dg = d // groups
        t_pad = t + 2 * (k_pos // 2)
        # per group: the channel-major copy im2col makes for a long kernel, its reshaped
        # windows, their concatenation (a copy even of one utterance), the group's output
        windows, cols = F32 * (t_pad - k_pos + 1) * dg * k_pos, F32 * t * dg * k_pos
        group_marks, ran = [], "feature_projection.proj"
        for g in range(groups):
            name = f"encoder.pos_conv.{g}"
            group_marks += [mark(F32 * dg * t_pad + windows, ran), mark(windows + cols, ran),
                            linear(name, t, cols + F32 * t * dg)]
            ran = name
        # besides x: its padded copy and the output, through the groups and the GELU; then
        # the encoder's input layer norm (or the first pre-LN block's): a centred copy and its square
        padded_out = F32 * t_pad * d + td
        phases["positional-conv"] = plus(largest(
            plus(largest(*group_marks), activations=padded_out, times=min(threads, groups)),
            mark(padded_out + threads * GELU_SCRATCH_BYTES, ran), mark(2 * td, ran)), audio, feats + td)

        x = td + (td if c.do_stable_layer_norm else 0) + feats  # x, and its layer norm before a pre-LN block
        q_block = min(t, QUERY_BLOCK)
        per_thread = min(threads, heads)
        # qkv, its split K and V copies, the attention output; inside `attention`: the scaled
        # q, its own output, and per thread a score block and its [block, head dim] product
        qkv_kv_out = 3 * td + 2 * td + td
        scores = per_thread * _attention_scores_bytes(t)
        inside = qkv_kv_out + 2 * td + per_thread * F32 * q_block * (d // heads)
        hidden = F32 * t * ffn
        attention_marks, mlp_marks = [], []
        for i in range(c.num_hidden_layers):
            p = f"encoder.blocks.{i}"
            attention_marks += [linear(p + ".attn.qkv", t, 3 * td), mark(inside, p + ".attn.qkv", buffers=scores),
                                linear(p + ".attn.out", t, qkv_kv_out + td)]
            mlp_marks += [linear(p + ".mlp.fc1", t, hidden), mark(hidden + threads * GELU_SCRATCH_BYTES, p + ".mlp.fc1"),
                          linear(p + ".mlp.fc2", t, hidden + td)]
        if attention_marks:
            phases["attention"] = plus(largest(*attention_marks), audio, x)
            phases["mlp"] = plus(largest(*mlp_marks), audio, x)

        # pre-LN: the encoder's final layer norm; then the logits
        last = f"encoder.blocks.{c.num_hidden_layers - 1}.mlp.fc2" if c.num_hidden_layers else ran
        final_norm = mark(2 * td if c.do_stable_layer_norm else 0, last)
        phases["lm-head"] = plus(largest(final_norm, linear("lm_head", t, F32 * t * c.vocab_size)), audio, td + feats)

    totals = {name: sum(p) for name, p in phases.items()}
    peak_phase = max(totals, key=totals.get)
    buffers, activations, block, cache = phases[peak_phase]
    stored = store.stored_bytes()
    in_ram = 0 if device is not None and device.weights_execute_in_place else stored
    return MemoryBreakdown(
        weights_stored_bytes=stored,
        weights_ram_bytes=in_ram,
        activations_bytes=activations,
        kv_cache_bytes=0,
        weight_block_bytes=block,
        buffers_bytes=buffers,
        cache_bytes=cache,
        working_peak_bytes=totals[peak_phase],
        peak_phase=peak_phase,
        total_ram_bytes=in_ram + totals[peak_phase],
        phases=totals,
    )


# -- measuring ------------------------------------------------------------------------------


def measure_peak(fn: Callable[[], Any]) -> tuple[Any, int]:
    """`fn()` and the peak bytes numpy (and Python) allocated above what was live at the start.

    tracemalloc sees numpy's data buffers (numpy reports them to it), so this is the working
    memory of the call; arrays that existed before (the weights) are not counted.
    """
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        result = fn()
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        if started:
            tracemalloc.stop()
    return result, max(0, peak)


# -- the verdict ----------------------------------------------------------------------------


class FitReport(BaseModel):
    """Whether a model fits a device, as recorded in a result's `device` field."""

    profile: DeviceProfile
    fits: bool
    reason: str | None = None
    breakdown: MemoryBreakdown
    measured_peak_bytes: int | None = Field(None, description="largest tracemalloc working peak over the run's batches")
    batch_size: int = 1


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def check_fit(breakdown: MemoryBreakdown, device: DeviceProfile, measured_peak: int | None = None) -> FitReport:
    """Apply the device's storage and RAM rules to the accounting (and a measured peak, if any)."""
    b = breakdown
    working = max(b.working_peak_bytes, measured_peak or 0)
    needs = b.weights_ram_bytes + working
    problems = []
    if b.weights_stored_bytes > device.storage_bytes:
        problems.append(f"weights need {_mb(b.weights_stored_bytes)} of storage, device has {_mb(device.storage_bytes)}")
    if needs > device.ram_bytes:
        measured = " (measured)" if measured_peak is not None and measured_peak > b.working_peak_bytes else ""
        problems.append(f"needs {_mb(needs)} RAM{measured}, device has {_mb(device.ram_bytes)}")
    reason = None
    if problems:
        reason = (
            f"does not fit on {device.name}: {'; '.join(problems)} (weights {_mb(b.weights_ram_bytes)} in RAM, "
            f"activations {_mb(b.activations_bytes)}, KV cache {_mb(b.kv_cache_bytes)}, weight block {_mb(b.weight_block_bytes)}, "
            f"buffers {_mb(b.buffers_bytes)}, cache {_mb(b.cache_bytes)}; peak in {b.peak_phase})"
        )
    return FitReport(profile=device, fits=reason is None, reason=reason, breakdown=b, measured_peak_bytes=measured_peak)
