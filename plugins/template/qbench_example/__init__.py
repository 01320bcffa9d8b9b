"""A complete qbench plugin: int8 codes, one symmetric scale for the whole tensor."""

from __future__ import annotations

import numpy as np
from pydantic import Field

from qbench import LayerStats, QuantizedTensor, Quantizer, QuantizerConfig, hookimpl


class Int8TensorQuantizer(Quantizer):
    name = "int8-tensor"
    description = "int8, one symmetric scale per tensor"

    class Config(QuantizerConfig):
        clip: float = Field(1.0, gt=0, le=1, description="fraction of max|w| mapped to 127")

    config: Config  # typed as this quantizer's own knobs

    def quantize(self, weight: np.ndarray, stats: LayerStats | None) -> QuantizedTensor:
        scale = max(float(np.abs(weight).max()) * self.config.clip / 127, 1e-12)
        codes = np.clip(np.rint(weight / scale), -127, 127).astype(np.int8)
        return QuantizedTensor(codes=codes, code_bits=8, scales=[[scale]], signed=True)


@hookimpl
def qbench_register_quantizers() -> list[type[Quantizer]]:
    return [Int8TensorQuantizer]
