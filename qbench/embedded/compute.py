"""Counting the arithmetic a run really does: multiply-accumulates per layer type, bit operations.

`ComputeCountingStore` wraps the store a model runs on. Every weight matmul goes through
`linear`, so its MACs are `rows x in x out` from the shapes actually passed (finished rows that
left the decoding batch are not counted, decode steps are counted as they happen). Attention's
score and value products touch no weight; the models run them through `store.attention`, so
they are counted from the query and key shapes the kernel receives, and the calls of the first
layer count the encoder's inputs and the decoder's steps.

Bit operations are MACs x weight bits x activation bits (float32 activations: 32 bits; weights
at their stored code width, a vector codebook's code width over the `vector_dim` weights each
code stands for, or 16/32 for float layers). Ternary weights need no multiplication:
their MACs become additions, and the zero codes skip work altogether (counted from the codes).

A packed layer that declares extra parts runs them around its product, and each is counted on
its own: dividing the input by per-channel scales (`input_scale_muls`, one multiply per input
value with the reciprocals stored), the block-Hadamard transform (`transform_additions`, the
fast transform's additions/subtractions; its 1/sqrt(b) is folded into the scales on a device),
and a low-rank correction (`lowrank_macs`, `rows x r x (in + out)` float MACs).

`operations` splits the same work by what the hardware does, from the operand widths: with
float32 activations every product is an `fp32_mac` (a weight-only quantized layer is
dequantized to float first); with an activation scheme (`qbench.quant.activation_store`) a
uniform-grid layer is `int<a>xint<w>_mac` (or `int<a>xternary_add`, counted per nonzero weight)
plus one `fp32_rescale` per output and group, a codebook layer (scalar or vector: it has no
integer codes to multiply, a lookup-table kernel reads its values) or a float one is `int<a>xfp16_mac`,
and quantizing each input value is one `act_quantize`. `arithmetic_energy_pj` prices them with
`ENERGY_PJ`.
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

#: Energy per operation, picojoules, 45 nm at 0.9 V: M. Horowitz, "Computing's energy problem
#: (and what we can do about it)", ISSCC 2014, Figure 1.1.9 (the table BitNet b1.58's energy
#: estimates build on). Integer add 8/32 bit: 0.03 / 0.1; integer multiply 8/32 bit: 0.2 / 3.1;
#: float add 16/32 bit: 0.4 / 0.9; float multiply 16/32 bit: 1.1 / 3.7. A MAC is a multiply plus
#: an add into its accumulator (int32 for integer products); the table has no multiplier below
#: 8 bits, so int4 or int2 products are priced as int8 ones (an upper bound). Memory traffic
#: (an 8 KB cache read is 10 pJ per 64 bits, DRAM 1.3-2.6 nJ) is not included.
ENERGY_PJ: dict[str, float] = {
    "fp32_mac": 3.7 + 0.9,
    "fp16_mac": 1.1 + 0.4,
    "int_mac": 0.2 + 0.1,
    "ternary_add": 0.1,
    "fp32_rescale": 3.7 + 0.9,
    "act_quantize": 3.7,
    "fp32_mul": 3.7,
    "fp32_add": 0.9,
}
ENERGY_SOURCE = "Horowitz, ISSCC 2014, 45 nm (arithmetic only)"


def operation_energy_pj(op: str) -> float:
    """The price of one operation named as `ComputeReport.operations` names them."""
    if op.endswith("xternary_add"):
        return ENERGY_PJ["ternary_add"]
    if op.endswith("xfp16_mac"):
        return ENERGY_PJ["fp16_mac"]
    if op.startswith("int") and op.endswith("_mac"):
        return ENERGY_PJ["int_mac"]
    return ENERGY_PJ[op]


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
    attention_bits: int = Field(ACTIVATION_BITS, description="operand bits of the attention products: float32 unless "
                                                             "the run quantizes attention")
    #: MACs whose weight is ternary: done as additions/subtractions, no multiplier
    ternary_macs: int = 0
    #: of those, the ones with a nonzero code (zero codes skip the work)
    ternary_additions: int = 0
    input_scale_muls: int = Field(0, description="layer inputs divided by per-channel scales (AWQ), one multiply each")
    transform_additions: int = Field(0, description="additions of the fast block-Hadamard transforms of layer inputs")
    lowrank_macs: int = Field(0, description="float MACs of low-rank corrections, (x V^T) U^T")
    operations: dict[str, int] = Field(default_factory=dict, description="the work by operand widths: fp32_mac, "
                                       "int8xint4_mac, int8xternary_add (nonzero weights), int8xfp16_mac, fp32_rescale, "
                                       "act_quantize, fp32_mul, fp32_add")
    arithmetic_energy_pj: float = Field(0.0, description=f"sum of operations x ENERGY_PJ ({ENERGY_SOURCE})")
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
        self.operations: dict[str, float] = defaultdict(float)
        self._act_bits = getattr(inner, "activation_bits", None)
        self._quantized_attention = bool(getattr(inner, "quantizes_attention", False))

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
                # a vector code spans vector_dim weights: 8-bit D4 codes are 2 bits per weight
                bits = pt.code_bits / pt.vector_dim
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
            self.linear_bit_ops[kind] += int(round(macs * bits * (self._act_bits or ACTIVATION_BITS)))
            if name in self._nonzero:
                self.ternary_macs += macs
                self.ternary_additions += int(round(macs * self._nonzero[name]))
            pt = (getattr(self.inner, "packed", None) or {}).get(name)
            self._count_operations(name, pt, rows, macs)
            if pt is not None:
                out_f, in_f = info.shape
                if pt.input_scales is not None:
                    self.input_scale_muls += rows * in_f
                    self.operations["fp32_mul"] += rows * in_f
                if pt.hadamard_signs is not None:
                    additions = transform_additions(rows, in_f)
                    self.transform_additions += additions
                    self.operations["fp32_add"] += additions
                if pt.lowrank_u is not None:
                    lr_macs = rows * pt.lowrank_rank * (in_f + out_f)
                    self.lowrank_macs += lr_macs
                    self.operations["fp32_mac"] += lr_macs
                    self._lowrank_bit_ops += lr_macs * pt.lowrank_u.dtype.itemsize * 8 * ACTIVATION_BITS
        return self.inner.linear(name, x)

    def _count_operations(self, name: str, pt: Any, rows: int, macs: int) -> None:
        """`operations` of one linear call (under the lock)."""
        a = self._act_bits
        if a is None:
            self.operations["fp32_mac"] += macs
            return
        out_f, in_f = self.inner.infos[name].shape
        self.operations["act_quantize"] += rows * in_f
        if pt is None or pt.codebook is not None:
            self.operations[f"int{a}xfp16_mac"] += macs
            return
        if pt.packing == "trit5":
            self.operations[f"int{a}xternary_add"] += macs * self._nonzero[name]
        else:
            self.operations[f"int{a}xint{pt.code_bits}_mac"] += macs
        groups = 1 if pt.group_size is None or pt.scales.shape[1] == 1 else -(-in_f // pt.group_size)
        self.operations["fp32_rescale"] += rows * out_f * groups

    def attention(self, kind: AttentionKind, layer: int, q: np.ndarray, k: np.ndarray, v: np.ndarray, n_head: int,
                  causal_offset: int | None = None, threads: int = 1) -> np.ndarray:
        b, tq, d = q.shape
        with self._lock:
            # q.k and scores.v: every query row against every key row, over all heads' d channels
            self.attention_macs[kind] += 2 * b * tq * k.shape[2] * d
            if self._quantized_attention:
                # q.k on integer codes; the probabilities' codes times the values as stored
                a = self._act_bits
                self.operations[f"int{a}xint{a}_mac"] += b * tq * k.shape[2] * d
                self.operations[f"int{a}xfp16_mac"] += b * tq * k.shape[2] * d
                self.operations["act_quantize"] += q.size + k.size + v.size
            else:
                self.operations["fp32_mac"] += 2 * b * tq * k.shape[2] * d
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
        attention_bits = self._act_bits if self._quantized_attention and self._act_bits else ACTIVATION_BITS
        bit_ops = (sum(self.linear_bit_ops.values()) + sum(attention.values()) * attention_bits * attention_bits
                   + self._lowrank_bit_ops)
        operations = {op: int(round(n)) for op, n in sorted(self.operations.items())}
        return ComputeReport(
            operations=operations,
            arithmetic_energy_pj=float(sum(n * operation_energy_pj(op) for op, n in operations.items())),
            activation_bits=self._act_bits or ACTIVATION_BITS, attention_bits=attention_bits,
            linear=linear, attention_macs=attention, total_macs=total_macs, total_bit_ops=bit_ops,
            ternary_macs=self.ternary_macs, ternary_additions=self.ternary_additions,
            input_scale_muls=self.input_scale_muls, transform_additions=self.transform_additions,
            lowrank_macs=self.lowrank_macs,
            encoder_windows=self.encoder_windows, decode_steps=self.decode_steps,
            decoded_token_rows=self.decoded_token_rows, wall_seconds=self.wall_seconds,
            macs_per_second=total_macs / self.wall_seconds if self.wall_seconds else 0.0,
        )

