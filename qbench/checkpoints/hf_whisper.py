"""Load a Hugging Face `WhisperForConditionalGeneration` directory without torch.

Why: fine-tuned and distilled Whisper variants are published on the Hub in this layout only.
The directory holds `config.json` plus weights as `model.safetensors`, sharded
`model-0000i-of-0000n.safetensors` with `model.safetensors.index.json`, or (older uploads)
`pytorch_model.bin`. Safetensors is taken whenever it is there; only a directory without it
reaches the pickle reader in `torch_pickle`, which is imported for that case alone.

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
from qbench.checkpoints.safetensors_reader import load_safetensors
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


def _load_torch_state_dict(path: Path) -> dict[str, np.ndarray]:
    # imported here so that a safetensors directory never loads the unpickler
    from qbench.checkpoints.torch_pickle import load_torch_state_dict

    return load_torch_state_dict(path)


def _load_weights(directory: Path) -> tuple[dict[str, np.ndarray], Path]:
    # safetensors first: when a repo publishes both, the pickle is never opened
    candidates = [
        ("model.safetensors", load_safetensors, False),
        ("model.safetensors.index.json", load_safetensors, True),
        ("pytorch_model.bin", _load_torch_state_dict, False),
        ("pytorch_model.bin.index.json", _load_torch_state_dict, True),
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
