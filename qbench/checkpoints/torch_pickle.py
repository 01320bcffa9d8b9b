"""Read `torch.save` checkpoints into numpy arrays without importing torch.

Why: the benchmark's models are numpy, and the published Whisper / wav2vec 2.0 weights are
often only available as `.pt` / `pytorch_model.bin`. Requiring torch (hundreds of MB) just to
unzip a few arrays is a poor trade, and `torch.load` on an untrusted file executes arbitrary
pickled code. This module reads the zip format directly and unpickles with a whitelist, so a
checkpoint can only build dicts, lists, numbers, strings and tensors.

The zip format (torch >= 1.6, `_use_new_zipfile_serialization=True`, the default):

    <prefix>/data.pkl          pickle (protocol 2) of the saved object; tensors are pickled as
                               torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)
                               where `storage` is a persistent id
                               ("storage", torch.FloatStorage, "<key>", "<location>", numel)
    <prefix>/data/<key>        the raw bytes of that storage
    <prefix>/byteorder         "little" or "big" (absent in old files: little)

`<prefix>` is chosen by torch from the file name (`archive`, `tiny.en`, ...), so it is found by
looking for the single `*/data.pkl` entry rather than assumed.
"""

from __future__ import annotations

import codecs
import io
import os
import pickle
import tarfile
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qbench.checkpoints.errors import CheckpointError

__all__ = ["load_torch_checkpoint", "load_torch_state_dict", "bfloat16_to_float32"]


@dataclass(frozen=True)
class _StorageType:
    """Stands in for `torch.FloatStorage` etc.: the element dtype of a storage record."""

    name: str
    dtype: np.dtype
    bfloat16: bool = False  # stored as raw uint16, widened to float32 after slicing


_STORAGE_TYPES: dict[str, _StorageType] = {
    t.name: t
    for t in (
        _StorageType("FloatStorage", np.dtype("<f4")),
        _StorageType("DoubleStorage", np.dtype("<f8")),
        _StorageType("HalfStorage", np.dtype("<f2")),
        _StorageType("BFloat16Storage", np.dtype("<u2"), bfloat16=True),
        _StorageType("LongStorage", np.dtype("<i8")),
        _StorageType("IntStorage", np.dtype("<i4")),
        _StorageType("ShortStorage", np.dtype("<i2")),
        _StorageType("CharStorage", np.dtype("i1")),
        _StorageType("ByteStorage", np.dtype("u1")),
        _StorageType("BoolStorage", np.dtype("?")),
    )
}

# Plain callables a benign checkpoint may reference. Protocol 2 has no opcode for sets or for
# Python 3 bytes, so those arrive as GLOBAL + REDUCE; none of these can reach the OS.
_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "bytearray"): bytearray,
    ("builtins", "slice"): slice,
    ("_codecs", "encode"): codecs.encode,
}


@dataclass
class _Storage:
    """A storage record read from the archive: a flat array of its element dtype."""

    key: str
    kind: _StorageType
    data: np.ndarray


def bfloat16_to_float32(raw: np.ndarray) -> np.ndarray:
    """Widen bfloat16 bit patterns (held as uint16) to float32: numpy has no bfloat16.

    bfloat16 is the top half of a float32, so the widening is exact.
    """
    return (np.asarray(raw, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


class _TorchUnpickler(pickle.Unpickler):
    """Unpickles `data.pkl` with a whitelist of globals, resolving storages from the zip."""

    def __init__(self, stream: io.BytesIO, archive: zipfile.ZipFile, prefix: str, path: Path,
                 big_endian: bool):
        super().__init__(stream)
        self._archive = archive
        self._prefix = prefix
        self._path = path
        self._big_endian = big_endian
        self._storages: dict[tuple[str, str], _Storage] = {}
        self._rebuilders: dict[tuple[str, str], Any] = {
            ("torch._utils", "_rebuild_tensor"): self._rebuild_tensor,
            ("torch._utils", "_rebuild_tensor_v2"): self._rebuild_tensor_v2,
            ("torch._utils", "_rebuild_parameter"): self._rebuild_parameter,
            ("torch._utils", "_rebuild_parameter_with_state"): self._rebuild_parameter_with_state,
        }

    # -- whitelist -----------------------------------------------------------------------
    def find_class(self, module: str, name: str) -> Any:
        key = (module, name)
        if key in self._rebuilders:
            return self._rebuilders[key]
        if key in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[key]
        if module == "torch" and name in _STORAGE_TYPES:
            return _STORAGE_TYPES[name]
        raise CheckpointError(
            f"{self._path}: refusing to unpickle {module}.{name} (not a tensor, storage or plain "
            "container; the file may be malicious or not a weights checkpoint)"
        )

    # -- storages ------------------------------------------------------------------------
    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CheckpointError(f"{self._path}: unsupported persistent id {pid!r:.80}")
        _, kind, key, _location, numel = pid
        if not isinstance(kind, _StorageType):
            raise CheckpointError(f"{self._path}: storage {key!r} has unsupported type {kind!r:.80}")
        cached = self._storages.get((str(key), kind.name))
        if cached is not None:
            return cached
        record = f"{self._prefix}data/{key}"
        try:
            raw = self._archive.read(record)
        except KeyError:
            raise CheckpointError(f"{self._path}: storage record {record} is missing") from None
        nbytes = int(numel) * kind.dtype.itemsize
        if len(raw) < nbytes:
            raise CheckpointError(
                f"{self._path}: storage record {record} holds {len(raw)} bytes, "
                f"{numel} x {kind.name} needs {nbytes}"
            )
        dtype = kind.dtype.newbyteorder(">") if self._big_endian else kind.dtype
        data = np.frombuffer(raw, dtype=dtype, count=int(numel))
        storage = _Storage(str(key), kind, data)
        self._storages[(str(key), kind.name)] = storage
        return storage

    # -- tensor rebuild functions (the pickled callables) -------------------------------
    def _rebuild_tensor(self, storage: _Storage, storage_offset: int, size: Any,
                        stride: Any) -> np.ndarray:
        if not isinstance(storage, _Storage):
            raise CheckpointError(f"{self._path}: tensor rebuilt from a non-storage {storage!r:.80}")
        shape = tuple(int(n) for n in size)
        strides = tuple(int(s) for s in stride)
        offset = int(storage_offset)
        flat = storage.data
        if len(shape) != len(strides) or offset < 0 or any(n < 0 for n in shape) \
                or any(s < 0 for s in strides):
            raise CheckpointError(
                f"{self._path}: bad tensor layout size={shape} stride={strides} offset={offset}"
            )
        if 0 in shape:
            out = np.empty(shape, dtype=flat.dtype)
        else:
            last = offset + sum((n - 1) * s for n, s in zip(shape, strides))
            if last >= flat.size:
                raise CheckpointError(
                    f"{self._path}: tensor size={shape} stride={strides} offset={offset} reaches "
                    f"element {last} of storage {storage.key} which has {flat.size}"
                )
            view = np.lib.stride_tricks.as_strided(
                flat[offset:], shape=shape,
                strides=tuple(s * flat.dtype.itemsize for s in strides), writeable=False,
            )
            out = view.copy(order="C")
        if out.dtype.byteorder == ">":
            out = out.astype(out.dtype.newbyteorder("="))
        if storage.kind.bfloat16:
            out = bfloat16_to_float32(out)
        return out

    def _rebuild_tensor_v2(self, storage: _Storage, storage_offset: int, size: Any, stride: Any,
                           requires_grad: bool = False, backward_hooks: Any = None,
                           metadata: Any = None) -> np.ndarray:
        return self._rebuild_tensor(storage, storage_offset, size, stride)

    def _rebuild_parameter(self, data: Any, requires_grad: bool = False,
                           backward_hooks: Any = None) -> Any:
        return data

    def _rebuild_parameter_with_state(self, data: Any, requires_grad: bool,
                                      backward_hooks: Any, state: Any) -> Any:
        return data


def _refuse_non_zip(path: Path, head: bytes) -> CheckpointError:
    """The error for a file that is not a zip: legacy torch format, or not torch at all."""
    if not head:
        return CheckpointError(f"{path}: file is empty")
    if head[:1] == b"\x80" or tarfile.is_tarfile(path):
        return CheckpointError(
            f"{path}: legacy (pre-1.6, non-zip) torch serialization is not supported; convert it "
            "once with torch: torch.save(torch.load(p, weights_only=True), p)"
        )
    if head.startswith(b"PK"):
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
    with open(path, "rb") as f:
        head = f.read(8)
    try:
        if not zipfile.is_zipfile(path):
            raise _refuse_non_zip(path, head)
        with zipfile.ZipFile(path) as archive:
            return _load_archive(archive, path)
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
        raise CheckpointError(f"{path}: corrupt or truncated zip archive ({e})") from e


def _load_archive(archive: zipfile.ZipFile, path: Path) -> Any:
    pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        if any(n.endswith("constants.pkl") for n in archive.namelist()):
            raise CheckpointError(f"{path}: TorchScript archives are not supported, save a state dict")
        raise CheckpointError(
            f"{path}: expected one <prefix>/data.pkl in the zip, found {len(pickles)}"
        )
    prefix = pickles[0][: -len("data.pkl")]
    big_endian = False
    if f"{prefix}byteorder" in archive.namelist():
        order = archive.read(f"{prefix}byteorder").decode("ascii", "replace").strip()
        if order not in ("little", "big"):
            raise CheckpointError(f"{path}: unknown byteorder record {order!r}")
        big_endian = order == "big"
    unpickler = _TorchUnpickler(io.BytesIO(archive.read(pickles[0])), archive, prefix, path,
                                big_endian)
    try:
        return unpickler.load()
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, zlib.error):
        raise
    except Exception as e:  # any malformed-stream failure of the pickle machine
        raise CheckpointError(f"{path}: corrupt pickle stream in {pickles[0]} ({type(e).__name__}: {e})") from e


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
