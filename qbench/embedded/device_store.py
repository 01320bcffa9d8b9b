"""The weight store a run on an emulated device uses, and what it says about its own memory.

Packed (or stored-precision) weights are turned into float32 one row block at a time when a
layer runs and released afterwards, unless the device budget leaves room for a cache of whole
float matrices (`cache_bytes`). The models' memory models ask this store how it streams
(`qbench.models.working_memory.StreamingStore`): block sizes, unpacking scratch, which layers
end up cached.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable, Mapping

import numpy as np

from qbench.models.weight_store import WeightInfo, WeightStore
from qbench.quant.apply import PackedWeightStore
from qbench.quant.packing import PackedTensor

#: Float32 bytes of one dequantized row block when a layer is streamed. Small enough that the
#: block and its unpacking temporaries are noise next to the activations, large enough that
#: the Python loop over blocks costs little.
DEFAULT_BLOCK_BYTES = 256 * 1024
F32 = 4
#: Peak bytes of unpacking temporaries per code while one block is dequantized (`unpack_bits`
#: shifts codes in uint64 words: 2 x 8 B per code, then int16 and float32 copies).
_UNPACK_SCRATCH_PER_CODE = {"int": 18, "trit5": 12, "float": 4}
#: int16 bytes per code of the unpacked codes a vector codebook is indexed with
_INT16 = 2


def _scratch_per_weight(pt: PackedTensor | None) -> float:
    """Peak unpacking bytes per weight of a row block of `pt` (None: a float layer).

    A vector-codebook layer unpacks one code per `vector_dim` weights, so its bit unpacking
    costs `1 / vector_dim` of a scalar layer's; what peaks instead is the codebook lookup, its
    float32 values beside the scaled float32 rows, with the int16 codes still held (tracemalloc
    of `code_rows` on 256K weights at d=4: 8.6 B per weight, this model's 8 + 2/4 plus a fixed
    ~35 KB).
    """
    if pt is None:
        return _UNPACK_SCRATCH_PER_CODE["float"]
    if pt.vector_dim == 1:
        return _UNPACK_SCRATCH_PER_CODE[pt.packing]
    d = pt.vector_dim
    return max(_UNPACK_SCRATCH_PER_CODE["int"] / d, 2 * F32 + _INT16 / d)


class DeviceWeightStore(PackedWeightStore):
    """Weights at rest as stored (packed or float16); float32 only one row block at a time.

    Unlike `WeightStore`, nothing float is kept between calls unless it fits `cache_bytes`:
    neither transposed matrices nor upcast norms/biases, so the working set is what a device
    would hold. Outputs equal the plain store's up to float32 summation order.
    """

    #: Whether the models may call `linear` from several threads (the Whisper encoder's
    #: windows, wav2vec2's chunks and heads). It is safe (the cache is filled under a lock, the
    #: rest only reads the stored weights) but off unless asked for (`thread_safe=True`): one
    #: thread of work is how a device runs and what the memory models are held to exactly;
    #: with threads they count each thread's buffers (wav2vec2's count is then an upper bound).
    thread_safe = False

    def __init__(
        self,
        params: Mapping[str, np.ndarray],
        matrices: Iterable[WeightInfo],
        packed: Mapping[str, PackedTensor] | None = None,
        cache_bytes: int = 0,
        block_bytes: int = DEFAULT_BLOCK_BYTES,
        thread_safe: bool = False,
    ):
        super().__init__(params, matrices, packed or {}, cache_bytes=cache_bytes)
        self.block_bytes = int(block_bytes)
        self.thread_safe = bool(thread_safe)
        self._full: OrderedDict[str, np.ndarray] = OrderedDict()

    @classmethod
    def from_store(cls, store: WeightStore, cache_bytes: int = 0, block_bytes: int = DEFAULT_BLOCK_BYTES,
                   thread_safe: bool = False) -> DeviceWeightStore:
        packed = getattr(store, "packed", None) if isinstance(store, PackedWeightStore) else None
        return cls(store.params, store.weight_infos(), packed, cache_bytes, block_bytes, thread_safe)

    def param(self, name: str) -> np.ndarray:
        # Upcast on use and drop: a device keeps norms and biases at their stored precision.
        return np.asarray(self.params[name], dtype=np.float32)

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Float32 rows `[start, stop)` of the matrix layer `name`'s input is multiplied by, built
        from storage (a float layer's weight; a packed layer's dequantized codes)."""
        pt = self.packed.get(name)
        if pt is None:
            w = self.params[name + ".weight"]
            return np.asarray(w.reshape(w.shape[0], -1)[start:stop], dtype=np.float32)
        # PackedTensor reads any flat code range without unpacking the rest of the layer; for a
        # layer with an input transform these are rows of the matrix its transformed input meets.
        return pt.code_rows(start, stop)

    def block_rows(self, name: str) -> int:
        """Rows of layer `name` made float32 at a time (all of them for a small layer)."""
        out_f, in_f = self.infos[name].shape
        return min(out_f, max(1, self.block_bytes // (in_f * F32)))

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
        with self._lru_lock:  # one thread fills a layer, another waits for it
            wt = self._full.get(name)
            if wt is not None:
                return wt
            if self._lru_bytes + nbytes > self.cache_bytes:
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
        # `x @ w` on the stacked `[B, T, in]`, not one 2-D GEMM over all rows as `WeightStore`
        # does: numpy runs one product per batch row, so a row is computed exactly as it is in a
        # batch of one (a decoder step's single row is a GEMV, and OpenBLAS's GEMM rounds
        # differently), and a device's transcripts do not depend on its batch size.
        pt = self.packed.get(name)
        x_orig = x
        if pt is not None and pt.transforms_input:
            x = pt.transform_input(x)
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
        if pt is not None and pt.lowrank_u is not None:
            y += pt.lowrank_product(x_orig)
        bias_name = name + ".bias"
        if bias_name in self.params:
            y += self.param(bias_name)
        return y

    def cached_bytes(self) -> int:
        return self._lru_bytes

    # -- how it streams, for the models' memory models (`qbench.models.working_memory.StreamingStore`)
    def block_product_bytes(self, name: str, rows_in: int) -> int:
        """`x @ rows.T` of one row block of layer `name` on `rows_in` input rows."""
        return F32 * rows_in * self.block_rows(name)

    def streamed_linear_bytes(self, name: str, rows_in: int) -> tuple[int, int]:
        """`(product, weight rows)` bytes `linear` holds besides its output while layer `name`
        runs on `rows_in` rows: one row block's `x @ rows.T` and the float rows."""
        extra = self._around_product_bytes(name, rows_in)
        if name in self.cached_layers():
            return extra, 0  # one GEMM straight into the output
        product = self.block_product_bytes(name, rows_in) + extra
        weights = self.block_rows(name) * self.infos[name].shape[1]  # a vector layer holds fewer codes
        pt = self.packed.get(name)
        if pt is None:
            # float32 at rest: `rows` is a view of the stored weight; other dtypes are upcast
            return product, 0 if self.params[name + ".weight"].dtype == np.float32 else F32 * weights
        # the unpacking temporaries are freed before the product is allocated; the rows are not
        return product, max(F32 * weights, math.ceil(_scratch_per_weight(pt) * weights) - product)

    def _around_product_bytes(self, name: str, rows_in: int) -> int:
        """What a layer's declared extras hold while it runs: the transformed input `(x / s) H`
        and, for a low-rank correction, `x V^T`, its product with `U^T` and the float32 factors."""
        pt = self.packed.get(name)
        if pt is None:
            return 0
        out_f, in_f = pt.shape
        extra = F32 * rows_in * in_f if pt.transforms_input else 0
        if pt.lowrank_u is not None:
            r = pt.lowrank_rank
            extra += F32 * (rows_in * (r + out_f) + r * (out_f + in_f))
        return extra

    def weight_block_bytes(self) -> int:
        """Float rows plus unpacking scratch of the largest row block any layer is streamed in."""
        worst = 0
        for info in self.weight_infos():
            per_weight = F32 + _scratch_per_weight(self.packed.get(info.name))
            worst = max(worst, math.ceil(self.block_rows(info.name) * info.shape[1] * per_weight))
        return worst

    def cached_layers(self) -> dict[str, int]:
        """The layers this store ends up caching, with their float bytes: as `linear` fills the
        cache, in first-use order, every layer that still fits."""
        used, cached = 0, {}
        for info in self.weight_infos():
            nbytes = info.numel * F32
            if used + nbytes <= self.cache_bytes:
                used += nbytes
                cached[info.name] = nbytes
        return cached
