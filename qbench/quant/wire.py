"""The messages between the harness and a quantizer plugin's process: JSON plus raw arrays, no pickle.

A message is an 8-byte little-endian length, that many bytes of UTF-8 JSON (the header), then
the bytes of each array the header lists under `"arrays"` (`[name, dtype, shape]`), in order.
Nothing is unpickled: a plugin's process can send only numbers, strings and plain numeric
arrays, so reading its reply cannot run code in the harness. Array dtypes are limited to plain
numeric ones, and every length is checked against a cap before anything is allocated.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from typing import Any

import numpy as np

from qbench.errors import QBenchError

#: dtypes an array on the wire may have (no object, string or structured dtypes)
ARRAY_DTYPES = frozenset({"bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                          "float16", "float32", "float64"})
#: a header larger than this is not a header
MAX_HEADER_BYTES = 1 << 20
#: one array larger than this is refused (the largest real weight, Whisper large's token
#: embedding, is 51866 x 1280 float32 = 266 MB)
MAX_ARRAY_BYTES = 1 << 31

_LENGTH = struct.Struct("<Q")


class WireError(QBenchError, ValueError):
    """A message that does not follow the format (truncated, oversized, or of a refused dtype)."""


def encode_message(header: dict[str, Any], arrays: dict[str, np.ndarray] | None = None) -> list[bytes | memoryview]:
    """The chunks of one message, to be written in order."""
    arrays = arrays or {}
    listing = []
    chunks: list[bytes | memoryview] = []
    for name, array in arrays.items():
        a = np.ascontiguousarray(array)
        if a.dtype.name not in ARRAY_DTYPES:
            raise WireError(f"array {name!r} has dtype {a.dtype}, not a plain numeric dtype")
        listing.append([name, a.dtype.name, list(a.shape)])
        chunks.append(memoryview(a).cast("B") if a.size else b"")
    body = json.dumps({**header, "arrays": listing}, allow_nan=False).encode("utf-8")
    return [_LENGTH.pack(len(body)), body, *chunks]


def decode_message(read_exact: Callable[[int], bytes]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Read one message with `read_exact(n)` (which returns exactly n bytes or raises)."""
    (length,) = _LENGTH.unpack(read_exact(_LENGTH.size))
    if length > MAX_HEADER_BYTES:
        raise WireError(f"message header of {length} bytes (at most {MAX_HEADER_BYTES})")
    try:
        header = json.loads(read_exact(length).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WireError(f"message header is not JSON ({exc})") from None
    if not isinstance(header, dict) or not isinstance(header.get("arrays", []), list):
        raise WireError("message header is not a JSON object with an 'arrays' list")
    arrays: dict[str, np.ndarray] = {}
    for item in header.pop("arrays", []):
        try:
            name, dtype, shape = item
            shape = tuple(int(n) for n in shape)
        except (TypeError, ValueError):
            raise WireError(f"malformed array listing {item!r}") from None
        if dtype not in ARRAY_DTYPES or any(n < 0 for n in shape) or not isinstance(name, str):
            raise WireError(f"array {name!r}: refused dtype {dtype!r} or shape {shape}")
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if nbytes > MAX_ARRAY_BYTES:
            raise WireError(f"array {name!r} of {nbytes} bytes (at most {MAX_ARRAY_BYTES})")
        data = read_exact(nbytes) if nbytes else b""
        arrays[name] = np.frombuffer(data, dtype=dtype).reshape(shape).copy() if nbytes else np.zeros(shape, dtype)
    return header, arrays
