"""A model's memory model: what it answers (`WorkingMemory`) and what it asks of the store.

Each model counts, phase by phase as its code is written, what is alive at each phase's
high-water mark when it runs on a device store (`SpeechModel.working_memory`). How the store
turns stored weights into float32 while a layer runs is the store's business, so the model
asks it (`StreamingStore`, which `qbench.embedded.device_store.DeviceWeightStore` answers)
instead of knowing block sizes, unpacking scratch or which layers end up cached.
"""

from __future__ import annotations

from typing import Protocol

from pydantic import BaseModel, Field

from qbench.models.weight_store import WeightInfo

#: bytes of one float32
F32 = 4


class MemoryPhase(BaseModel):
    """Bytes alive at one phase's high-water mark, by what holds them."""

    buffers_bytes: int = Field(0, description="audio, log-mel, attention scores")
    activations_bytes: int = Field(0, description="hidden states and the temporaries numpy makes")
    kv_cache_bytes: int = Field(0, description="decoder self- and cross-attention keys/values")
    weight_block_bytes: int = Field(0, description="float rows (and unpacking scratch) of the weight being streamed")
    cache_bytes: int = Field(0, description="float copies of whole layers the store has filled by then")

    @property
    def total_bytes(self) -> int:
        return self.buffers_bytes + self.activations_bytes + self.kv_cache_bytes + self.weight_block_bytes + self.cache_bytes


class WorkingMemory(BaseModel):
    """Every phase of one run, in the order they happen; the run's working peak is the largest.

    No phases: the model has no memory model (its runs are checked by measurement alone).
    """

    phases: dict[str, MemoryPhase] = Field(default_factory=dict)

    @property
    def peak_phase(self) -> str | None:
        """The phase with the most bytes (the first of equals), None without phases."""
        return max(self.phases, key=lambda name: self.phases[name].total_bytes) if self.phases else None

    @property
    def peak(self) -> MemoryPhase:
        return self.phases[self.peak_phase] if self.phases else MemoryPhase()


class StreamingStore(Protocol):
    """What a memory model asks of the store a device run uses.

    A layer's weight is made float32 one row block at a time while the layer runs, unless the
    layer is among `cached_layers`: a whole float copy kept once the layer first ran.
    """

    #: False for a store with state in `linear`: the models then run their work in one thread
    thread_safe: bool

    def weight_infos(self) -> list[WeightInfo]:
        """Matrix weights in the order the model first uses them."""
        ...

    def block_product_bytes(self, name: str, rows_in: int) -> int:
        """`x @ rows.T` of one row block of layer `name` on `rows_in` input rows."""
        ...

    def streamed_linear_bytes(self, name: str, rows_in: int) -> tuple[int, int]:
        """`(product, weight rows)` bytes `linear` holds besides its output while layer `name`
        runs on `rows_in` rows; `(0, 0)` for a cached layer."""
        ...

    def weight_block_bytes(self) -> int:
        """Float rows plus unpacking scratch of the largest row block any layer is streamed in."""
        ...

    def cached_layers(self) -> dict[str, int]:
        """The layers the store ends up caching whole, with their float bytes, in first-use order."""
        ...
