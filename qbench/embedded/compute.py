"""Counting the arithmetic a run really does: multiply-accumulates per layer type, bit operations.

`ComputeCountingStore` wraps the store a model runs on. Every weight matmul goes through
`linear`, so its MACs are `rows x in x out` from the shapes actually passed (finished rows that
left the decoding batch are not counted, decode steps are counted as they happen). Attention's
score and value products touch no weight; the models run them through `store.attention`, so
they are counted from the query and key shapes the kernel receives, and the calls of the first
layer count the encoder's inputs and the decoder's steps.

Bit operations are MACs x weight bits x activation bits (float32 activations: 32 bits; weights
at their stored code width, or 16/32 for float layers). Ternary weights need no multiplication:
their MACs become additions, and the zero codes skip work altogether (counted from the codes).

A packed layer that declares extra parts runs them around its product, and each is counted on
its own: dividing the input by per-channel scales (`input_scale_muls`, one multiply per input
value with the reciprocals stored), the block-Hadamard transform (`transform_additions`, the
fast transform's additions/subtractions; its 1/sqrt(b) is folded into the scales on a device),
and a low-rank correction (`lowrank_macs`, `rows x r x (in + out)` float MACs).
"""

from __future__ import annotations

import math
import threading
from collections import defaultdict
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field

from qbench.models.attention import AttentionKind
from qbench.models.weight_store import WeightStore
from qbench.quant.hadamard import transform_additions

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
    input_scale_muls: int = Field(0, description="layer inputs divided by per-channel scales (AWQ), one multiply each")
    transform_additions: int = Field(0, description="additions of the fast block-Hadamard transforms of layer inputs")
    lowrank_macs: int = Field(0, description="float MACs of low-rank corrections, (x V^T) U^T")
    encoder_windows: int = Field(0, description="encoder inputs: Whisper's 30 s windows, wav2vec2's utterances")
    decode_steps: int = Field(0, description="decoder calls (the prompt counts as one)")
    decoded_token_rows: int = Field(0, description="sum over decoder calls of batch rows x new tokens")
    wall_seconds: float = 0.0
    macs_per_second: float = 0.0


class ComputeCountingStore:
    """Delegates everything to `inner` and counts the work of each `linear` and `attention` call.

    As safe to call from several threads as `inner` is: the counts are added under a lock.
    """

    def __init__(self, inner: WeightStore):
        self.inner = inner
        self.thread_safe = bool(getattr(inner, "thread_safe", False))
        self._lock = threading.Lock()
        self.linear_macs: dict[str, int] = defaultdict(int)
        self.linear_bit_ops: dict[str, int] = defaultdict(int)
        self.linear_macs_by_layer: dict[str, int] = defaultdict(int)
        self.attention_macs: dict[str, int] = defaultdict(int)
        self.ternary_macs = 0
        self.ternary_additions = 0
        self.input_scale_muls = 0
        self.transform_additions = 0
        self.lowrank_macs = 0
        self._lowrank_bit_ops = 0
        self.encoder_windows = 0
        self.decode_steps = 0
        self.decoded_token_rows = 0
        self.wall_seconds = 0.0
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

    def linear(self, name: str, x: np.ndarray) -> np.ndarray:
        info = self.inner.infos[name]
        rows = int(np.prod(x.shape[:-1]))
        macs = rows * info.shape[0] * info.shape[1]
        kind = layer_kind(name, info.kind)
        with self._lock:
            bits = self._bits_of(name)
            self.linear_macs[kind] += macs
            self.linear_macs_by_layer[name] += macs
            self.linear_bit_ops[kind] += int(round(macs * bits * ACTIVATION_BITS))
            if name in self._nonzero:
                self.ternary_macs += macs
                self.ternary_additions += int(round(macs * self._nonzero[name]))
            pt = (getattr(self.inner, "packed", None) or {}).get(name)
            if pt is not None:
                out_f, in_f = info.shape
                if pt.input_scales is not None:
                    self.input_scale_muls += rows * in_f
                if pt.hadamard_signs is not None:
                    self.transform_additions += transform_additions(rows, in_f)
                if pt.lowrank_u is not None:
                    lr_macs = rows * pt.lowrank_rank * (in_f + out_f)
                    self.lowrank_macs += lr_macs
                    self._lowrank_bit_ops += lr_macs * pt.lowrank_u.dtype.itemsize * 8 * ACTIVATION_BITS
        return self.inner.linear(name, x)

    def attention(self, kind: AttentionKind, layer: int, q: np.ndarray, k: np.ndarray, v: np.ndarray, n_head: int,
                  causal_offset: int | None = None, threads: int = 1) -> np.ndarray:
        b, tq, d = q.shape
        with self._lock:
            # q.k and scores.v: every query row against every key row, over all heads' d channels
            self.attention_macs[kind] += 2 * b * tq * k.shape[2] * d
            if layer == 0 and kind == "encoder_self":
                self.encoder_windows += b
            elif layer == 0 and kind == "decoder_self":
                self.decode_steps += 1
                self.decoded_token_rows += b * tq
        return self.inner.attention(kind, layer, q, k, v, n_head, causal_offset, threads)

    def report(self) -> ComputeReport:
        linear = {k: KindCount(macs=self.linear_macs[k], bit_ops=self.linear_bit_ops[k]) for k in sorted(self.linear_macs)}
        attention = dict(self.attention_macs)
        total_macs = sum(self.linear_macs.values()) + sum(attention.values()) + self.lowrank_macs
        # attention multiplies two float32 activations
        bit_ops = (sum(self.linear_bit_ops.values()) + sum(attention.values()) * ACTIVATION_BITS * ACTIVATION_BITS
                   + self._lowrank_bit_ops)
        return ComputeReport(
            linear=linear, attention_macs=attention, total_macs=total_macs, total_bit_ops=bit_ops,
            ternary_macs=self.ternary_macs, ternary_additions=self.ternary_additions,
            input_scale_muls=self.input_scale_muls, transform_additions=self.transform_additions,
            lowrank_macs=self.lowrank_macs,
            encoder_windows=self.encoder_windows, decode_steps=self.decode_steps,
            decoded_token_rows=self.decoded_token_rows, wall_seconds=self.wall_seconds,
            macs_per_second=total_macs / self.wall_seconds if self.wall_seconds else 0.0,
        )

