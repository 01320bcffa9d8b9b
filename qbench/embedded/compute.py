"""Counting the arithmetic a run really does: multiply-accumulates per layer type, bit operations.

`ComputeCountingStore` wraps the store a model runs on. Every weight matmul goes through
`linear`, so its MACs are `rows x in x out` from the shapes actually passed (finished rows that
left the decoding batch are not counted, decode steps are counted as they happen). Attention's
score and value products do not touch a weight; they are derived from the same calls: the
fused q/k/v projection of a self-attention block gives the batch, the new tokens and (through a
per-layer position counter reset when the decoder starts) how many keys they attend to.

Bit operations are MACs x weight bits x activation bits (float32 activations: 32 bits; weights
at their stored code width, or 16/32 for float layers). Ternary weights need no multiplication:
their MACs become additions, and the zero codes skip work altogether (counted from the codes).
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field

from qbench.models.weight_store import WeightStore

LayerKind = Literal["conv", "attention_projection", "mlp", "output_projection", "other"]
ACTIVATION_BITS = 32


def layer_kind(name: str, weight_kind: str) -> LayerKind:
    """Which bucket a weight matrix's MACs go in, from its kind and canonical name."""
    if weight_kind == "conv":
        return "conv"
    if name in ("decoder.token_embedding", "lm_head"):
        return "output_projection"
    if ".attn." in name or ".cross_attn." in name:
        return "attention_projection"
    if ".mlp." in name:
        return "mlp"
    return "other"


class KindCount(BaseModel):
    macs: int = 0
    bit_ops: int = 0


class ComputeReport(BaseModel):
    """The arithmetic of a run, next to the wall time it took on this machine."""

    linear: dict[str, KindCount] = Field(description="weight matmuls by layer kind")
    attention_macs: dict[str, int] = Field(description="q.k and scores.v products: encoder_self, decoder_self, cross")
    total_macs: int
    total_bit_ops: int
    activation_bits: int = ACTIVATION_BITS
    #: MACs whose weight is ternary: done as additions/subtractions, no multiplier
    ternary_macs: int = 0
    #: of those, the ones with a nonzero code (zero codes skip the work)
    ternary_additions: int = 0
    encoder_windows: int = 0
    decode_steps: int = Field(0, description="decoder calls (the prompt counts as one)")
    decoded_token_rows: int = Field(0, description="sum over decoder calls of batch rows x new tokens")
    wall_seconds: float = 0.0
    macs_per_second: float = 0.0


class ComputeCountingStore:
    """Delegates everything to `inner` and counts the work of each `linear` call."""

    thread_safe = False  # the counters are plain `+=`

    def __init__(self, inner: WeightStore):
        self.inner = inner
        self.linear_macs: dict[str, int] = defaultdict(int)
        self.linear_bit_ops: dict[str, int] = defaultdict(int)
        self.linear_macs_by_layer: dict[str, int] = defaultdict(int)
        self.attention_macs: dict[str, int] = defaultdict(int)
        self.ternary_macs = 0
        self.ternary_additions = 0
        self.encoder_windows = 0
        self.decode_steps = 0
        self.decoded_token_rows = 0
        self.wall_seconds = 0.0
        self._positions: dict[str, int] = {}
        self._audio_ctx: dict[str, int] = {}
        self._weight_bits: dict[str, float] = {}
        self._nonzero: dict[str, float] = {}

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.inner, attr)

    def _bits_of(self, name: str) -> float:
        bits = self._weight_bits.get(name)
        if bits is None:
            pt = (getattr(self.inner, "packed", None) or {}).get(name)
            if pt is None:
                # stored precision, but never above the float32 the matmul runs in
                bits = float(min(32, np.asarray(self.inner.params[name + ".weight"]).dtype.itemsize * 8))
            elif pt.packing == "trit5":
                bits = math.log2(3)  # information per ternary weight; the packing stores 1.6 bits
                codes = pt._codes_range(0, pt.numel)
                self._nonzero[name] = float(np.count_nonzero(codes)) / codes.size
            else:
                bits = float(pt.code_bits)
            self._weight_bits[name] = bits
        return bits

    def _attention(self, name: str, x: np.ndarray) -> None:
        d = x.shape[-1]
        if name.startswith("encoder.blocks.") and name.endswith(".attn.qkv") and x.ndim == 3:
            b, t = x.shape[0], x.shape[1]
            self.attention_macs["encoder_self"] += 2 * b * t * t * d
            if name == "encoder.blocks.0.attn.qkv":
                self.encoder_windows += b
        elif name.startswith("encoder.blocks.") and name.endswith(".attn.qkv") and x.ndim == 2:
            # wav2vec 2.0 runs `[frames, d]` rows, one utterance per call when transcribing
            # (calibration stacks utterances; it is not counted)
            t = x.shape[0]
            self.attention_macs["encoder_self"] += 2 * t * t * d
        elif name.startswith("decoder.blocks."):
            layer = name.split(".")[2]
            if name.endswith(".cross_attn.kv"):
                self._positions[layer] = 0
                self._audio_ctx[layer] = x.shape[-2]
            elif name.endswith(".attn.qkv"):
                rows = int(np.prod(x.shape[:-2]))
                t = x.shape[-2]
                offset = self._positions.get(layer, 0)
                # scores are computed against every cached key up to the last new token
                self.attention_macs["decoder_self"] += 2 * rows * t * (offset + t) * d
                self._positions[layer] = offset + t
                if layer == "0":
                    self.decode_steps += 1
                    self.decoded_token_rows += rows * t
            elif name.endswith(".cross_attn.q"):
                rows = int(np.prod(x.shape[:-1]))
                self.attention_macs["cross"] += 2 * rows * self._audio_ctx.get(layer, 0) * d

    def linear(self, name: str, x: np.ndarray) -> np.ndarray:
        info = self.inner.infos[name]
        rows = int(np.prod(x.shape[:-1]))
        macs = rows * info.shape[0] * info.shape[1]
        kind = layer_kind(name, info.kind)
        bits = self._bits_of(name)
        self.linear_macs[kind] += macs
        self.linear_macs_by_layer[name] += macs
        self.linear_bit_ops[kind] += int(round(macs * bits * ACTIVATION_BITS))
        if name in self._nonzero:
            self.ternary_macs += macs
            self.ternary_additions += int(round(macs * self._nonzero[name]))
        self._attention(name, x)
        return self.inner.linear(name, x)

    def report(self) -> ComputeReport:
        linear = {k: KindCount(macs=self.linear_macs[k], bit_ops=self.linear_bit_ops[k]) for k in sorted(self.linear_macs)}
        attention = dict(self.attention_macs)
        total_macs = sum(self.linear_macs.values()) + sum(attention.values())
        # attention multiplies two float32 activations
        bit_ops = sum(self.linear_bit_ops.values()) + sum(attention.values()) * ACTIVATION_BITS * ACTIVATION_BITS
        return ComputeReport(
            linear=linear, attention_macs=attention, total_macs=total_macs, total_bit_ops=bit_ops,
            ternary_macs=self.ternary_macs, ternary_additions=self.ternary_additions,
            encoder_windows=self.encoder_windows, decode_steps=self.decode_steps,
            decoded_token_rows=self.decoded_token_rows, wall_seconds=self.wall_seconds,
            macs_per_second=total_macs / self.wall_seconds if self.wall_seconds else 0.0,
        )

