"""qbench: how much accuracy does a low-bit weight quantizer cost on Whisper and wav2vec 2.0?

What a quantizer plugin needs is importable from here (`from qbench import Quantizer, hookimpl`);
see `plugins/template` and CONTRIBUTING.md. Importing it costs numpy, pydantic and pluggy only.
"""

__version__ = "0.1.0"

from qbench.hook_markers import hookimpl
from qbench.quant.contract import (
    LayerStats,
    QuantizedTensor,
    Quantizer,
    QuantizerConfig,
    dequantize,
)
from qbench.quant.grids import (
    column_groups,
    expand_groups,
    grid_codes,
    grid_values,
    group_reduce,
    uniform_grid,
)

__all__ = [
    "LayerStats",
    "QuantizedTensor",
    "Quantizer",
    "QuantizerConfig",
    "__version__",
    "column_groups",
    "dequantize",
    "expand_groups",
    "grid_codes",
    "grid_values",
    "group_reduce",
    "hookimpl",
    "uniform_grid",
]
