"""Hugging Face wav2vec 2.0 CTC checkpoints -> `qbench.models.wav2vec2.Wav2Vec2`.

A checkpoint directory holds `config.json`, `vocab.json` and `model.safetensors` (or the older
`pytorch_model.bin`, read only when there is no safetensors file). HF parameter names map to
the canonical names documented in `qbench/models/wav2vec2.py`:

    wav2vec2.feature_extractor.conv_layers.{l}.conv.{weight,bias}  -> feature_encoder.conv.{l}
    wav2vec2.feature_extractor.conv_layers.{l}.layer_norm.*        -> feature_encoder.norm.{l}
    wav2vec2.feature_projection.layer_norm.*                       -> feature_projection.ln
    wav2vec2.feature_projection.projection.*                       -> feature_projection.proj
    wav2vec2.encoder.pos_conv_embed.conv.{weight_g,weight_v,bias}  -> encoder.pos_conv.{g}
        (or ...conv.parametrizations.weight.original0/original1, as transformers >= 4.3x
        saves it): weight norm folded, weight = g * v / ||v||, the norm over dims (0, 1) as
        torch's weight_norm(dim=2) takes it, then split into the conv's groups
    wav2vec2.encoder.layer_norm.*                                  -> encoder.ln
    wav2vec2.encoder.layers.{i}.attention.{q,k,v}_proj.*           -> encoder.blocks.{i}.attn.qkv
    wav2vec2.encoder.layers.{i}.attention.out_proj.*               -> encoder.blocks.{i}.attn.out
    wav2vec2.encoder.layers.{i}.layer_norm.*                       -> encoder.blocks.{i}.attn_ln
    wav2vec2.encoder.layers.{i}.feed_forward.intermediate_dense.*  -> encoder.blocks.{i}.mlp.fc1
    wav2vec2.encoder.layers.{i}.feed_forward.output_dense.*        -> encoder.blocks.{i}.mlp.fc2
    wav2vec2.encoder.layers.{i}.final_layer_norm.*                 -> encoder.blocks.{i}.mlp_ln
    lm_head.*                                                      -> lm_head

`wav2vec2.masked_spec_embed` (SpecAugment's mask vector) and the pretraining quantizer /
projection weights are not used at inference and are dropped.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from qbench.checkpoints.errors import CheckpointError
from qbench.checkpoints.safetensors_reader import load_safetensors, tensor_sizes
from qbench.models.wav2vec2 import Wav2Vec2, Wav2Vec2Config

_DOWNLOAD_HINT = ("`qbench download-model wav2vec2-base-960h` (or wav2vec2-large-960h-lv60-self) fetches a "
                  "complete one, which `--model` then finds without --weights")

_RENAMES = [
    (r"wav2vec2\.feature_extractor\.conv_layers\.(\d+)\.conv\.", r"feature_encoder.conv.\1."),
    (r"wav2vec2\.feature_extractor\.conv_layers\.(\d+)\.layer_norm\.", r"feature_encoder.norm.\1."),
    (r"wav2vec2\.feature_projection\.layer_norm\.", "feature_projection.ln."),
    (r"wav2vec2\.feature_projection\.projection\.", "feature_projection.proj."),
    (r"wav2vec2\.encoder\.layer_norm\.", "encoder.ln."),
    (r"wav2vec2\.encoder\.layers\.(\d+)\.attention\.out_proj\.", r"encoder.blocks.\1.attn.out."),
    (r"wav2vec2\.encoder\.layers\.(\d+)\.layer_norm\.", r"encoder.blocks.\1.attn_ln."),
    (r"wav2vec2\.encoder\.layers\.(\d+)\.feed_forward\.intermediate_dense\.", r"encoder.blocks.\1.mlp.fc1."),
    (r"wav2vec2\.encoder\.layers\.(\d+)\.feed_forward\.output_dense\.", r"encoder.blocks.\1.mlp.fc2."),
    (r"wav2vec2\.encoder\.layers\.(\d+)\.final_layer_norm\.", r"encoder.blocks.\1.mlp_ln."),
    (r"lm_head\.", "lm_head."),
]
_QKV = re.compile(r"wav2vec2\.encoder\.layers\.(\d+)\.attention\.([qkv])_proj\.(weight|bias)")
_POS = "wav2vec2.encoder.pos_conv_embed.conv."
_IGNORED = re.compile(r"wav2vec2\.masked_spec_embed|quantizer\.|project_q\.|project_hid\.")


def load_hf_wav2vec2(directory: str | Path, name: str | None = None) -> Wav2Vec2:
    """The wav2vec2 CTC model in an HF checkpoint directory, weights kept at stored precision."""
    directory = Path(directory)
    for needed in ("config.json", "vocab.json"):
        if not (directory / needed).is_file():
            raise CheckpointError(f"{directory}: no {needed}; " + _DOWNLOAD_HINT)
    try:
        config = Wav2Vec2Config.from_hf(json.loads((directory / "config.json").read_text()))
    except (ValueError, TypeError) as e:  # bad JSON or an architecture variant not implemented
        raise CheckpointError(f"{directory / 'config.json'}: {e}") from None
    token_ids = json.loads((directory / "vocab.json").read_text())
    if sorted(token_ids.values()) != list(range(config.vocab_size)):
        raise CheckpointError(f"{directory / 'vocab.json'}: ids are not 0..{config.vocab_size - 1} (vocab_size)")
    vocab = sorted(token_ids, key=token_ids.__getitem__)
    weights, state = _load_state_dict(directory)
    try:
        return Wav2Vec2.from_params(config, hf_to_canonical(state, config), vocab, name or directory.name)
    except (CheckpointError, KeyError, ValueError) as e:  # missing or misshapen parameters
        raise CheckpointError(f"{weights}: {e}") from None


def checkpoint_parameter_count(directory: str | Path) -> int:
    """Parameters in a wav2vec2 checkpoint directory as torch counts `model.parameters()` (every
    tensor of the state dict, weight-norm halves included), for weights no card describes: from
    the safetensors header, or by reading the pickle when that is all there is."""
    directory = Path(directory)
    if (path := directory / "model.safetensors").is_file():
        return sum(tensor_sizes(path).values())
    return sum(int(v.size) for v in _load_state_dict(directory)[1].values())


def _load_state_dict(directory: Path) -> tuple[Path, dict[str, np.ndarray]]:
    # safetensors first: when a repo publishes both, the pickle is never opened
    if (path := directory / "model.safetensors").is_file():
        return path, load_safetensors(path)
    if (path := directory / "pytorch_model.bin").is_file():
        # imported here so that safetensors users never load the unpickler
        from qbench.checkpoints.torch_pickle import load_torch_state_dict

        return path, load_torch_state_dict(path)
    raise CheckpointError(
        f"{directory}: no model.safetensors or pytorch_model.bin; " + _DOWNLOAD_HINT)


def hf_to_canonical(state: dict[str, np.ndarray], config: Wav2Vec2Config) -> dict[str, np.ndarray]:
    """HF `Wav2Vec2ForCTC` state dict -> canonical parameters (see the module docstring)."""
    params: dict[str, np.ndarray] = {}
    qkv: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    pos: dict[str, np.ndarray] = {}
    unknown = []
    for key, value in state.items():
        if m := _QKV.fullmatch(key):
            qkv.setdefault((m[1], m[3]), {})[m[2]] = value
            continue
        if key.startswith(_POS):
            pos[key[len(_POS):]] = value
            continue
        for pattern, repl in _RENAMES:
            new, hits = re.subn("^" + pattern, repl, key)
            if hits:
                params[new] = value
                break
        else:
            if not _IGNORED.match(key):
                unknown.append(key)
    if unknown:
        raise CheckpointError(f"unexpected wav2vec2 parameters: {', '.join(sorted(unknown)[:5])} ...")
    for (layer, kind), parts in qkv.items():
        params[f"encoder.blocks.{layer}.attn.qkv.{kind}"] = np.concatenate([parts["q"], parts["k"], parts["v"]])
    params.update(_split_pos_conv(pos, config))
    return params


def _split_pos_conv(pos: dict[str, np.ndarray], config: Wav2Vec2Config) -> dict[str, np.ndarray]:
    g_key = next((k for k in ("weight_g", "parametrizations.weight.original0") if k in pos), None)
    v_key = next((k for k in ("weight_v", "parametrizations.weight.original1") if k in pos), None)
    if g_key and v_key:
        g, v = pos[g_key].astype(np.float32), pos[v_key].astype(np.float32)  # g [1, 1, K]
        weight = v * (g / np.sqrt(np.sum(np.square(v), axis=(0, 1), keepdims=True)))
    elif "weight" in pos:  # already folded (a re-exported checkpoint)
        weight = pos["weight"]
    else:
        raise CheckpointError(f"positional conv weight not found among {sorted(pos)}")
    groups = config.num_conv_pos_embedding_groups
    out: dict[str, np.ndarray] = {}
    for g, (w, b) in enumerate(zip(np.split(weight, groups), np.split(pos["bias"], groups))):
        out[f"encoder.pos_conv.{g}.weight"] = np.ascontiguousarray(w)
        out[f"encoder.pos_conv.{g}.bias"] = b
    return out
