"""wav2vec 2.0 for CTC in numpy: feature encoder, transformer encoder, greedy CTC decoding.

Read top to bottom like openai/whisper's model.py. Equal (to float32 rounding) to Hugging Face
`Wav2Vec2ForCTC` in eval mode for both checkpoint families:

* base (facebook/wav2vec2-base-960h): `feat_extract_norm="group"` (group norm with one group per
  channel on the first conv layer only), post-LN transformer with an encoder layer norm before
  the layers;
* large "stable layer norm" (facebook/wav2vec2-large-960h-lv60-self): `feat_extract_norm="layer"`
  (layer norm over channels after every conv layer), pre-LN transformer with the encoder layer
  norm after the layers.

Parameter names (the canonical names `qbench.checkpoints.hf_wav2vec2` maps to; `d` hidden size,
`c_l` conv channels, `G` positional conv groups, `K` positional conv kernel):

    feature_encoder.conv.{l}.weight [c_l, c_{l-1}, k_l]   (c_{-1} = 1)   feature_encoder.conv.{l}.bias
    feature_encoder.norm.{l}.{weight,bias} [c_l]   group norm (l = 0 only) or layer norm (every l)
    feature_projection.ln.{weight,bias} [c_last]
    feature_projection.proj.{weight [d, c_last], bias}
    encoder.pos_conv.{g}.weight [d/G, d/G, K]  encoder.pos_conv.{g}.bias [d/G]   g = 0..G-1:
        the grouped positional conv split into its G independent convs (weight norm already
        folded in), so that each is an ordinary matrix [d/G, d/G*K] for `store.linear`
    encoder.ln.{weight,bias}           before the layers (post-LN) or after them (stable LN)
    encoder.blocks.{i}.attn.qkv.{weight [3d, d], bias [3d]}   query, key, value stacked
    encoder.blocks.{i}.attn.out.{weight, bias}
    encoder.blocks.{i}.attn_ln.{weight,bias}   HF `layer_norm`: after the attention residual
                                               (post-LN) or before attention (stable LN)
    encoder.blocks.{i}.mlp.fc1.{weight [ffn, d], bias}  encoder.blocks.{i}.mlp.fc2.{weight, bias}
    encoder.blocks.{i}.mlp_ln.{weight,bias}    HF `final_layer_norm`
    lm_head.{weight [vocab, d], bias}

Activations are time-major `[frames, channels]` throughout, so every conv is im2col followed by
`store.linear`, and a conv weight seen as a matrix is `[out, in * k]`, input-channel major.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from itertools import groupby
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from qbench.models.activations import GELU_SCRATCH_BYTES, gelu, layer_norm, log_softmax
from qbench.models.attention import QUERY_BLOCK, score_block_bytes, split_heads
from qbench.models.parallel import compute_threads, parallel_map
from qbench.models.weight_store import WeightInfo, WeightStore
from qbench.models.working_memory import F32, MemoryPhase, StreamingStore, WorkingMemory

#: eps of the torch.nn.GroupNorm / LayerNorm in the feature encoder (HF does not pass the
#: config's layer_norm_eps there)
CONV_NORM_EPS = 1e-5
#: Wav2Vec2FeatureExtractor's per-utterance normalisation eps (do_normalize=True)
INPUT_NORM_EPS = 1e-7
#: Output frames (20 ms each) per feature-encoder chunk: bounds that stage's memory whatever
#: the utterance length (`logits_memory` counts with the model's `chunk_frames`)
CHUNK_FRAMES = 128


@dataclass(frozen=True)
class Wav2Vec2Config:
    """The fields of a Hugging Face wav2vec2 `config.json` that the forward pass depends on."""

    conv_dim: tuple[int, ...] = (512, 512, 512, 512, 512, 512, 512)
    conv_kernel: tuple[int, ...] = (10, 3, 3, 3, 3, 2, 2)
    conv_stride: tuple[int, ...] = (5, 2, 2, 2, 2, 2, 2)
    conv_bias: bool = False
    feat_extract_norm: str = "group"
    feat_extract_activation: str = "gelu"
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    num_conv_pos_embeddings: int = 128
    num_conv_pos_embedding_groups: int = 16
    do_stable_layer_norm: bool = False
    layer_norm_eps: float = 1e-5
    vocab_size: int = 32
    pad_token_id: int = 0
    add_adapter: bool = False

    def __post_init__(self) -> None:
        if not len(self.conv_dim) == len(self.conv_kernel) == len(self.conv_stride):
            raise ValueError("conv_dim, conv_kernel and conv_stride must have the same length")
        if self.feat_extract_norm not in ("group", "layer"):
            raise ValueError(f"feat_extract_norm must be 'group' or 'layer', not {self.feat_extract_norm!r}")
        if self.hidden_act != "gelu" or self.feat_extract_activation != "gelu":
            raise ValueError("only the exact (erf) GELU activation is implemented")
        if self.add_adapter:
            raise ValueError("wav2vec2 adapter layers (add_adapter=true) are not implemented")
        if self.hidden_size % self.num_attention_heads or self.hidden_size % self.num_conv_pos_embedding_groups:
            raise ValueError("hidden_size must divide into attention heads and positional conv groups")

    @classmethod
    def from_hf(cls, config: Mapping[str, Any]) -> Wav2Vec2Config:
        """From a parsed HF `config.json`; keys the forward pass does not use are ignored."""
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in config.items() if k in known and v is not None}
        for key in ("conv_dim", "conv_kernel", "conv_stride"):
            if key in kwargs:
                kwargs[key] = tuple(int(v) for v in kwargs[key])
        return cls(**kwargs)

    @property
    def total_stride(self) -> int:
        """Audio samples per output frame (320 = 20 ms at 16 kHz for every released model)."""
        return math.prod(self.conv_stride)

    @property
    def receptive_field(self) -> int:
        """Audio samples one output frame depends on (400 for every released model)."""
        field, jump = 1, 1
        for k, s in zip(self.conv_kernel, self.conv_stride):
            field += (k - 1) * jump
            jump *= s
        return field

    def num_frames(self, num_samples: int) -> int:
        """Output frames for an input of `num_samples` (0 if shorter than the receptive field)."""
        n = num_samples
        for k, s in zip(self.conv_kernel, self.conv_stride):
            n = (n - k) // s + 1 if n >= k else 0
        return n


def weight_infos(config: Wav2Vec2Config) -> list[WeightInfo]:
    """Every weight matrix of the model, in execution order."""
    infos: list[WeightInfo] = []
    c_in = 1
    for l, (c, k) in enumerate(zip(config.conv_dim, config.conv_kernel)):
        infos.append(WeightInfo(f"feature_encoder.conv.{l}", (c, c_in * k), "conv"))
        c_in = c
    d, ffn = config.hidden_size, config.intermediate_size
    infos.append(WeightInfo("feature_projection.proj", (d, c_in), "linear"))
    dg = d // config.num_conv_pos_embedding_groups
    for g in range(config.num_conv_pos_embedding_groups):
        infos.append(WeightInfo(f"encoder.pos_conv.{g}", (dg, dg * config.num_conv_pos_embeddings), "conv"))
    for i in range(config.num_hidden_layers):
        p = f"encoder.blocks.{i}"
        infos += [
            WeightInfo(f"{p}.attn.qkv", (3 * d, d), "linear"),
            WeightInfo(f"{p}.attn.out", (d, d), "linear"),
            WeightInfo(f"{p}.mlp.fc1", (ffn, d), "linear"),
            WeightInfo(f"{p}.mlp.fc2", (d, ffn), "linear"),
        ]
    infos.append(WeightInfo("lm_head", (config.vocab_size, d), "linear"))
    return infos


# -- elementwise building blocks ---------------------------------------------------------------

def im2col(x: np.ndarray, kernel: int, stride: int, out: np.ndarray | None = None) -> np.ndarray:
    """`[T, C]` -> `[T_out, C * kernel]`, input-channel major (the store's conv matrix layout),
    written into `out` (C-contiguous) if given."""
    if kernel >= 16:
        # a long kernel (the positional conv's 128) gathers `kernel` samples per (frame,
        # channel): from a channel-major copy they are contiguous runs (2x faster than
        # striding through `x`'s rows); for kernels of 2-10 the row-major read wins
        windows = sliding_window_view(np.ascontiguousarray(x.T), kernel, axis=1)[:, ::stride].transpose(1, 0, 2)
    else:
        windows = sliding_window_view(x, kernel, axis=0)[::stride]  # [T_out, C, kernel], a view
    if out is None:
        return windows.reshape(windows.shape[0], -1)  # the one copy
    out.reshape(windows.shape)[...] = windows
    return out


def normalize_audio(audio: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance per utterance, as Wav2Vec2FeatureExtractor(do_normalize=True)."""
    x = np.asarray(audio, dtype=np.float32)
    return (x - x.mean()) / np.sqrt(x.var() + np.float32(INPUT_NORM_EPS))


# -- CTC ----------------------------------------------------------------------------------------


def ctc_greedy_decode(ids: Sequence[int], vocab: Sequence[str], blank_id: int = 0,
                      word_delimiter: str = "|") -> str:
    """Collapse repeats, drop blanks, `|` -> space: HF `Wav2Vec2CTCTokenizer.decode(ids)`.

    Like HF's default decode (the one every model card uses), special tokens other than the
    blank (`<s>`, `</s>`, `<unk>`) are kept as text; a trained model practically never emits them.
    """
    chars = [vocab[i] for i, _ in groupby(int(i) for i in ids) if i != blank_id]
    return "".join(" " if c == word_delimiter else c for c in chars).strip()


# -- the model ----------------------------------------------------------------------------------


class Wav2Vec2:
    """wav2vec 2.0 with a CTC head; every weight matmul goes through `self.store.linear`."""

    sample_rate: int = 16000
    #: what `qbench fit` assumes per batch row when no audio is at hand: wav2vec2 has no fixed
    #: window, its memory grows with the utterance, and 35 s is about the longest LibriSpeech
    #: test utterance
    UTTERANCE_FIT_SECONDS = 35.0

    def __init__(self, config: Wav2Vec2Config, store: WeightStore, vocab: Sequence[str],
                 name: str = "wav2vec2", chunk_frames: int = CHUNK_FRAMES, encoder_seconds: float | None = None):
        """`vocab[i]` is token id i's string; `chunk_frames` output frames (20 ms each) per
        feature-encoder chunk bounds that stage's memory whatever the utterance length."""
        if len(vocab) != config.vocab_size:
            raise ValueError(f"vocab has {len(vocab)} tokens, config.vocab_size is {config.vocab_size}")
        self.config = config
        self.store = store
        self.vocab = list(vocab)
        self.name = name
        self.chunk_frames = chunk_frames
        if encoder_seconds is not None and not encoder_seconds > 0:
            raise ValueError(f"encoder window of {encoder_seconds:g} s: give a positive length")
        #: seconds of audio per independent encoder pass (None: the whole utterance at once);
        #: the CTC frames of consecutive chunks are concatenated before decoding
        self.encoder_seconds = encoder_seconds

    @property
    def fit_audio_seconds(self) -> float:
        return self.UTTERANCE_FIT_SECONDS if self.encoder_seconds is None else self.encoder_seconds

    def with_encoder_seconds(self, seconds: float | None) -> Wav2Vec2:
        """The same model encoding audio in independent chunks of `seconds` (None: whole)."""
        return Wav2Vec2(self.config, self.store, self.vocab, self.name, self.chunk_frames, seconds)

    @classmethod
    def from_params(cls, config: Wav2Vec2Config, params: Mapping[str, np.ndarray],
                    vocab: Sequence[str], name: str = "wav2vec2") -> Wav2Vec2:
        """From canonical-named parameters (see the module docstring)."""
        return cls(config, WeightStore(params, weight_infos(config)), vocab, name)

    # -- SpeechModel -----------------------------------------------------------------------
    def quantizable_weights(self) -> list[WeightInfo]:
        return weight_infos(self.config)

    def with_store(self, store: WeightStore) -> Wav2Vec2:
        return Wav2Vec2(self.config, store, self.vocab, self.name, self.chunk_frames, self.encoder_seconds)

    def transcribe(self, audios: list[np.ndarray]) -> list[str]:
        """Greedy CTC transcripts; each utterance runs alone, so no padding or attention mask
        is needed and results do not depend on batch composition."""
        return [self.decode(self.chunked_logits(audio)) for audio in audios]

    def chunked_logits(self, audio: np.ndarray) -> np.ndarray:
        """`logits` of the whole utterance, or with an encoder window, of each chunk on its own
        (each normalised alone, as a streaming device sees it), concatenated."""
        if self.encoder_seconds is None:
            return self.logits(audio)
        step = max(1, int(round(self.encoder_seconds * self.sample_rate)))
        chunks = [self.logits(audio[i : i + step]) for i in range(0, max(1, len(audio)), step)]
        return np.concatenate(chunks, axis=0)

    def calibration_forward(self, audios: list[np.ndarray], count_padding: bool = True,
                            max_seconds: float | None = 4.0) -> None:
        """One pass over all utterances with every matrix applied once to the stacked inputs
        (concatenated, so there is no padding for `count_padding` to count).

        Each utterance is cropped to its first `max_seconds` (None: no crop) because the
        stacked, unchunked feature encoder holds 512 x 3200 floats per second of audio at its
        first layer and 1536 x 1600 im2col floats at its second: the pass peaks at ~16 MB per
        second of calibration audio (tracemalloc, 512 conv channels), 1 GB for 16 x 4 s.
        Frames of all utterances are concatenated along the row axis for every conv and linear;
        attention and the positional conv see utterance boundaries.
        """
        xs = [normalize_audio(a) for a in audios]
        if max_seconds is not None:
            xs = [x[: int(max_seconds * self.sample_rate)] for x in xs]
        feats = self._feature_encoder_stacked([x[:, None] for x in xs])
        lengths = [f.shape[0] for f in feats]
        self._encode(np.concatenate(feats, axis=0), lengths)

    def teacher_forcing_targets(self, audios: list[np.ndarray]) -> list[None]:
        return [None for _ in audios]  # CTC: every frame's distribution is scored as it is

    def output_log_probs(self, audios: list[np.ndarray], targets: list[None], cache: dict | None = None) -> np.ndarray:
        return log_softmax(np.concatenate([self.chunked_logits(audio) for audio in audios], axis=0), axis=1)

    @property
    def fit_audio(self) -> str:
        return f"one {self.fit_audio_seconds:g} s utterance"

    def working_memory(self, store: StreamingStore, utterances: int, audio_seconds: float) -> WorkingMemory:
        """`logits_memory` of the longest of `utterances` utterances of up to `audio_seconds`
        (`transcribe` runs them one at a time: only their waveforms add up)."""
        seconds = audio_seconds if self.encoder_seconds is None else min(audio_seconds, self.encoder_seconds)
        return logits_memory(self.config, store, seconds, self.chunk_frames, utterances)

    def lean_memory(self, store: StreamingStore, utterances: int, audio_seconds: float,
                    activation_bytes: float, kv_bytes: float) -> WorkingMemory:
        """`lean_logits_memory` of the longest utterance (or encoder chunk); CTC keeps no KV cache."""
        seconds = audio_seconds if self.encoder_seconds is None else min(audio_seconds, self.encoder_seconds)
        return lean_logits_memory(self.config, seconds, activation_bytes, self.chunk_frames)

    # -- single-utterance inference ----------------------------------------------------------
    def logits(self, audio: np.ndarray) -> np.ndarray:
        """CTC logits `[frames, vocab]` of one 16 kHz waveform (normalised here)."""
        if self.config.num_frames(len(audio)) == 0:  # shorter than one 25 ms receptive field
            return np.zeros((0, self.config.vocab_size), dtype=np.float32)
        feats = self.feature_encoder(normalize_audio(audio))
        return self._encode(feats, [feats.shape[0]])

    def decode(self, logits: np.ndarray) -> str:
        return ctc_greedy_decode(logits.argmax(axis=-1), self.vocab, self.config.pad_token_id)

    # -- feature encoder -------------------------------------------------------------------
    def _feature_encoder_stacked(self, xs: list[np.ndarray]) -> list[np.ndarray]:
        """All conv layers, unchunked, one `store.linear` per layer over all utterances' rows."""
        c = self.config
        for l, (k, s) in enumerate(zip(c.conv_kernel, c.conv_stride)):
            lengths = [(len(x) - k) // s + 1 for x in xs]
            # im2col straight into the stacked matrix: no per-utterance copies to concatenate
            cols = np.empty((sum(lengths), xs[0].shape[1] * k), dtype=np.float32)
            for x, r0, n in zip(xs, np.cumsum([0, *lengths[:-1]]), lengths):
                im2col(x, k, s, out=cols[r0 : r0 + n])
            del xs
            y = self.store.linear(f"feature_encoder.conv.{l}", cols)
            del cols
            xs = [self._norm_gelu(l, seg) for seg in _segments(y, lengths)]
            del y
        return xs

    def _norm_gelu(self, l: int, y: np.ndarray,
                   group_stats: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
        """Conv layer `l`'s norm and GELU on its `[T, C]` output, computed in place in `y`.

        `group_stats` (mean, 1/std per channel) are the group norm's statistics over the whole
        utterance, which a time chunk cannot compute by itself; None: from `y`.
        """
        norm = f"feature_encoder.norm.{l}"
        if self.config.feat_extract_norm == "layer":
            y = self._layer_norm(y, norm, CONV_NORM_EPS)
        elif l == 0:
            mean, inv_std = _channel_stats(y) if group_stats is None else group_stats
            # in place on the fresh conv output (the same float32 operations as out of place)
            y -= mean
            y *= inv_std * self.store.param(norm + ".weight")
            y += self.store.param(norm + ".bias")
        return gelu(y, out=y)

    def feature_encoder(self, audio: np.ndarray, chunk_frames: int | None = -1) -> np.ndarray:
        """Normalised waveform `[N]` -> conv features `[T, c_last]`, in time chunks.

        A chunk of output frames [t0, t1) depends exactly on samples
        [t0 * stride, (t1 - 1) * stride + receptive_field); since t0 * stride is a multiple of
        every layer's cumulative stride, each chunk reproduces the same frames as the unchunked
        pass (to float32 rounding). Group norm (base models) needs per-channel statistics of
        the whole first-layer output, which a chunk cannot see: `_first_layer_stats` derives
        them from the audio beforehand. Chunks run in parallel threads.

        Peak memory is set by the chunk, not the utterance: for 512 channels and
        `chunk_frames`=128, ~17 MB first-layer output, ~25 MB second-layer im2col and their
        norm/GELU temporaries per chunk in flight, against 0.66 GB unchunked for a 35 s
        utterance. `chunk_frames`: -1 the model's `chunk_frames`, None unchunked.
        """
        c = self.config
        if chunk_frames == -1:
            chunk_frames = self.chunk_frames
        audio = np.asarray(audio, dtype=np.float32)
        total = c.num_frames(len(audio))
        if chunk_frames is None or total <= chunk_frames:
            return self._feature_encoder_stacked([audio[:, None]])[0]
        stride, field = c.total_stride, c.receptive_field
        group_stats = self._first_layer_stats(audio) if c.feat_extract_norm == "group" else None
        out = np.empty((total, c.conv_dim[-1]), dtype=np.float32)

        def one_chunk(t0: int) -> None:
            t1 = min(t0 + chunk_frames, total)
            x = audio[t0 * stride : (t1 - 1) * stride + field, None]
            for l in range(len(c.conv_dim)):
                y = self.store.linear(f"feature_encoder.conv.{l}", im2col(x, c.conv_kernel[l], c.conv_stride[l]))
                x = self._norm_gelu(l, y, group_stats)
            out[t0:t1] = x

        # chunks are independent: one per thread (each chunk's memory, times the threads)
        parallel_map(one_chunk, range(0, total, chunk_frames), self._threads())
        return out

    def _first_layer_stats(self, audio: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel mean and 1/sqrt(var + eps) of the first conv layer's whole output,
        without computing that output (512 x 3200 floats per second of audio).

        The layer is linear in its im2col rows `x` (`[n, k]`, k = 10 samples): with m the mean
        row and S = x^T x / n (a k x k matrix), channel c's mean is w_c.m (+ bias) and its
        variance w_c^T S w_c - (w_c.m)^2, in float64 (the input is normalised to zero mean, so
        the difference does not cancel).
        """
        c = self.config
        name = "feature_encoder.conv.0"
        x = im2col(audio[:, None], c.conv_kernel[0], c.conv_stride[0]).astype(np.float64)
        m, gram = x.mean(axis=0), (x.T @ x) / len(x)
        w = np.asarray(self.store.matrix(name), dtype=np.float64)  # [channels, k], as the layer runs it
        mean = w @ m
        var = np.maximum(np.einsum("ck,kl,cl->c", w, gram, w) - mean**2, 0.0)
        if self.store.has(name + ".bias"):
            mean += self.store.param(name + ".bias")
        return mean.astype(np.float32), (1.0 / np.sqrt(var + CONV_NORM_EPS)).astype(np.float32)

    # -- transformer -----------------------------------------------------------------------
    def _encode(self, feats: np.ndarray, lengths: list[int]) -> np.ndarray:
        """Conv features of utterances stacked along rows `[sum(lengths), c_last]` -> logits."""
        c, st = self.config, self.store
        ln = self._layer_norm
        x = st.linear("feature_projection.proj", ln(feats, "feature_projection.ln"))
        x += self._pos_conv(x, lengths)
        if not c.do_stable_layer_norm:
            x = ln(x, "encoder.ln")
        for i in range(c.num_hidden_layers):
            p = f"encoder.blocks.{i}"
            if c.do_stable_layer_norm:
                x += self._attention(p + ".attn", i, ln(x, p + ".attn_ln"), lengths)
                x += self._mlp(p + ".mlp", ln(x, p + ".mlp_ln"))
            else:
                x = ln(x + self._attention(p + ".attn", i, x, lengths), p + ".attn_ln")
                x = ln(x + self._mlp(p + ".mlp", x), p + ".mlp_ln")
        if c.do_stable_layer_norm:
            x = ln(x, "encoder.ln")
        return st.linear("lm_head", x)

    def _layer_norm(self, x: np.ndarray, name: str, eps: float | None = None) -> np.ndarray:
        eps = self.config.layer_norm_eps if eps is None else eps
        return layer_norm(x, self.store.param(name + ".weight"), self.store.param(name + ".bias"), eps)

    def _pos_conv(self, x: np.ndarray, lengths: list[int]) -> np.ndarray:
        """Grouped conv (kernel K, padding K//2, last frame dropped for even K), then GELU."""
        c = self.config
        k, groups = c.num_conv_pos_embeddings, c.num_conv_pos_embedding_groups
        dg = c.hidden_size // groups
        padded = [np.pad(seg, ((k // 2, k // 2), (0, 0))) for seg in _segments(x, lengths)]
        out = np.empty_like(x)

        def one_group(g: int) -> None:
            cols = np.concatenate(
                [im2col(xp[:, g * dg : (g + 1) * dg], k, 1)[:n] for xp, n in zip(padded, lengths)], axis=0)
            out[:, g * dg : (g + 1) * dg] = self.store.linear(f"encoder.pos_conv.{g}", cols)

        parallel_map(one_group, range(groups), self._threads())
        return gelu(out, out=out, threads=self._threads())

    def _attention(self, name: str, layer: int, x: np.ndarray, lengths: list[int]) -> np.ndarray:
        """Block `layer`'s self-attention within each utterance (rows `lengths` of `x`), heads in threads."""
        c = self.config
        d, h = c.hidden_size, c.num_attention_heads
        qkv = self.store.linear(name + ".qkv", x)
        out = np.empty((x.shape[0], d), dtype=np.float32)
        for start, n in zip(np.cumsum([0, *lengths[:-1]]), lengths):
            seg = qkv[None, start : start + n]
            k, v = split_heads(seg[..., d : 2 * d], h), split_heads(seg[..., 2 * d :], h)
            out[start : start + n] = self.store.attention("encoder_self", layer, seg[..., :d], k, v, h,
                                                          threads=self._threads())[0]
        return self.store.linear(name + ".out", out)

    def _threads(self) -> int:
        return store_threads(self.store)

    def _mlp(self, name: str, x: np.ndarray) -> np.ndarray:
        hidden = self.store.linear(name + ".fc1", x)
        return self.store.linear(name + ".fc2", gelu(hidden, out=hidden, threads=self._threads()))


def store_threads(store: WeightStore) -> int:
    """Python threads the model spreads chunks, groups, heads and GELU spans over on `store`:
    one for a store with state in `linear` (device, counting, calibrating stores)."""
    return compute_threads() if getattr(store, "thread_safe", False) else 1


def _segments(x: np.ndarray, lengths: list[int]) -> list[np.ndarray]:
    return np.split(x, np.cumsum(lengths)[:-1], axis=0)


def _channel_stats(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """GroupNorm with one group per channel: mean and 1/std over time of `[T, C]`."""
    mean = y.mean(axis=0)
    var = np.square(y - mean).mean(axis=0)
    return mean, (1.0 / np.sqrt(var + np.float32(CONV_NORM_EPS))).astype(np.float32)


# -- memory on a device store -------------------------------------------------------------------


def logits_memory(config: Wav2Vec2Config, store: StreamingStore, audio_seconds: float,
                  chunk_frames: int | None = CHUNK_FRAMES, utterances: int = 1) -> WorkingMemory:
    """Working memory of `Wav2Vec2.logits` on one utterance of `audio_seconds` on a device store,
    while the caller holds the waveforms of `utterances` utterances (`transcribe` runs them one
    at a time, so nothing else adds up).

    Each phase counts what is alive at its own high-water mark in the code above as written,
    numpy's temporaries included. The feature encoder's memory is bounded by its chunk of
    `chunk_frames` frames (the model's `chunk_frames`; None: unchunked); everything after it
    grows with the utterance: the positional conv's im2col columns (`[frames, d / G * K]`,
    built and then concatenated, so twice) overtake the feature encoder's chunk at about
    17 s for the base and large configs. On a store without state in `linear` the model runs
    chunks, positional-conv groups and heads in threads: their memory is counted once per
    thread (an upper bound: threads need not peak together).
    """
    c = config
    threads = store_threads(store)
    cached = store.cached_layers()
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
        product, block = store.streamed_linear_bytes(name, rows_in)
        return 0, output + product, block, filled[name]

    def largest(*marks: Mark) -> Mark:
        return max(marks, key=sum)

    def plus(m: Mark, buffers: int = 0, activations: int = 0, times: int = 1) -> Mark:
        """`m` happening in `times` threads at once, on top of shared `buffers` and `activations`."""
        return buffers + times * m[0], activations + times * m[1], times * m[2], m[3]

    samples = int(round(audio_seconds * Wav2Vec2.sample_rate))
    t = c.num_frames(samples)
    audio = F32 * samples * utterances  # the caller's waveforms, alive throughout
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
        scores = per_thread * score_block_bytes(t, t)
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

    return WorkingMemory(phases={
        name: MemoryPhase(buffers_bytes=buffers, activations_bytes=activations, weight_block_bytes=block, cache_bytes=cache)
        for name, (buffers, activations, block, cache) in phases.items()
    })


def lean_logits_memory(config: Wav2Vec2Config, audio_seconds: float, activation_bytes: float,
                       chunk_frames: int | None = CHUNK_FRAMES) -> WorkingMemory:
    """What a lean embedded runtime holds for `Wav2Vec2.logits` of `audio_seconds` of audio, phase
    by phase (the same arithmetic, scheduled to keep only what the next step needs; see
    `qbench.models.whisper.lean_transcribe_memory` for the rules): 16-bit PCM of the utterance,
    the feature encoder one chunk of `chunk_frames` frames at a time with each conv's input
    stored at `activation_bytes` per value and its output accumulating in float32, the
    features stored for the feature projection, then the transformer: a float32 residual, the
    positional conv's stored input, attention head by head, the MLP one token at a time, and the
    CTC logits."""
    c = config
    a = activation_bytes
    token_scale = F32 if a < F32 else 0
    stored = lambda rows, width: int(a * rows * width) + token_scale * rows  # noqa: E731
    samples = int(round(audio_seconds * Wav2Vec2.sample_rate))
    t = c.num_frames(samples)
    pcm = 2 * samples
    if t == 0:
        return WorkingMemory(phases={"normalize": MemoryPhase(buffers_bytes=pcm)})
    frames = t if chunk_frames is None else min(t, chunk_frames)
    n = (frames - 1) * c.total_stride + c.receptive_field
    conv_peak, c_in = 0, 1
    for c_out, k, st in zip(c.conv_dim, c.conv_kernel, c.conv_stride):
        n_out = (n - k) // st + 1
        conv_peak = max(conv_peak, stored(n, c_in) + F32 * n_out * c_out)
        n, c_in = n_out, c_out
    d, heads, ff = c.hidden_size, c.num_attention_heads, c.intermediate_size
    features = stored(t, c.conv_dim[-1])
    x = F32 * t * d

    def phase(buffers: int, activations: int) -> MemoryPhase:
        return MemoryPhase(buffers_bytes=buffers, activations_bytes=activations)

    return WorkingMemory(phases={
        "feature-encoder": phase(pcm, features + conv_peak),
        "feature-projection": phase(pcm, features + x),
        "positional-conv": phase(pcm, x + stored(t, d) + F32 * t * d),
        "attention": phase(pcm, x + stored(t, d) + 3 * F32 * t * (d // heads) + F32 * t + x),
        "mlp": phase(pcm, x + F32 * d + F32 * ff + stored(1, ff)),
        "ctc-head": phase(pcm, x + F32 * t * c.vocab_size),
    })
