"""Read `.safetensors` files into numpy arrays: the format every loader takes first.

Why first: a safetensors file is a JSON header plus raw tensor bytes, so reading it runs no
code from the file. `torch_pickle` (a pickle is a program) is kept for weights that exist in
no other form, and is not even imported when a safetensors file is there.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from qbench.checkpoints.errors import CheckpointError

__all__ = ["bfloat16_to_float32", "load_safetensors"]

_SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"), "I64": np.dtype("<i8"), "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}


def bfloat16_to_float32(raw: np.ndarray) -> np.ndarray:
    """Widen bfloat16 bit patterns (held as uint16) to float32: numpy has no bfloat16.

    bfloat16 is the top half of a float32, so the widening is exact.
    """
    return (np.asarray(raw, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def _read_header(path: Path) -> tuple[dict[str, Any], int]:
    """The JSON header of a safetensors file and the byte offset where tensor data starts."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file (no header length)")
            n = int.from_bytes(prefix, "little")
            if n > size - 8:
                raise CheckpointError(f"{path}: truncated safetensors file (header says {n} bytes)")
            header = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable safetensors header ({e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    return header, 8 + n


def _load_safetensors_raw(path: Path, header: Mapping[str, Any], data_start: int) -> dict[str, np.ndarray]:
    """Read tensors by parsing the format ourselves; needed because safetensors.numpy lacks BF16."""
    out: dict[str, np.ndarray] = {}
    with open(path, "rb") as f:
        for name, info in header.items():
            try:
                kind = info["dtype"]
                shape = tuple(int(n) for n in info["shape"])
                begin, end = (int(x) for x in info["data_offsets"])
            except (KeyError, TypeError, ValueError) as e:
                raise CheckpointError(f"{path}: malformed header entry for {name}") from e
            dtype = _SAFETENSORS_DTYPES.get(kind)
            if dtype is None:
                raise CheckpointError(f"{path}: {name} has unsupported dtype {kind}")
            count = int(np.prod(shape, dtype=np.int64))
            if end - begin != count * dtype.itemsize or begin < 0:
                raise CheckpointError(f"{path}: {name} data_offsets do not match its shape and dtype")
            f.seek(data_start + begin)
            buf = f.read(end - begin)
            if len(buf) != end - begin:
                raise CheckpointError(f"{path}: truncated safetensors file (data for {name})")
            array = np.frombuffer(buf, dtype=dtype, count=count).reshape(shape).copy()
            out[name] = bfloat16_to_float32(array) if kind == "BF16" else array
    return out


def tensor_sizes(path: str | os.PathLike[str]) -> dict[str, int]:
    """Elements of every tensor in a safetensors file, from its header alone (no data is read)."""
    path = Path(path)
    header, _ = _read_header(path)
    sizes = {}
    for name, info in header.items():
        try:
            sizes[name] = int(np.prod(info["shape"], dtype=np.int64))
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: malformed header entry for {name}") from e
    return sizes


def load_safetensors(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Load one `.safetensors` file to numpy; BF16 tensors are widened to float32.

    Uses `safetensors.numpy.load_file` (fast, validated) unless the header lists a BF16
    tensor, which that function cannot represent; then the simple format is parsed directly.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    header, data_start = _read_header(path)
    if any(isinstance(v, Mapping) and v.get("dtype") == "BF16" for v in header.values()):
        return _load_safetensors_raw(path, header, data_start)
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # SafetensorError and friends: one-line message naming the file
        raise CheckpointError(f"{path}: cannot read safetensors ({type(e).__name__}: {e})") from e
