"""Non-uniform codebook quantizers for qbench: weights snap to a table of values, not a grid.

- `nf4` (`qbench_nonuniform.nf4`): QLoRA's NormalFloat table, one per tensor, absmax-scaled
  per block of input columns.
- `squeezellm` (`qbench_nonuniform.squeezellm`): SqueezeLLM's per-row codebook, fitted by
  k-means weighted by each input column's energy.

Each module registers its own quantizer under its own entry point (pluggy registers a module
under one plugin name only).
"""

from qbench_nonuniform.nf4 import NF4Quantizer, normal_float_codebook
from qbench_nonuniform.squeezellm import SqueezeLLMQuantizer, weighted_kmeans_rows

__all__ = ["NF4Quantizer", "SqueezeLLMQuantizer", "normal_float_codebook", "weighted_kmeans_rows"]
