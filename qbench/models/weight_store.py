"""The one place a model's parameters live and every weight matmul goes through.

Both numpy models (Whisper, wav2vec 2.0) call `store.linear(name, x)` for every linear layer
and for every convolution (after im2col), and `store.param(name)` for everything else (norms,
biases, positional tables). That single choke point is what lets the harness swap in quantized
or packed weights, capture calibration inputs, or account memory, without the model code
knowing: a subclass overrides `matrix()` or `linear()`. Attention, the one product of two
activations, goes through `store.attention` for the same reason: a store that counts a run's
arithmetic sees its shapes.

Weight matrices are always seen as 2-D `[out_features, in_features]`. A conv1d weight
`[out, in, k]` is seen as `[out, in * k]` (input-channel major, kernel minor), which is what the
models' im2col produces, so a quantizer's "input channel" groups are contiguous in memory.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np

# the module, not the function: looked up on every call, so that a profiler can wrap the kernel
from qbench.models import attention as attention_kernel
from qbench.models.attention import AttentionKind

WeightKind = Literal["linear", "conv", "embedding"]


@dataclass(frozen=True)
class WeightInfo:
    """A quantizable weight matrix: its name (without `.weight`), 2-D shape and kind."""

    name: str
    shape: tuple[int, int]
    kind: WeightKind

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]


class WeightStore:
    """Float parameters keyed by name; `linear` computes `x @ W.T + b` for a named layer.

    `params` maps full names (`encoder.blocks.0.attn.qkv.weight`) to arrays of any float dtype;
    they are kept as given (float16 stays float16 at rest) and upcast to float32 when used.
    `matrices` lists the weights that act as matrices (linear, conv, optionally embeddings);
    their transposed float32 copies are made once at construction because every matmul wants
    `x @ W.T` with a contiguous right-hand side.
    """

    #: `linear` may run from several threads at once (the Whisper encoder runs windows in
    #: parallel). The lazily filled caches here only ever gain identical entries, so a race is
    #: harmless; a subclass that counts, records or evicts in `linear` sets this False.
    thread_safe: ClassVar[bool] = True

    def __init__(self, params: Mapping[str, np.ndarray], matrices: Iterable[WeightInfo]):
        self.params: dict[str, np.ndarray] = dict(params)
        self.infos: dict[str, WeightInfo] = {info.name: info for info in matrices}
        for info in self.infos.values():
            w = self.params[info.name + ".weight"]
            if int(np.prod(w.shape[1:])) != info.shape[1] or w.shape[0] != info.shape[0]:
                raise ValueError(f"{info.name}: weight shape {w.shape} does not match {info.shape}")
        self._param_cache: dict[str, np.ndarray] = {}
        self._wt_cache: dict[str, np.ndarray] = {}

    @contextmanager
    def counting_rows(self, mask: np.ndarray | None) -> Iterator[None]:
        """Within this block, only the rows where `mask` (the leading axes of every `linear`
        input, e.g. `[windows, positions]`) is True are calibration data; None: every row.

        A model's calibration pass says so around computation on padded rows (Whisper's
        decoder past end of text), which inference never feeds a layer. Only stores that
        gather calibration statistics act on it; a plain store computes every row the same.
        """
        yield

    # -- parameters that are not quantized ---------------------------------------------------
    def param(self, name: str) -> np.ndarray:
        """A non-matrix parameter (norm gain, bias, positional table) as float32."""
        cached = self._param_cache.get(name)
        if cached is None:
            cached = np.ascontiguousarray(self.params[name], dtype=np.float32)
            self._param_cache[name] = cached
        return cached

    def has(self, name: str) -> bool:
        return name in self.params

    # -- weight matrices -------------------------------------------------------------------
    def matrix(self, name: str) -> np.ndarray:
        """The 2-D float32 weight `[out, in]` of a layer (conv kernels flattened)."""
        w = self.params[name + ".weight"]
        return np.asarray(w, dtype=np.float32).reshape(w.shape[0], -1)

    def matrix_t(self, name: str) -> np.ndarray:
        """`matrix(name).T`, contiguous, cached: the right-hand side of every matmul."""
        wt = self._wt_cache.get(name)
        if wt is None:
            wt = np.ascontiguousarray(self.matrix(name).T)
            self._wt_cache[name] = wt
        return wt

    def linear(self, name: str, x: np.ndarray) -> np.ndarray:
        """`x @ W.T + b` over the last axis of `x`; `b` only if `<name>.bias` exists."""
        wt = self.matrix_t(name)
        # One 2-D GEMM over all leading axes: numpy's matmul of a stacked `[B, T, in]` runs one
        # GEMM per batch row, and with T == 1 (a decoder step) that is B matrix-vector
        # products each streaming the whole weight from memory (B x slower for B rows).
        y = np.matmul(x.reshape(-1, x.shape[-1]), wt).reshape(*x.shape[:-1], wt.shape[1])
        bias_name = name + ".bias"
        if bias_name in self.params:
            y += self.param(bias_name)
        return y

    def attention(self, kind: AttentionKind, layer: int, q: np.ndarray, k: np.ndarray, v: np.ndarray, n_head: int,
                  causal_offset: int | None = None, threads: int = 1) -> np.ndarray:
        """`qbench.models.attention.attention(q, k, v, n_head, causal_offset, threads)`: block
        `layer`'s `kind` attention. It touches no weight; a subclass overrides it to observe."""
        return attention_kernel.attention(q, k, v, n_head, causal_offset, threads)

    def kv_cache_value(self, kind: AttentionKind, layer: int, x: np.ndarray) -> np.ndarray:
        """What the decoder's KV cache stores for new keys or values `x` `[b, heads, t, dh]` of
        block `layer`'s `kind` attention: `x` itself (float32). A store that runs with a
        quantized KV cache returns them as stored (quantized, in float32 values)."""
        return x

    def embedding(self, name: str, ids: np.ndarray) -> np.ndarray:
        """Rows of an embedding table, float32."""
        return np.asarray(self.params[name + ".weight"][ids], dtype=np.float32)

    # -- bookkeeping -----------------------------------------------------------------------
    def weight_infos(self) -> list[WeightInfo]:
        """Matrix weights in the order the model first uses them."""
        return list(self.infos.values())

    def stored_bytes(self) -> int:
        """Bytes of every parameter at its stored precision (the real buffers' nbytes)."""
        return int(sum(np.asarray(p).nbytes for p in self.params.values()))
