"""Load a Hugging Face `WhisperForConditionalGeneration` directory without torch.

Why: fine-tuned and distilled Whisper variants are published on the Hub in this layout only.
The directory holds `config.json` plus weights as `model.safetensors`, sharded
`model-0000i-of-0000n.safetensors` with `model.safetensors.index.json`, or (older uploads)
`pytorch_model.bin` (read with the torch-free reader in `torch_pickle`).

HF names are renamed to openai-whisper's and then go through the same mapping as `.pt` files
(`convert_openai_state_dict`), so there is one audited place where q/k/v are fused; error
messages still quote the HF names found in the user's files.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from qbench.checkpoints.errors import CheckpointError
from qbench.checkpoints.openai_whisper import convert_openai_state_dict
from qbench.checkpoints.torch_pickle import bfloat16_to_float32, load_torch_state_dict
from qbench.models.whisper import ModelDimensions

__all__ = ["load_hf_whisper", "dims_from_hf_config", "load_safetensors", "hf_to_openai_name"]

# ModelDimensions field <- config.json key
_CONFIG_FIELDS: dict[str, str] = {
    "n_mels": "num_mel_bins",
    "n_audio_ctx": "max_source_positions",
    "n_audio_state": "d_model",
    "n_audio_head": "encoder_attention_heads",
    "n_audio_layer": "encoder_layers",
    "n_vocab": "vocab_size",
    "n_text_ctx": "max_target_positions",
    "n_text_state": "d_model",
    "n_text_head": "decoder_attention_heads",
    "n_text_layer": "decoder_layers",
}

_SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"), "I64": np.dtype("<i8"), "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}

# Ordered (pattern, replacement) pairs applied to a name with the `model.` prefix removed.
_RENAMES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(p), r) for p, r in [
        (r"^(encoder|decoder)\.layers\.(\d+)\.", r"\1.blocks.\2."),
        (r"\.self_attn_layer_norm\.", ".attn_ln."),
        (r"\.encoder_attn_layer_norm\.", ".cross_attn_ln."),
        (r"\.final_layer_norm\.", ".mlp_ln."),
        (r"\.self_attn\.", ".attn."),
        (r"\.encoder_attn\.", ".cross_attn."),
        (r"\.q_proj\.", ".query."),
        (r"\.k_proj\.", ".key."),
        (r"\.v_proj\.", ".value."),
        (r"\.out_proj\.", ".out."),
        (r"\.fc1\.", ".mlp.0."),
        (r"\.fc2\.", ".mlp.2."),
        (r"^encoder\.layer_norm\.", "encoder.ln_post."),
        (r"^decoder\.layer_norm\.", "decoder.ln."),
        (r"^(encoder|decoder)\.embed_positions\.weight$", r"\1.positional_embedding"),
        (r"^decoder\.embed_tokens\.weight$", "decoder.token_embedding.weight"),
    ]
]


def hf_to_openai_name(name: str) -> str:
    """The openai-whisper name of an HF Whisper parameter (`model.` prefix optional)."""
    if name.startswith("model."):
        name = name[len("model."):]
    for pattern, replacement in _RENAMES:
        name = pattern.sub(replacement, name)
    return name


def dims_from_hf_config(config: Mapping[str, Any], source: str | os.PathLike[str]) -> ModelDimensions:
    """`ModelDimensions` from a transformers `WhisperConfig` dict (config.json)."""
    model_type = config.get("model_type", "whisper")
    if model_type != "whisper":
        raise CheckpointError(f"{source}: model_type is {model_type!r}, expected 'whisper'")
    values: dict[str, int] = {}
    for field, key in _CONFIG_FIELDS.items():
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise CheckpointError(f"{source}: {key} is {value!r}, expected a positive int")
        values[field] = value
    return ModelDimensions(**values)


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


def _load_index(index: Path, loader: Any) -> dict[str, np.ndarray]:
    """Load every shard listed in an HF `*.index.json` and check each listed tensor arrived."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, KeyError, TypeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{index}: unreadable shard index ({e})") from e
    state: dict[str, np.ndarray] = {}
    for shard in sorted(set(weight_map.values())):
        for name, array in loader(index.parent / shard).items():
            if name in state:
                raise CheckpointError(f"{index.parent / shard}: tensor {name} also in another shard")
            state[name] = array
    missing = sorted(set(weight_map) - set(state))
    if missing:
        raise CheckpointError(f"{index}: listed tensor {missing[0]} is in none of the shards")
    return state


def _load_weights(directory: Path) -> tuple[dict[str, np.ndarray], Path]:
    candidates = [
        ("model.safetensors", load_safetensors, False),
        ("model.safetensors.index.json", load_safetensors, True),
        ("pytorch_model.bin", load_torch_state_dict, False),
        ("pytorch_model.bin.index.json", load_torch_state_dict, True),
    ]
    for name, loader, sharded in candidates:
        path = directory / name
        if path.is_file():
            return (_load_index(path, loader) if sharded else loader(path)), path
    names = ", ".join(c[0] for c in candidates)
    raise CheckpointError(f"{directory}: no weights found (looked for {names})")


def load_hf_whisper(directory: str | os.PathLike[str]) -> tuple[ModelDimensions, dict[str, np.ndarray]]:
    """Read an HF Whisper directory; return its dimensions and canonical-name parameters.

    `proj_out.weight` is the output projection, tied to the token embedding in every released
    Whisper; it is dropped when equal and refused otherwise (the numpy decoder assumes tying).
    Arrays keep their stored dtype (BF16 is widened to float32, numpy having no bfloat16).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such directory")
    config_path = directory / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{config_path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{config_path}: unreadable config ({e})") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path}: not a JSON object")
    dims = dims_from_hf_config(config, config_path)

    state, weights_path = _load_weights(directory)
    proj_out = state.pop("proj_out.weight", None)
    renamed: dict[str, np.ndarray] = {}
    display: dict[str, str] = {}
    for name, array in state.items():
        new = hf_to_openai_name(name)
        if new in renamed:
            raise CheckpointError(f"{weights_path}: {display[new]} and {name} map to the same tensor")
        renamed[new] = array
        display[new] = name
    if proj_out is not None:
        embed = renamed.get("decoder.token_embedding.weight")
        if embed is None or not np.array_equal(proj_out, embed):
            raise CheckpointError(
                f"{weights_path}: proj_out.weight differs from the token embedding; untied output "
                "projections are not supported"
            )
    return dims, convert_openai_state_dict(renamed, dims, weights_path, display)
