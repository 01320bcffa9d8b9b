"""Round trips through the torch-free checkpoint loaders on tiny synthetic Whisper checkpoints.

The `.pt` files are written here WITHOUT torch, by `write_torch_zip`, which emits the same zip
layout and pickle protocol 2 opcode stream as `torch.save`, so these tests always run. When
torch is importable, extra tests check that real `torch.save` output reads identically.
"""

from __future__ import annotations

import dataclasses
import io
import json
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file

from qbench.checkpoints.errors import CheckpointError
from qbench.checkpoints.hf_whisper import load_hf_whisper, load_safetensors
from qbench.checkpoints.openai_whisper import load_openai_whisper, sinusoids
from qbench.checkpoints.torch_pickle import load_torch_checkpoint, load_torch_state_dict
from qbench.models.whisper import ModelDimensions

DIMS = ModelDimensions(n_mels=4, n_audio_ctx=6, n_audio_state=8, n_audio_head=2, n_audio_layer=1,
                       n_vocab=16, n_text_ctx=5, n_text_state=8, n_text_head=2, n_text_layer=1)
D = 8
N_MLP = 4 * D


# --------------------------------------------------------------------------------------------
# A torch.save writer that needs no torch: zip of <prefix>/data.pkl + <prefix>/data/<key>
# --------------------------------------------------------------------------------------------
_STORAGE_NAMES = {
    np.dtype("float32"): "FloatStorage", np.dtype("float16"): "HalfStorage",
    np.dtype("float64"): "DoubleStorage", np.dtype("int64"): "LongStorage",
    np.dtype("int32"): "IntStorage", np.dtype("int8"): "CharStorage",
    np.dtype("uint8"): "ByteStorage", np.dtype("bool"): "BoolStorage",
}


@dataclass
class View:
    """A tensor as torch pickles it: a strided window onto a (possibly shared) flat storage."""

    storage: np.ndarray  # 1-D
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    storage_type: str | None = None  # e.g. "BFloat16Storage" for uint16 bit patterns


@dataclass
class Param:
    """An nn.Parameter wrapper (torch._utils._rebuild_parameter)."""

    data: Any


@dataclass
class Global:
    """An arbitrary GLOBAL + REDUCE, to smuggle a disallowed callable into the stream."""

    module: str
    name: str
    args: tuple


class _TorchPickleWriter:
    def __init__(self) -> None:
        self.out = io.BytesIO()
        self.storages: dict[int, tuple[str, np.ndarray, str]] = {}  # id -> key, array, type

    def w(self, b: bytes) -> None:
        self.out.write(b)

    def glob(self, module: str, name: str) -> None:
        self.w(b"c" + module.encode() + b"\n" + name.encode() + b"\n")

    def ordered_dict_empty(self) -> None:
        self.glob("collections", "OrderedDict")
        self.w(b")R")

    def emit(self, obj: Any) -> None:
        if isinstance(obj, bool):
            self.w(b"\x88" if obj else b"\x89")
        elif isinstance(obj, int):
            if -(2**31) <= obj < 2**31:
                self.w(b"J" + struct.pack("<i", obj))
            else:
                raw = obj.to_bytes(16, "little", signed=True)
                self.w(b"\x8a" + bytes([len(raw)]) + raw)
        elif isinstance(obj, float):
            self.w(b"G" + struct.pack(">d", obj))
        elif isinstance(obj, str):
            raw = obj.encode("utf-8")
            self.w(b"X" + struct.pack("<I", len(raw)) + raw)
        elif isinstance(obj, tuple):
            self.w(b"(")
            for item in obj:
                self.emit(item)
            self.w(b"t")
        elif isinstance(obj, list):
            self.w(b"](")
            for item in obj:
                self.emit(item)
            self.w(b"e")
        elif isinstance(obj, dict):
            if isinstance(obj, OrderedDict):
                self.ordered_dict_empty()
            else:
                self.w(b"}")
            if obj:
                self.w(b"(")
                for k, v in obj.items():
                    self.emit(k)
                    self.emit(v)
                self.w(b"u")
        elif isinstance(obj, np.ndarray):
            flat = np.ascontiguousarray(obj).reshape(-1)
            strides = tuple(s // obj.itemsize for s in np.empty(obj.shape, obj.dtype).strides)
            self.emit(View(flat, 0, obj.shape, strides))
        elif isinstance(obj, View):
            self.emit_view(obj)
        elif isinstance(obj, Param):
            self.glob("torch._utils", "_rebuild_parameter")
            self.w(b"(")
            self.emit(obj.data)
            self.emit(False)
            self.ordered_dict_empty()
            self.w(b"tR")
        elif isinstance(obj, Global):
            self.glob(obj.module, obj.name)
            self.emit(obj.args)
            self.w(b"R")
        else:
            raise TypeError(type(obj))

    def emit_view(self, v: View) -> None:
        kind = v.storage_type or _STORAGE_NAMES[v.storage.dtype]
        entry = self.storages.setdefault(id(v.storage), (str(len(self.storages)), v.storage, kind))
        self.glob("torch._utils", "_rebuild_tensor_v2")
        self.w(b"(")
        self.w(b"(")  # persistent id tuple
        self.emit("storage")
        self.glob("torch", kind)
        self.emit(entry[0])
        self.emit("cpu")
        self.emit(int(v.storage.size))
        self.w(b"tQ")
        self.emit(v.offset)
        self.emit(tuple(v.size))
        self.emit(tuple(v.stride))
        self.emit(False)
        self.ordered_dict_empty()
        self.w(b"tR")


def write_torch_zip(path: Path, obj: Any, prefix: str = "archive") -> Path:
    """Write `obj` the way torch.save does (zip format, pickle protocol 2), without torch."""
    writer = _TorchPickleWriter()
    writer.w(b"\x80\x02")
    writer.emit(obj)
    writer.w(b".")
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr(f"{prefix}/data.pkl", writer.out.getvalue())
        z.writestr(f"{prefix}/byteorder", "little")
        for key, array, _ in writer.storages.values():
            z.writestr(f"{prefix}/data/{key}", array.astype(array.dtype.newbyteorder("<")).tobytes())
        z.writestr(f"{prefix}/version", "3\n")
    return path


# --------------------------------------------------------------------------------------------
# Synthetic openai-whisper weights and the canonical parameters they must map to
# --------------------------------------------------------------------------------------------
def openai_state(dtype: Any = np.float16, with_encoder_pos: bool = True) -> dict[str, np.ndarray]:
    """A tiny openai-whisper state dict; every tensor has distinct random values."""
    rng = np.random.default_rng(0)
    shapes: dict[str, tuple[int, ...]] = {
        "encoder.conv1.weight": (D, DIMS.n_mels, 3), "encoder.conv1.bias": (D,),
        "encoder.conv2.weight": (D, D, 3), "encoder.conv2.bias": (D,),
        "encoder.positional_embedding": (DIMS.n_audio_ctx, D),
        "encoder.ln_post.weight": (D,), "encoder.ln_post.bias": (D,),
        "decoder.token_embedding.weight": (DIMS.n_vocab, D),
        "decoder.positional_embedding": (DIMS.n_text_ctx, D),
        "decoder.ln.weight": (D,), "decoder.ln.bias": (D,),
    }
    for side, attns in (("encoder", ("attn",)), ("decoder", ("attn", "cross_attn"))):
        b = f"{side}.blocks.0"
        for attn in attns:
            shapes |= {f"{b}.{attn}_ln.weight": (D,), f"{b}.{attn}_ln.bias": (D,)}
            for proj in ("query", "key", "value", "out"):
                shapes[f"{b}.{attn}.{proj}.weight"] = (D, D)
                if proj != "key":
                    shapes[f"{b}.{attn}.{proj}.bias"] = (D,)
        shapes |= {f"{b}.mlp_ln.weight": (D,), f"{b}.mlp_ln.bias": (D,),
                   f"{b}.mlp.0.weight": (N_MLP, D), f"{b}.mlp.0.bias": (N_MLP,),
                   f"{b}.mlp.2.weight": (D, N_MLP), f"{b}.mlp.2.bias": (D,)}
    if not with_encoder_pos:
        del shapes["encoder.positional_embedding"]
    return {k: rng.standard_normal(s).astype(dtype) for k, s in shapes.items()}


def reference_sinusoids(length: int, channels: int) -> np.ndarray:
    """openai whisper's formula, written out independently in float64."""
    inv = np.exp(-np.log(10000) / (channels // 2 - 1) * np.arange(channels // 2))
    t = np.arange(length)[:, None] * inv[None, :]
    return np.concatenate([np.sin(t), np.cos(t)], axis=1)


def expected_canonical(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The canonical parameters, spelled out name by name from qbench.models.whisper's list."""
    z = np.zeros(D, dtype=sd["encoder.conv1.bias"].dtype)
    e, d = "encoder.blocks.0", "decoder.blocks.0"
    exp = {
        "encoder.conv1.weight": sd["encoder.conv1.weight"], "encoder.conv1.bias": sd["encoder.conv1.bias"],
        "encoder.conv2.weight": sd["encoder.conv2.weight"], "encoder.conv2.bias": sd["encoder.conv2.bias"],
        "encoder.positional_embedding": sd.get("encoder.positional_embedding"),
        "encoder.ln_post.weight": sd["encoder.ln_post.weight"], "encoder.ln_post.bias": sd["encoder.ln_post.bias"],
        "decoder.token_embedding.weight": sd["decoder.token_embedding.weight"],
        "decoder.positional_embedding": sd["decoder.positional_embedding"],
        "decoder.ln.weight": sd["decoder.ln.weight"], "decoder.ln.bias": sd["decoder.ln.bias"],
        f"{d}.cross_attn.q.weight": sd[f"{d}.cross_attn.query.weight"],
        f"{d}.cross_attn.q.bias": sd[f"{d}.cross_attn.query.bias"],
        f"{d}.cross_attn.kv.weight": np.concatenate([sd[f"{d}.cross_attn.key.weight"], sd[f"{d}.cross_attn.value.weight"]]),
        f"{d}.cross_attn.kv.bias": np.concatenate([z, sd[f"{d}.cross_attn.value.bias"]]),
        f"{d}.cross_attn.out.weight": sd[f"{d}.cross_attn.out.weight"],
        f"{d}.cross_attn.out.bias": sd[f"{d}.cross_attn.out.bias"],
        f"{d}.cross_attn_ln.weight": sd[f"{d}.cross_attn_ln.weight"],
        f"{d}.cross_attn_ln.bias": sd[f"{d}.cross_attn_ln.bias"],
    }
    for b in (e, d):
        exp |= {
            f"{b}.attn_ln.weight": sd[f"{b}.attn_ln.weight"], f"{b}.attn_ln.bias": sd[f"{b}.attn_ln.bias"],
            f"{b}.attn.qkv.weight": np.concatenate(
                [sd[f"{b}.attn.query.weight"], sd[f"{b}.attn.key.weight"], sd[f"{b}.attn.value.weight"]]),
            f"{b}.attn.qkv.bias": np.concatenate([sd[f"{b}.attn.query.bias"], z, sd[f"{b}.attn.value.bias"]]),
            f"{b}.attn.out.weight": sd[f"{b}.attn.out.weight"], f"{b}.attn.out.bias": sd[f"{b}.attn.out.bias"],
            f"{b}.mlp_ln.weight": sd[f"{b}.mlp_ln.weight"], f"{b}.mlp_ln.bias": sd[f"{b}.mlp_ln.bias"],
            f"{b}.mlp.fc1.weight": sd[f"{b}.mlp.0.weight"], f"{b}.mlp.fc1.bias": sd[f"{b}.mlp.0.bias"],
            f"{b}.mlp.fc2.weight": sd[f"{b}.mlp.2.weight"], f"{b}.mlp.fc2.bias": sd[f"{b}.mlp.2.bias"],
        }
    return exp


def assert_params_equal(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)
    for name, value in want.items():
        assert got[name].dtype == value.dtype, name
        assert got[name].shape == value.shape, name
        np.testing.assert_array_equal(got[name], value, err_msg=name)


def openai_checkpoint(tmp_path: Path, sd: dict[str, np.ndarray], prefix: str = "tiny.en") -> Path:
    return write_torch_zip(tmp_path / "tiny.pt",
                           {"dims": dataclasses.asdict(DIMS), "model_state_dict": OrderedDict(sd)},
                           prefix=prefix)


# --------------------------------------------------------------------------------------------
# torch_pickle
# --------------------------------------------------------------------------------------------
def test_torch_zip_strides_offsets_shared_storage_and_dtypes(tmp_path: Path) -> None:
    shared = np.arange(24, dtype=np.float32)
    bf16_values = np.array([1.0, -2.5, 0.15625, 3.0e38], dtype=np.float32)
    bf16_bits = (bf16_values.view(np.uint32) >> 16).astype(np.uint16)
    obj = {
        "nested": {"transposed": View(shared, 0, (4, 3), (1, 4)),      # a 3x4 matrix's .T
                   "window": View(shared, 5, (2, 2), (6, 1))},         # offset + row stride
        "param": Param(np.array([[1, 2], [3, 4]], dtype=np.float16)),
        "bf16": View(bf16_bits, 0, (4,), (1,), storage_type="BFloat16Storage"),
        "ints": [np.array([-(2**40), 7], dtype=np.int64), np.array([1, -2], dtype=np.int32),
                 np.array([-3], dtype=np.int8), np.array([250], dtype=np.uint8)],
        "mask": np.array([True, False, True]),
        "scalar": View(np.array([9.5], dtype=np.float32), 0, (), ()),
        "meta": ("text", 3, 1.5, True),
    }
    got = load_torch_checkpoint(write_torch_zip(tmp_path / "x.pt", obj, prefix="weird_name"))
    np.testing.assert_array_equal(got["nested"]["transposed"], shared[:12].reshape(3, 4).T)
    assert got["nested"]["transposed"].flags.c_contiguous
    np.testing.assert_array_equal(got["nested"]["window"], [[5, 6], [11, 12]])
    assert got["param"].dtype == np.float16
    np.testing.assert_array_equal(got["param"], [[1, 2], [3, 4]])
    assert got["bf16"].dtype == np.float32
    truncated = (bf16_values.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)
    np.testing.assert_array_equal(got["bf16"], truncated)
    assert got["bf16"][:3].tolist() == [1.0, -2.5, 0.15625] and truncated[3] != bf16_values[3]
    assert [a.dtype for a in got["ints"]] == [np.int64, np.int32, np.int8, np.uint8]
    assert [a.tolist() for a in got["ints"]] == [[-(2**40), 7], [1, -2], [-3], [250]]
    assert got["mask"].dtype == np.bool_ and got["mask"].tolist() == [True, False, True]
    assert got["scalar"].shape == () and float(got["scalar"]) == 9.5
    assert got["meta"] == ("text", 3, 1.5, True)


def test_state_dict_is_found_flat_or_wrapped(tmp_path: Path) -> None:
    sd = OrderedDict(a=np.ones((2, 3), np.float32), b=np.zeros(4, np.float16))
    flat = load_torch_state_dict(write_torch_zip(tmp_path / "flat.bin", sd))
    wrapped = load_torch_state_dict(write_torch_zip(tmp_path / "w.pt", {"dims": {"x": 1}, "model_state_dict": sd}))
    for got in (flat, wrapped):
        assert list(got) == ["a", "b"]
        np.testing.assert_array_equal(got["a"], sd["a"])
        assert got["b"].dtype == np.float16
    with pytest.raises(CheckpointError, match="no state dict"):
        load_torch_state_dict(write_torch_zip(tmp_path / "n.pt", {"epoch": 3}))


def test_disallowed_pickle_class_is_refused(tmp_path: Path) -> None:
    path = write_torch_zip(tmp_path / "evil.pt", {"x": Global("os", "system", ("true",))})
    with pytest.raises(CheckpointError, match=r"evil\.pt.*os\.system"):
        load_torch_checkpoint(path)


def test_truncated_and_corrupt_zip(tmp_path: Path) -> None:
    good = openai_checkpoint(tmp_path, openai_state())
    data = good.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"truncated\.pt.*(corrupt|truncated)"):
        load_torch_checkpoint(truncated)
    # intact directory, damaged storage bytes: the CRC check must surface as CheckpointError
    with zipfile.ZipFile(good) as z:
        info = z.getinfo("tiny.en/data/3")
    damaged = bytearray(data)
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    damaged[start] ^= 0xFF
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(bytes(damaged))
    with pytest.raises(CheckpointError, match=r"corrupt\.pt.*corrupt"):
        load_openai_whisper(corrupt)


def test_storage_shorter_than_declared(tmp_path: Path) -> None:
    path = write_torch_zip(tmp_path / "short.pt", {"w": np.ones(8, np.float32)})
    rewritten = tmp_path / "short2.pt"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(rewritten, "w") as dst:
        for item in src.infolist():
            body = src.read(item)
            dst.writestr(item, body[:12] if item.filename.endswith("data/0") else body)
    with pytest.raises(CheckpointError, match=r"short2\.pt.*holds 12 bytes"):
        load_torch_checkpoint(rewritten)


def test_missing_legacy_and_foreign_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"nope\.pt: no such file"):
        load_torch_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match=r"nope\.pt: no such file"):
        load_openai_whisper(tmp_path / "nope.pt")
    legacy = tmp_path / "legacy.pt"
    legacy.write_bytes(b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.")  # torch's legacy magic number
    with pytest.raises(CheckpointError, match=r"legacy\.pt: legacy .*not supported.*torch\.save"):
        load_torch_checkpoint(legacy)
    foreign = tmp_path / "notes.txt"
    foreign.write_text("hello")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        load_torch_checkpoint(foreign)


# --------------------------------------------------------------------------------------------
# openai-whisper .pt
# --------------------------------------------------------------------------------------------
def test_openai_roundtrip_float16(tmp_path: Path) -> None:
    sd = openai_state(np.float16)
    dims, params = load_openai_whisper(openai_checkpoint(tmp_path, sd))
    assert dims == DIMS
    assert_params_equal(params, expected_canonical(sd))
    qkv = params["encoder.blocks.0.attn.qkv.bias"]
    assert qkv.dtype == np.float16 and not qkv[D:2 * D].any()  # zero key bias, in the middle
    np.testing.assert_array_equal(params["decoder.blocks.0.attn.qkv.weight"][2 * D:],
                                  sd["decoder.blocks.0.attn.value.weight"])


def test_openai_missing_encoder_positional_embedding_uses_sinusoids(tmp_path: Path) -> None:
    sd = openai_state(np.float32, with_encoder_pos=False)
    _, params = load_openai_whisper(openai_checkpoint(tmp_path, sd))
    pos = params["encoder.positional_embedding"]
    assert pos.dtype == np.float32 and pos.shape == (DIMS.n_audio_ctx, D)
    np.testing.assert_allclose(pos, reference_sinusoids(DIMS.n_audio_ctx, D), rtol=0, atol=1e-6)
    want = expected_canonical(sd)
    want["encoder.positional_embedding"] = pos
    assert_params_equal(params, want)


def test_openai_missing_and_unexpected_tensors(tmp_path: Path) -> None:
    sd = openai_state()
    del sd["decoder.blocks.0.cross_attn.value.bias"]
    with pytest.raises(CheckpointError, match=r"tiny\.pt: missing tensor decoder\.blocks\.0\.cross_attn\.value\.bias"):
        load_openai_whisper(openai_checkpoint(tmp_path, sd))
    sd = openai_state()
    sd["decoder.blocks.1.attn_ln.weight"] = np.ones(D, np.float16)
    with pytest.raises(CheckpointError, match=r"unexpected tensors decoder\.blocks\.1\.attn_ln\.weight"):
        load_openai_whisper(openai_checkpoint(tmp_path, sd))
    sd = openai_state()
    sd["encoder.conv1.weight"] = np.ones((D, 80, 3), np.float16)
    with pytest.raises(CheckpointError, match=r"encoder\.conv1\.weight has shape \(8, 80, 3\)"):
        load_openai_whisper(openai_checkpoint(tmp_path, sd))
    path = write_torch_zip(tmp_path / "flat.pt", OrderedDict(openai_state()))
    with pytest.raises(CheckpointError, match=r"flat\.pt: not an openai-whisper checkpoint"):
        load_openai_whisper(path)


# --------------------------------------------------------------------------------------------
# Hugging Face directories
# --------------------------------------------------------------------------------------------
def to_hf(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """openai names -> HF names, written out by hand (independent of the loader's regexes)."""
    table = {
        "encoder.conv1.weight": "model.encoder.conv1.weight", "encoder.conv1.bias": "model.encoder.conv1.bias",
        "encoder.conv2.weight": "model.encoder.conv2.weight", "encoder.conv2.bias": "model.encoder.conv2.bias",
        "encoder.positional_embedding": "model.encoder.embed_positions.weight",
        "encoder.ln_post.weight": "model.encoder.layer_norm.weight",
        "encoder.ln_post.bias": "model.encoder.layer_norm.bias",
        "decoder.token_embedding.weight": "model.decoder.embed_tokens.weight",
        "decoder.positional_embedding": "model.decoder.embed_positions.weight",
        "decoder.ln.weight": "model.decoder.layer_norm.weight", "decoder.ln.bias": "model.decoder.layer_norm.bias",
    }
    parts = {"attn_ln": "self_attn_layer_norm", "cross_attn_ln": "encoder_attn_layer_norm",
             "mlp_ln": "final_layer_norm", "attn.query": "self_attn.q_proj", "attn.key": "self_attn.k_proj",
             "attn.value": "self_attn.v_proj", "attn.out": "self_attn.out_proj",
             "cross_attn.query": "encoder_attn.q_proj", "cross_attn.key": "encoder_attn.k_proj",
             "cross_attn.value": "encoder_attn.v_proj", "cross_attn.out": "encoder_attn.out_proj",
             "mlp.0": "fc1", "mlp.2": "fc2"}
    out = {}
    for name, value in sd.items():
        if name in table:
            out[table[name]] = value
            continue
        side, _, i, rest = name.split(".", 3)
        module, leaf = rest.rsplit(".", 1)
        out[f"model.{side}.layers.{i}.{parts[module]}.{leaf}"] = value
    assert len(out) == len(sd)
    return out


HF_CONFIG = {"model_type": "whisper", "num_mel_bins": 4, "max_source_positions": 6, "d_model": 8,
             "encoder_attention_heads": 2, "encoder_layers": 1, "vocab_size": 16,
             "max_target_positions": 5, "decoder_attention_heads": 2, "decoder_layers": 1}


def hf_dir(tmp_path: Path, name: str) -> Path:
    directory = tmp_path / name
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(HF_CONFIG))
    return directory


def test_hf_safetensors_roundtrip(tmp_path: Path) -> None:
    sd = openai_state(np.float16)
    hf = to_hf(sd)
    directory = hf_dir(tmp_path, "single")
    save_file(hf | {"proj_out.weight": hf["model.decoder.embed_tokens.weight"].copy()},
              str(directory / "model.safetensors"))
    dims, params = load_hf_whisper(directory)
    assert dims == DIMS
    assert_params_equal(params, expected_canonical(sd))


def test_hf_sharded_safetensors(tmp_path: Path) -> None:
    sd = openai_state(np.float32)
    hf = to_hf(sd)
    directory = hf_dir(tmp_path, "sharded")
    names = sorted(hf)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: hf[k] for k in keys}, str(directory / file))
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    _, params = load_hf_whisper(directory)
    assert_params_equal(params, expected_canonical(sd))


def test_hf_pytorch_model_bin(tmp_path: Path) -> None:
    sd = openai_state(np.float16)
    directory = hf_dir(tmp_path, "bin")
    write_torch_zip(directory / "pytorch_model.bin", OrderedDict(to_hf(sd)))
    _, params = load_hf_whisper(directory)
    assert_params_equal(params, expected_canonical(sd))


def test_hf_safetensors_wins_over_pytorch_model_bin(tmp_path: Path) -> None:
    """A repo publishing both: the safetensors weights are the ones loaded, the pickle is not opened."""
    sd = openai_state(np.float16)
    directory = hf_dir(tmp_path, "both")
    save_file(to_hf(sd), str(directory / "model.safetensors"))
    write_torch_zip(directory / "pytorch_model.bin", {"x": Global("os", "system", ("true",))})
    _, params = load_hf_whisper(directory)
    assert_params_equal(params, expected_canonical(sd))
    (directory / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: refusing to unpickle os\.system"):
        load_hf_whisper(directory)


def test_hf_bfloat16_safetensors_read_by_header(tmp_path: Path) -> None:
    values = np.array([[1.0, -0.5], [2.0, 0.0078125]], dtype=np.float32)
    bits = (values.view(np.uint32) >> 16).astype("<u2").tobytes()
    header = json.dumps({"w": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [0, len(bits)]}}).encode()
    path = tmp_path / "bf16.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bits)
    got = load_safetensors(path)
    assert got["w"].dtype == np.float32
    np.testing.assert_array_equal(got["w"], values)
    path.write_bytes(struct.pack("<Q", len(header)) + header + bits[:5])
    with pytest.raises(CheckpointError, match=r"bf16\.safetensors: truncated"):
        load_safetensors(path)


def test_hf_errors(tmp_path: Path) -> None:
    hf = to_hf(openai_state(np.float32))
    untied = hf_dir(tmp_path, "untied")
    save_file(hf | {"proj_out.weight": np.ones((16, D), np.float32)}, str(untied / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: proj_out\.weight differs"):
        load_hf_whisper(untied)
    missing = hf_dir(tmp_path, "missing")
    save_file({k: v for k, v in hf.items() if "k_proj" not in k or "encoder_attn" not in k},
              str(missing / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing tensor .*cross_attn\.key\.weight"):
        load_hf_whisper(missing)
    no_weights = hf_dir(tmp_path, "empty")
    with pytest.raises(CheckpointError, match=r"empty: no weights found"):
        load_hf_whisper(no_weights)
    no_config = tmp_path / "noconfig"
    no_config.mkdir()
    with pytest.raises(CheckpointError, match=r"config\.json: no such file"):
        load_hf_whisper(no_config)
    garbage = hf_dir(tmp_path, "garbage")
    (garbage / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unreadable safetensors header"):
        load_hf_whisper(garbage)


# --------------------------------------------------------------------------------------------
# Against real torch / transformers output, when those are installed
# --------------------------------------------------------------------------------------------
def test_real_torch_save_reads_identically(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    sd = openai_state(np.float16, with_encoder_pos=False)
    ours = openai_checkpoint(tmp_path, sd)
    theirs = tmp_path / "torch_saved.pt"
    model_state = OrderedDict((k, torch.from_numpy(v.copy())) for k, v in sd.items())
    # a non-contiguous tensor: torch pickles its storage and strides, not a copy
    model_state["decoder.token_embedding.weight"] = torch.from_numpy(
        np.ascontiguousarray(sd["decoder.token_embedding.weight"].T)).t()
    torch.save({"dims": dataclasses.asdict(DIMS), "model_state_dict": model_state}, theirs)
    dims_a, params_a = load_openai_whisper(ours)
    dims_b, params_b = load_openai_whisper(theirs)
    assert dims_a == dims_b == DIMS
    assert_params_equal(params_b, params_a)

    extra = {"bf16": torch.tensor([1.5, -3.0], dtype=torch.bfloat16),
             "param": torch.nn.Parameter(torch.arange(6.0).reshape(2, 3)),
             "view": torch.arange(20, dtype=torch.int64)[3:15].reshape(3, 4)[:, ::2],
             "mask": torch.tensor([True, False])}
    torch.save(extra, tmp_path / "extra.pt")
    got = load_torch_checkpoint(tmp_path / "extra.pt")
    for key, tensor in extra.items():
        want = tensor.detach().float().numpy() if key == "bf16" else tensor.detach().numpy()
        assert got[key].dtype == want.dtype, key
        np.testing.assert_array_equal(got[key], want, err_msg=key)


def test_sinusoids_match_openai_torch_code() -> None:
    torch = pytest.importorskip("torch")

    def openai_sinusoids(length: int, channels: int, max_timescale: int = 10000) -> Any:
        log_timescale_increment = np.log(max_timescale) / (channels // 2 - 1)
        inv_timescales = torch.exp(-log_timescale_increment * torch.arange(channels // 2))
        scaled_time = torch.arange(length)[:, np.newaxis] * inv_timescales[np.newaxis, :]
        return torch.cat([torch.sin(scaled_time), torch.cos(scaled_time)], dim=1)

    for channels in (8, 384):
        want = openai_sinusoids(1500, channels).numpy()
        got = sinusoids(1500, channels)
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=0, atol=5e-5)


def test_real_transformers_whisper_directory(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.WhisperConfig(
        vocab_size=16, num_mel_bins=4, d_model=8, encoder_layers=1, encoder_attention_heads=2,
        decoder_layers=1, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        max_source_positions=6, max_target_positions=5, pad_token_id=1, bos_token_id=2,
        eos_token_id=3, decoder_start_token_id=2, suppress_tokens=[], begin_suppress_tokens=[])
    torch.manual_seed(0)
    model = transformers.WhisperForConditionalGeneration(config)
    model.save_pretrained(tmp_path / "st")
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "config.json").write_text((tmp_path / "st" / "config.json").read_text())
    torch.save(model.state_dict(), bin_dir / "pytorch_model.bin")
    for directory in (tmp_path / "st", bin_dir):
        dims, params = load_hf_whisper(directory)
        assert dims == DIMS
        sa = "model.encoder.layers.0.self_attn"
        np.testing.assert_array_equal(
            params["encoder.blocks.0.attn.qkv.weight"],
            np.concatenate([state[f"{sa}.q_proj.weight"], state[f"{sa}.k_proj.weight"], state[f"{sa}.v_proj.weight"]]))
        np.testing.assert_array_equal(
            params["encoder.blocks.0.attn.qkv.bias"],
            np.concatenate([state[f"{sa}.q_proj.bias"], np.zeros(D, np.float32), state[f"{sa}.v_proj.bias"]]))
        ca = "model.decoder.layers.0.encoder_attn"
        np.testing.assert_array_equal(params["decoder.blocks.0.cross_attn.kv.weight"],
                                      np.concatenate([state[f"{ca}.k_proj.weight"], state[f"{ca}.v_proj.weight"]]))
        np.testing.assert_array_equal(params["encoder.positional_embedding"],
                                      state["model.encoder.embed_positions.weight"])
        np.testing.assert_array_equal(params["decoder.token_embedding.weight"], state["proj_out.weight"])
        assert len(params) == 43
