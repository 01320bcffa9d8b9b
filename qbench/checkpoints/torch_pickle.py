"""Read `torch.save` checkpoints into numpy arrays without torch, running none of their code.

Only for weights published in no other format: openai's Whisper `.pt` files, and Hugging Face
repos with a `pytorch_model.bin` but no `model.safetensors` (the loaders take safetensors
whenever it is there). A pickle is a program for a small stack machine: GLOBAL imports any
module attribute and REDUCE calls it, so `torch.load` of an untrusted file can run anything.
Here the machine reaches exactly `ALLOWED_GLOBALS`, what `torch.save` writes for tensors and
state dicts; any other global is refused by name before anything is imported.

The zip format (torch >= 1.6, `_use_new_zipfile_serialization=True`, the default):

    <prefix>/data.pkl          pickle (protocol 2) of the saved object; tensors are pickled as
                               torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)
                               where `storage` is a persistent id
                               ("storage", torch.FloatStorage, "<key>", "<location>", numel)
    <prefix>/data/<key>        the raw bytes of that storage
    <prefix>/byteorder         "little" or "big" (absent in old files: little)

`<prefix>` is chosen by torch from the file name (`archive`, `tiny.en`, ...), so it is found by
looking for the single `*/data.pkl` entry rather than assumed. The legacy format (torch < 1.6,
a bare pickle stream) is refused without being unpickled.
"""

from __future__ import annotations

import io
import os
import pickle
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

import numpy as np

from qbench.checkpoints.errors import CheckpointError
from qbench.checkpoints.safetensors_reader import bfloat16_to_float32
from qbench.errors import describe, one_line

__all__ = ["ALLOWED_GLOBALS", "load_torch_checkpoint", "load_torch_state_dict"]

# torch storage class -> dtype of its elements. numpy has no bfloat16: its bit patterns are read
# as uint16 and widened to float32 once the tensor is cut out of the storage.
_STORAGE_DTYPES: dict[str, str] = {
    "FloatStorage": "<f4", "DoubleStorage": "<f8", "HalfStorage": "<f2", "BFloat16Storage": "<u2",
    "LongStorage": "<i8", "IntStorage": "<i4", "ShortStorage": "<i2", "CharStorage": "i1",
    "ByteStorage": "u1", "BoolStorage": "?",
}


class _StorageType(NamedTuple):
    """Stands in for `torch.FloatStorage` etc.; a tuple, so the pickle's BUILD cannot alter it."""

    name: str
    dtype: np.dtype


class _Storage(NamedTuple):
    """A storage record read from the archive: a flat array of its element type."""

    key: str
    kind: _StorageType
    data: np.ndarray


def _rebuild_tensor_v2(storage: _Storage, storage_offset: int, size: Any, stride: Any,
                       requires_grad: bool = False, backward_hooks: Any = None,
                       metadata: Any = None) -> np.ndarray:
    """torch's tensor constructor: the strided window onto `storage`, as a C-contiguous copy."""
    if not isinstance(storage, _Storage):
        raise TypeError(f"tensor rebuilt from a non-storage {storage!r:.80}")
    shape, strides, offset = tuple(map(int, size)), tuple(map(int, stride)), int(storage_offset)
    flat = storage.data
    if len(shape) != len(strides) or offset < 0 or min(shape + strides, default=0) < 0:
        raise ValueError(f"bad tensor layout size={shape} stride={strides} offset={offset}")
    if 0 in shape:
        out = np.empty(shape, dtype=flat.dtype)
    else:
        # as_strided checks nothing: a window reaching past the storage would read stray memory
        last = offset + sum((n - 1) * s for n, s in zip(shape, strides))
        if last >= flat.size:
            raise ValueError(f"tensor size={shape} stride={strides} offset={offset} reaches element "
                             f"{last} of storage {storage.key}, which has {flat.size}")
        out = np.lib.stride_tricks.as_strided(
            flat[offset:], shape, tuple(s * flat.itemsize for s in strides), writeable=False).copy()
    return bfloat16_to_float32(out) if storage.kind.name == "BFloat16Storage" else out


def _rebuild_parameter(data: Any, requires_grad: bool = False, backward_hooks: Any = None) -> Any:
    """torch's nn.Parameter constructor: the tensor itself is all a weights reader needs."""
    return data


# Every global a torch.save'd state dict references (torch 2.x output is checked against this in
# tests/test_torch_pickle_safety.py). find_class looks names up here and nowhere else.
ALLOWED_GLOBALS: Mapping[tuple[str, str], Any] = MappingProxyType({
    ("collections", "OrderedDict"): OrderedDict,  # a state dict, and each tensor's empty hooks
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,  # every tensor
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,  # an nn.Parameter saved as itself
    **{("torch", name): _StorageType(name, np.dtype(code)) for name, code in _STORAGE_DTYPES.items()},
})


class _CheckpointUnpickler(pickle.Unpickler):
    """Unpickles a zip checkpoint's `data.pkl`: `ALLOWED_GLOBALS` only, storages from the zip."""

    def __init__(self, archive: zipfile.ZipFile, path: Path):
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            if any(n.endswith("constants.pkl") for n in names):
                raise CheckpointError(f"{path}: TorchScript archives are not supported, save a state dict")
            raise CheckpointError(f"{path}: expected one <prefix>/data.pkl in the zip, found {len(pickles)}")
        self._prefix = pickles[0][: -len("data.pkl")]
        byteorder = "little"
        if f"{self._prefix}byteorder" in names:
            byteorder = archive.read(f"{self._prefix}byteorder").decode("ascii", "replace").strip()
            if byteorder not in ("little", "big"):
                raise CheckpointError(f"{path}: unknown byteorder record {byteorder!r:.40}")
        super().__init__(io.BytesIO(archive.read(pickles[0])))
        self._archive, self._path, self._big_endian = archive, path, byteorder == "big"
        self._storages: dict[tuple[str, str], _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        # every GLOBAL, STACK_GLOBAL and INST opcode lands here; pickle's own find_class, which
        # imports `module`, is never called
        if (module, name) not in ALLOWED_GLOBALS:
            raise CheckpointError(
                f"{self._path}: refusing to unpickle {one_line(f'{module}.{name}')[:120]}: not one of the "
                "globals a torch state dict uses (the file may be malicious, or not a weights checkpoint)")
        return ALLOWED_GLOBALS[module, name]

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise CheckpointError(f"{self._path}: unsupported persistent id {pid!r:.80}")
        _, kind, key, _location, numel = pid
        cache_key = (str(key), kind.name)
        if cache_key not in self._storages:
            self._storages[cache_key] = self._read_storage(str(key), kind, int(numel))
        return self._storages[cache_key]

    def _read_storage(self, key: str, kind: _StorageType, numel: int) -> _Storage:
        record = f"{self._prefix}data/{key}"
        try:
            info = self._archive.getinfo(record)
        except KeyError:
            raise CheckpointError(f"{self._path}: storage record {record} is missing") from None
        nbytes = numel * kind.dtype.itemsize
        if numel < 0 or info.file_size < nbytes:
            raise CheckpointError(f"{self._path}: storage record {record} holds {info.file_size} bytes, "
                                  f"{numel} x {kind.name} needs {nbytes}")
        raw = self._archive.read(info)
        if self._big_endian:
            data = np.frombuffer(raw, kind.dtype.newbyteorder(">"), count=numel).astype(kind.dtype)
        else:
            data = np.frombuffer(raw, kind.dtype, count=numel)
        return _Storage(key, kind, data)


def _not_a_zip(path: Path) -> CheckpointError:
    """The error for a file that is not a zip archive; it is never unpickled."""
    with open(path, "rb") as f:
        head = f.read(2)
    if not head:
        return CheckpointError(f"{path}: file is empty")
    if head[:1] == b"\x80":  # a bare pickle stream (protocol >= 2): torch < 1.6, or hand-made
        return CheckpointError(
            f"{path}: legacy (pre-1.6, non-zip) torch serialization is not supported (a bare pickle "
            "is never unpickled); convert it once with torch: torch.save(torch.load(p, weights_only=True), p)")
    if head == b"PK":
        return CheckpointError(f"{path}: corrupt or truncated zip archive")
    return CheckpointError(f"{path}: not a PyTorch checkpoint (no zip or pickle header)")


def load_torch_checkpoint(path: str | os.PathLike[str]) -> Any:
    """Load whatever object `torch.save` wrote, with every tensor as a numpy array.

    Nested dicts, lists and tuples are kept as they were saved (an openai Whisper `.pt` is
    `{"dims": {...}, "model_state_dict": {...}}`). Tensors come back as C-contiguous arrays in
    their stored dtype, except bfloat16 which numpy lacks and which is widened to float32.
    Raises `CheckpointError` for a missing, corrupt, legacy-format or untrusted file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    if not zipfile.is_zipfile(path):
        raise _not_a_zip(path)
    try:
        with zipfile.ZipFile(path) as archive:
            return _CheckpointUnpickler(archive, path).load()
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, zlib.error) as e:
        raise CheckpointError(f"{path}: corrupt or truncated zip archive ({e})") from e
    except Exception as e:  # the pickle machine's own errors, or a tensor rebuilt from bad arguments
        raise CheckpointError(f"{path}: corrupt pickle stream ({describe(e)})") from e


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, np.ndarray) for k, v in obj.items()
    )


def load_torch_state_dict(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Load a checkpoint and return its state dict (name -> array).

    Accepts a flat state dict (Hugging Face `pytorch_model.bin`) or a wrapper dict that holds
    one under `model_state_dict` (openai Whisper), `state_dict` or `model` (training scripts),
    so callers need not know which tool wrote the file.
    """
    obj = load_torch_checkpoint(path)
    if _is_state_dict(obj):
        return dict(obj)
    if isinstance(obj, Mapping):
        for key in ("model_state_dict", "state_dict", "model"):
            if _is_state_dict(obj.get(key)):
                return dict(obj[key])
        keys = ", ".join(repr(k) for k in list(obj)[:8])
        raise CheckpointError(f"{path}: no state dict of tensors found (top-level keys: {keys})")
    raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
