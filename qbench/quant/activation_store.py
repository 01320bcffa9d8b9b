"""Running a model with quantized activations: the store every linear and attention goes through.

`ActivationQuantizingStore` wraps the store a model runs on (packed, or a device's) and, for
every `linear`, quantizes the layer's input by the run's scheme (after the layer's own input
transform, AWQ's scales or QuIP's rotation, as a kernel would) and multiplies:

* a layer on a uniform grid (RTN, GPTQ, HQQ, AWQ, QuIP, ternary): integer activations times
  integer codes, accumulated exactly (`qbench.quant.integer_matmul`), then rescaled;
* a codebook layer (NF4, SqueezeLLM, QuIP#'s vector codebooks) or a float one: the dequantized
  activations times the float32 weights, as a lookup-table or float kernel would.

A low-rank correction and the bias stay float. With `attention`, every attention runs on
quantized Q, K, V and probabilities (`qbench.quant.integer_attention`). With `kv_cache`, the keys and values the decoder
attends to (its own, and the cross-attention's encoder keys/values computed once per
utterance) are stored quantized, symmetric absmax per token and head at the scheme's bits,
as the model writes them into its cache (`kv_cache_value`); attention reads them as stored.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from qbench.models.attention import AttentionKind
from qbench.models.weight_store import WeightStore
from qbench.quant.activation_scheme import (
    ActivationRecord,
    ActivationScheme,
    quantize_activations,
)
from qbench.quant.integer_attention import integer_attention
from qbench.quant.integer_matmul import (
    IntegerWeights,
    integer_linear,
    integer_weights,
    runs_on_integers,
)


def kv_scheme(record: ActivationRecord) -> ActivationScheme:
    """How cached keys/values are stored: the scheme's bits, symmetric, per token (and head)."""
    return ActivationScheme(bits=record.scheme.bits, granularity="token", symmetric=True,
                            rounding=record.scheme.rounding, dynamic=True)


class ActivationQuantizingStore:
    """Delegates to `inner`, running every `linear` on quantized activations (see the module)."""

    def __init__(self, inner: WeightStore, record: ActivationRecord):
        self.inner = inner
        self.record = record
        self.scheme = record.scheme
        self.thread_safe = bool(getattr(inner, "thread_safe", False))
        self._static = record.static_scales or {}
        self._integer: dict[str, IntegerWeights] = {}
        self._float_t: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()
        self._kv = kv_scheme(record) if record.kv_cache else None

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.inner, attr)

    @property
    def activation_bits(self) -> int:
        return self.scheme.bits

    def runs_on_integers(self, name: str) -> bool:
        return runs_on_integers((getattr(self.inner, "packed", None) or {}).get(name))

    def _once(self, cache: dict[str, Any], name: str, build: Callable[[], Any]) -> Any:
        """`cache[name]`, built under the lock the first time (encoder windows run in threads)."""
        value = cache.get(name)
        if value is None:
            with self._lock:
                value = cache.get(name)
                if value is None:
                    value = cache[name] = build()
        return value

    def _weights(self, name: str) -> IntegerWeights:
        return self._once(self._integer, name, lambda: integer_weights(self.inner.packed[name]))

    def _float_weights_t(self, name: str) -> np.ndarray:
        """The float32 right-hand side of a codebook or float layer, made once: the emulation
        keeps it (a device reads the stored weights in place, which the lean memory model
        counts), where a device store without room would rebuild a 51864-row embedding on
        every decoder step."""
        return self._once(self._float_t, name, lambda: np.ascontiguousarray(self.inner.matrix_t(name)))

    def linear(self, name: str, x: np.ndarray) -> np.ndarray:
        pt = (getattr(self.inner, "packed", None) or {}).get(name)
        x_in = pt.transform_input(x) if pt is not None and pt.transforms_input else np.asarray(x, dtype=np.float32)
        if not self.scheme.dynamic and name not in self._static:
            raise KeyError(f"no static activation scale for {name}")
        a, s = quantize_activations(x_in, self.scheme, self._static.get(name))
        if runs_on_integers(pt):
            y = integer_linear(a, s, self._weights(name), self.scheme.max_operand)
        else:
            y = (a * s) @ self._float_weights_t(name)
        if pt is not None and pt.lowrank_u is not None:
            y += pt.lowrank_product(x)
        bias_name = name + ".bias"
        if bias_name in self.inner.params:
            y += self.inner.param(bias_name)
        return y

    @property
    def quantizes_attention(self) -> bool:
        return self.record.attention

    def attention(self, kind: AttentionKind, layer: int, q: np.ndarray, k: np.ndarray, v: np.ndarray, n_head: int,
                  causal_offset: int | None = None, threads: int = 1) -> np.ndarray:
        """The inner store's attention, or with `attention` every product on quantized operands
        (`qbench.quant.integer_attention`)."""
        if not self.record.attention:
            return self.inner.attention(kind, layer, q, k, v, n_head, causal_offset, threads)
        return integer_attention(q, k, v, n_head, self.scheme, causal_offset, threads)

    def kv_cache_value(self, kind: AttentionKind, layer: int, x: np.ndarray) -> np.ndarray:
        """New keys or values `[b, heads, t, dh]` as the cache stores them: quantized per token
        and head with `kv_cache`, else as the inner store stores them."""
        x = self.inner.kv_cache_value(kind, layer, x)
        if self._kv is None:
            return x
        a, s = quantize_activations(x, self._kv)
        return a * s
