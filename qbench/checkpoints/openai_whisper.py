"""Load openai-whisper `.pt` checkpoints (tiny.en.pt, ...) into the canonical Whisper names.

Why a mapping at all: the numpy model does one matmul per attention input instead of three,
so query/key/value are fused into `attn.qkv` and cross-attention key/value into
`cross_attn.kv` (see the name list at the top of `qbench.models.whisper`). openai's key
projection has no bias; the fused bias gets zeros there, which is exact.

`convert_openai_state_dict` is also the back half of the Hugging Face loader, which first
renames HF keys to openai's, so both formats go through one audited mapping.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from qbench.checkpoints.errors import CheckpointError
from qbench.models.whisper import ModelDimensions

__all__ = ["load_openai_whisper", "convert_openai_state_dict", "sinusoids", "dims_from_mapping"]


def sinusoids(length: int, channels: int, max_timescale: float = 10000) -> np.ndarray:
    """openai whisper's encoder positional table, `[length, channels]` float32.

    Needed because `encoder.positional_embedding` is a buffer some exporters drop. Follows
    openai's torch code step by step: the arguments are formed in float32 exactly as torch
    forms them (`-inc` rounded to float32 times `arange`, then `t * inv_timescale`), while
    exp/sin/cos are evaluated in float64 and rounded. torch's vectorised float32 exp/sin are
    not correctly rounded, so bitwise equality with its buffer is impossible; this choice
    stays within 3e-5 of it for every released model size (a float64-throughout formula drifts
    to 1e-4 at t=1500 because it does not reproduce torch's float32 argument rounding).
    """
    if channels % 2 != 0 or channels < 4:
        raise ValueError(f"sinusoids needs an even channel count >= 4, got {channels}")
    log_timescale_increment = np.log(max_timescale) / (channels // 2 - 1)
    exponent = np.float32(-log_timescale_increment) * np.arange(channels // 2, dtype=np.float32)
    inv_timescales = np.exp(exponent.astype(np.float64)).astype(np.float32)
    scaled_time = np.arange(length, dtype=np.float32)[:, np.newaxis] * inv_timescales[np.newaxis, :]
    scaled_time = scaled_time.astype(np.float64)
    return np.concatenate([np.sin(scaled_time), np.cos(scaled_time)], axis=1).astype(np.float32)


def dims_from_mapping(dims: Any, source: str | os.PathLike[str]) -> ModelDimensions:
    """`ModelDimensions` from openai's `dims` dict, refusing missing or non-integer fields."""
    if not isinstance(dims, Mapping):
        raise CheckpointError(f"{source}: 'dims' is a {type(dims).__name__}, expected a dict")
    values: dict[str, int] = {}
    for field in dataclasses.fields(ModelDimensions):
        value = dims.get(field.name)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise CheckpointError(f"{source}: dims[{field.name!r}] is {value!r}, expected a positive int")
        values[field.name] = int(value)
    return ModelDimensions(**values)


class _Taker:
    """Pops source tensors by name, checking shapes, so leftovers can be reported at the end.

    `display` maps a source name to the name the user's file actually uses (HF names when the
    HF loader renamed them), so errors point at keys that exist in the user's world.
    """

    def __init__(self, state: Mapping[str, np.ndarray], source: str,
                 display: Mapping[str, str] | None):
        self.remaining = dict(state)
        self.source = source
        self.display = display or {}

    def name(self, key: str) -> str:
        return self.display.get(key, key)

    def take(self, key: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        if key not in self.remaining:
            raise CheckpointError(f"{self.source}: missing tensor {self.name(key)}")
        value = self.remaining.pop(key)
        if not isinstance(value, np.ndarray):
            raise CheckpointError(f"{self.source}: {self.name(key)} is a {type(value).__name__}, not a tensor")
        if shape is not None and value.shape != shape:
            raise CheckpointError(
                f"{self.source}: {self.name(key)} has shape {value.shape}, dims imply {shape}"
            )
        return value

    def take_optional(self, key: str, shape: tuple[int, ...]) -> np.ndarray | None:
        return self.take(key, shape) if key in self.remaining else None


def _linear(t: _Taker, out: dict[str, np.ndarray], src: str, dst: str,
            shape: tuple[int, int]) -> None:
    out[f"{dst}.weight"] = t.take(f"{src}.weight", shape)
    out[f"{dst}.bias"] = t.take(f"{src}.bias", (shape[0],))


def _norm(t: _Taker, out: dict[str, np.ndarray], src: str, dst: str, d: int) -> None:
    out[f"{dst}.weight"] = t.take(f"{src}.weight", (d,))
    out[f"{dst}.bias"] = t.take(f"{src}.bias", (d,))


def _key_bias(t: _Taker, src: str, d: int, like: np.ndarray) -> np.ndarray:
    """openai's key projection has no bias; an exporter that added one keeps it (exact)."""
    bias = t.take_optional(f"{src}.key.bias", (d,))
    return np.zeros(d, dtype=like.dtype) if bias is None else bias


def _fused_self_attn(t: _Taker, out: dict[str, np.ndarray], src: str, dst: str, d: int) -> None:
    q_w, k_w, v_w = (t.take(f"{src}.{n}.weight", (d, d)) for n in ("query", "key", "value"))
    q_b = t.take(f"{src}.query.bias", (d,))
    v_b = t.take(f"{src}.value.bias", (d,))
    k_b = _key_bias(t, src, d, q_b)
    out[f"{dst}.qkv.weight"] = np.concatenate([q_w, k_w, v_w], axis=0)
    out[f"{dst}.qkv.bias"] = np.concatenate([q_b, k_b, v_b], axis=0)
    _linear(t, out, f"{src}.out", f"{dst}.out", (d, d))


def _cross_attn(t: _Taker, out: dict[str, np.ndarray], src: str, dst: str, d: int) -> None:
    _linear(t, out, f"{src}.query", f"{dst}.q", (d, d))
    k_w = t.take(f"{src}.key.weight", (d, d))
    v_w = t.take(f"{src}.value.weight", (d, d))
    v_b = t.take(f"{src}.value.bias", (d,))
    k_b = _key_bias(t, src, d, v_b)
    out[f"{dst}.kv.weight"] = np.concatenate([k_w, v_w], axis=0)
    out[f"{dst}.kv.bias"] = np.concatenate([k_b, v_b], axis=0)
    _linear(t, out, f"{src}.out", f"{dst}.out", (d, d))


def _mlp(t: _Taker, out: dict[str, np.ndarray], src: str, dst: str, d: int) -> None:
    fc1_w = t.take(f"{src}.0.weight")
    if fc1_w.ndim != 2 or fc1_w.shape[1] != d:
        raise CheckpointError(f"{t.source}: {t.name(src + '.0.weight')} has shape {fc1_w.shape}, expected [n_mlp, {d}]")
    n_mlp = fc1_w.shape[0]
    out[f"{dst}.fc1.weight"] = fc1_w
    out[f"{dst}.fc1.bias"] = t.take(f"{src}.0.bias", (n_mlp,))
    _linear(t, out, f"{src}.2", f"{dst}.fc2", (d, n_mlp))


def convert_openai_state_dict(
    state: Mapping[str, np.ndarray],
    dims: ModelDimensions,
    source: str | os.PathLike[str] = "<state dict>",
    display_names: Mapping[str, str] | None = None,
) -> dict[str, np.ndarray]:
    """Map an openai-whisper state dict to the canonical names of `qbench.models.whisper`.

    Every tensor is shape-checked against `dims`, and a tensor left unmapped is an error rather
    than silently dropped: a benchmark that quietly ran with a missing layer would be worse
    than no result. Arrays keep their stored dtype (float16 stays float16). A missing
    `encoder.positional_embedding` buffer is recomputed with `sinusoids`.
    """
    source = str(source)
    t = _Taker(state, source, display_names)
    out: dict[str, np.ndarray] = {}
    da, dt = dims.n_audio_state, dims.n_text_state

    _linear(t, out, "encoder.conv1", "encoder.conv1", (da, dims.n_mels, 3))
    _linear(t, out, "encoder.conv2", "encoder.conv2", (da, da, 3))
    pos = t.take_optional("encoder.positional_embedding", (dims.n_audio_ctx, da))
    out["encoder.positional_embedding"] = pos if pos is not None else sinusoids(dims.n_audio_ctx, da)
    for i in range(dims.n_audio_layer):
        src, dst = f"encoder.blocks.{i}", f"encoder.blocks.{i}"
        _norm(t, out, f"{src}.attn_ln", f"{dst}.attn_ln", da)
        _fused_self_attn(t, out, f"{src}.attn", f"{dst}.attn", da)
        _norm(t, out, f"{src}.mlp_ln", f"{dst}.mlp_ln", da)
        _mlp(t, out, f"{src}.mlp", f"{dst}.mlp", da)
    _norm(t, out, "encoder.ln_post", "encoder.ln_post", da)

    out["decoder.token_embedding.weight"] = t.take("decoder.token_embedding.weight", (dims.n_vocab, dt))
    out["decoder.positional_embedding"] = t.take("decoder.positional_embedding", (dims.n_text_ctx, dt))
    for i in range(dims.n_text_layer):
        src, dst = f"decoder.blocks.{i}", f"decoder.blocks.{i}"
        _norm(t, out, f"{src}.attn_ln", f"{dst}.attn_ln", dt)
        _fused_self_attn(t, out, f"{src}.attn", f"{dst}.attn", dt)
        _norm(t, out, f"{src}.cross_attn_ln", f"{dst}.cross_attn_ln", dt)
        _cross_attn(t, out, f"{src}.cross_attn", f"{dst}.cross_attn", dt)
        _norm(t, out, f"{src}.mlp_ln", f"{dst}.mlp_ln", dt)
        _mlp(t, out, f"{src}.mlp", f"{dst}.mlp", dt)
    _norm(t, out, "decoder.ln", "decoder.ln", dt)

    if t.remaining:
        names = sorted(t.name(k) for k in t.remaining)
        more = f" and {len(names) - 5} more" if len(names) > 5 else ""
        raise CheckpointError(f"{source}: unexpected tensors {', '.join(names[:5])}{more} (dims mismatch?)")
    return out


def load_openai_whisper(path: str | os.PathLike[str]) -> tuple[ModelDimensions, dict[str, np.ndarray]]:
    """Read an openai-whisper `.pt` (`{"dims", "model_state_dict"}`) without torch.

    Returns the model dimensions and the canonical-name parameters in their stored dtype.
    Raises `CheckpointError` naming the file for anything missing, malformed or unexpected.
    """
    # imported here: the Hugging Face loader shares this module's mapping, and a safetensors
    # directory must not load the unpickler
    from qbench.checkpoints.torch_pickle import load_torch_checkpoint

    path = Path(path)
    ckpt = load_torch_checkpoint(path)
    if not isinstance(ckpt, Mapping) or "dims" not in ckpt or "model_state_dict" not in ckpt:
        keys = list(ckpt)[:6] if isinstance(ckpt, Mapping) else type(ckpt).__name__
        raise CheckpointError(
            f"{path}: not an openai-whisper checkpoint (expected keys 'dims' and "
            f"'model_state_dict', found {keys})"
        )
    dims = dims_from_mapping(ckpt["dims"], path)
    state = ckpt["model_state_dict"]
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path}: 'model_state_dict' is a {type(state).__name__}, not a dict")
    return dims, convert_openai_state_dict(state, dims, path)
