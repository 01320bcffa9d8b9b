"""Seeded Whisper checkpoints of any shape, written by the tests in every format qbench reads.

Nothing here uses qbench's loaders or name mappings: each format is written from its own
documentation (openai's state-dict names, Hugging Face's, CTranslate2's `WhisperSpec` variable
names), so a loader that maps a name wrongly fails against these files. The vocabularies are
built from the published layout of Whisper's special tokens, so prompt ids can be asserted
against openai's constants.
"""

from __future__ import annotations

import dataclasses
import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file
from test_checkpoints import to_hf, write_torch_zip
from test_ctranslate2 import write_ct2

from qbench.models.whisper import ModelDimensions

# openai's language tokens in id order (generation_config.json's lang_to_id of openai/whisper-base)
LANGUAGES = (
    "en zh de es ru ko fr ja pt tr pl ca nl ar sv it id hi fi vi he uk el ms cs ro da hu ta no th ur hr bg lt la mi "
    "ml cy sk te fa lv bn sr az sl kn et mk br eu is hy ne mn bs kk sq sw gl mr pa si km sn yo so af oc ka be tg sd "
    "gu am yi lo uz fo ht ps tk nn mt sa lb my bo tl mg as tt haw ln ha ba jw su"
).split()
assert len(LANGUAGES) == 99


def whisper_tokens(multilingual: bool) -> list[str]:
    """A full Whisper vocabulary: byte-level tokens (" w0", " w1", ... as GPT-2 byte characters),
    then the special tokens and 1501 timestamps in openai's order. English-only: 50256 ordinary
    tokens (51864 in all); multilingual: 50257 (51865)."""
    ordinary = [f"\u0120w{i}" for i in range(50257 if multilingual else 50256)]
    specials = ["<|endoftext|>", "<|startoftranscript|>"] + [f"<|{code}|>" for code in LANGUAGES]
    specials += ["<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>",
                 "<|nospeech|>" if multilingual else "<|nocaptions|>", "<|notimestamps|>"]
    timestamps = [f"<|{0.02 * i:.2f}|>" for i in range(1501)]
    return ordinary + specials + timestamps


def dims_of(d: int, heads: int, encoder_layers: int, decoder_layers: int, n_vocab: int,
            n_audio_ctx: int = 1500, n_text_ctx: int = 448, n_mels: int = 80) -> ModelDimensions:
    return ModelDimensions(n_mels=n_mels, n_audio_ctx=n_audio_ctx, n_audio_state=d, n_audio_head=heads,
                           n_audio_layer=encoder_layers, n_vocab=n_vocab, n_text_ctx=n_text_ctx, n_text_state=d,
                           n_text_head=heads, n_text_layer=decoder_layers)


def openai_shapes(dims: ModelDimensions) -> dict[str, tuple[int, ...]]:
    """Every tensor of an openai-whisper state dict of `dims`, by name (model.py's modules)."""
    d, t = dims.n_audio_state, dims.n_text_state
    shapes: dict[str, tuple[int, ...]] = {
        "encoder.conv1.weight": (d, dims.n_mels, 3), "encoder.conv1.bias": (d,),
        "encoder.conv2.weight": (d, d, 3), "encoder.conv2.bias": (d,),
        "encoder.positional_embedding": (dims.n_audio_ctx, d),
        "encoder.ln_post.weight": (d,), "encoder.ln_post.bias": (d,),
        "decoder.token_embedding.weight": (dims.n_vocab, t),
        "decoder.positional_embedding": (dims.n_text_ctx, t),
        "decoder.ln.weight": (t,), "decoder.ln.bias": (t,),
    }
    for side, layers, w, attns in (("encoder", dims.n_audio_layer, d, ("attn",)),
                                   ("decoder", dims.n_text_layer, t, ("attn", "cross_attn"))):
        for i in range(layers):
            b = f"{side}.blocks.{i}"
            for attn in attns:
                shapes |= {f"{b}.{attn}_ln.weight": (w,), f"{b}.{attn}_ln.bias": (w,)}
                for proj in ("query", "key", "value", "out"):
                    shapes[f"{b}.{attn}.{proj}.weight"] = (w, w)
                    if proj != "key":  # openai's key projections have no bias
                        shapes[f"{b}.{attn}.{proj}.bias"] = (w,)
            shapes |= {f"{b}.mlp_ln.weight": (w,), f"{b}.mlp_ln.bias": (w,),
                       f"{b}.mlp.0.weight": (4 * w, w), f"{b}.mlp.0.bias": (4 * w,),
                       f"{b}.mlp.2.weight": (w, 4 * w), f"{b}.mlp.2.bias": (w,)}
    return shapes


def openai_state(dims: ModelDimensions, seed: int = 0, dtype=np.float16, scale: float = 0.02) -> dict[str, np.ndarray]:
    """Seeded openai-whisper weights of `dims`: small random values (a network that runs without
    overflowing), layer-norm gains near 1."""
    rng = np.random.default_rng(seed)
    state = {}
    for name, shape in openai_shapes(dims).items():
        values = rng.standard_normal(shape, dtype=np.float32) * scale
        if name.endswith(("ln.weight", "ln_post.weight")) or "_ln.weight" in name:
            values += 1.0
        state[name] = values.astype(dtype)
    return state


def ending_after_one_token(state: dict[str, np.ndarray], eot: int) -> dict[str, np.ndarray]:
    """The same weights, except that the decoder's output is a constant vector that only the
    end-of-text embedding points along: after the first token (where end-of-text is
    suppressed) greedy decoding stops, so a run of a seeded model takes seconds, not a 224-token
    loop."""
    state = dict(state)
    direction = np.full(state["decoder.ln.bias"].shape, 0.5, dtype=state["decoder.ln.bias"].dtype)
    state["decoder.ln.weight"] = np.zeros_like(state["decoder.ln.weight"])
    state["decoder.ln.bias"] = direction
    embedding = state["decoder.token_embedding.weight"].copy()
    embedding[eot] = direction
    state["decoder.token_embedding.weight"] = embedding
    return state


def write_openai_pt(path: Path, dims: ModelDimensions, state: dict[str, np.ndarray]) -> Path:
    """`{"dims", "model_state_dict"}` as torch.save writes it (without torch)."""
    return write_torch_zip(path, {"dims": dataclasses.asdict(dims), "model_state_dict": OrderedDict(state)})


def write_hf_dir(directory: Path, dims: ModelDimensions, state: dict[str, np.ndarray], tokenizer: bool = True,
                 timestamps_in_tokenizer: bool = True) -> Path:
    """A `WhisperForConditionalGeneration` directory: config.json, model.safetensors (tied
    proj_out included, as transformers saves it only when untied: left out) and tokenizer.json."""
    directory.mkdir(parents=True, exist_ok=True)
    config = {"model_type": "whisper", "num_mel_bins": dims.n_mels, "max_source_positions": dims.n_audio_ctx,
              "d_model": dims.n_audio_state, "encoder_attention_heads": dims.n_audio_head,
              "encoder_layers": dims.n_audio_layer, "vocab_size": dims.n_vocab,
              "max_target_positions": dims.n_text_ctx, "decoder_attention_heads": dims.n_text_head,
              "decoder_layers": dims.n_text_layer}
    (directory / "config.json").write_text(json.dumps(config))
    save_file(to_hf(state), str(directory / "model.safetensors"))
    if tokenizer:
        tokens = whisper_tokens(dims.n_vocab >= 51865)
        first_special = tokens.index("<|endoftext|>")
        last = len(tokens) if timestamps_in_tokenizer else tokens.index("<|0.00|>")
        data = {"model": {"vocab": {tok: i for i, tok in enumerate(tokens[:first_special])}},
                "added_tokens": [{"id": i, "content": tokens[i]} for i in range(first_special, last)]}
        (directory / "tokenizer.json").write_text(json.dumps(data))
    return directory


def ct2_variables(dims: ModelDimensions, state: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """CTranslate2 `WhisperSpec` variables of an openai state dict (q/k/v fused as linear_0 with a
    zero key bias, cross-attention k/v as linear_1), and the aliases its converter writes."""
    v: dict[str, np.ndarray] = {}
    zeros = lambda n: np.zeros(n, dtype=state["encoder.conv1.bias"].dtype)  # noqa: E731

    def ln(dst: str, src: str) -> None:
        v[f"{dst}/gamma"], v[f"{dst}/beta"] = state[f"{src}.weight"], state[f"{src}.bias"]

    def dense(dst: str, src: str) -> None:
        v[f"{dst}/weight"], v[f"{dst}/bias"] = state[f"{src}.weight"], state[f"{src}.bias"]

    def fused(dst: str, src: str, parts: tuple[str, ...]) -> None:
        w = state[f"{src}.query.weight"].shape[0]
        v[f"{dst}/weight"] = np.concatenate([state[f"{src}.{p}.weight"] for p in parts])
        v[f"{dst}/bias"] = np.concatenate([zeros(w) if p == "key" else state[f"{src}.{p}.bias"] for p in parts])

    dense("encoder/conv1", "encoder.conv1")
    dense("encoder/conv2", "encoder.conv2")
    v["encoder/position_encodings/encodings"] = state["encoder.positional_embedding"]
    for i in range(dims.n_audio_layer):
        s, o = f"encoder/layer_{i}", f"encoder.blocks.{i}"
        ln(f"{s}/self_attention/layer_norm", f"{o}.attn_ln")
        fused(f"{s}/self_attention/linear_0", f"{o}.attn", ("query", "key", "value"))
        dense(f"{s}/self_attention/linear_1", f"{o}.attn.out")
        ln(f"{s}/ffn/layer_norm", f"{o}.mlp_ln")
        dense(f"{s}/ffn/linear_0", f"{o}.mlp.0")
        dense(f"{s}/ffn/linear_1", f"{o}.mlp.2")
    ln("encoder/layer_norm", "encoder.ln_post")
    v["decoder/embeddings/weight"] = state["decoder.token_embedding.weight"]
    v["decoder/position_encodings/encodings"] = state["decoder.positional_embedding"]
    for i in range(dims.n_text_layer):
        s, o = f"decoder/layer_{i}", f"decoder.blocks.{i}"
        ln(f"{s}/self_attention/layer_norm", f"{o}.attn_ln")
        fused(f"{s}/self_attention/linear_0", f"{o}.attn", ("query", "key", "value"))
        dense(f"{s}/self_attention/linear_1", f"{o}.attn.out")
        ln(f"{s}/attention/layer_norm", f"{o}.cross_attn_ln")
        dense(f"{s}/attention/linear_0", f"{o}.cross_attn.query")
        fused(f"{s}/attention/linear_1", f"{o}.cross_attn", ("key", "value"))
        dense(f"{s}/attention/linear_2", f"{o}.cross_attn.out")
        ln(f"{s}/ffn/layer_norm", f"{o}.mlp_ln")
        dense(f"{s}/ffn/linear_0", f"{o}.mlp.0")
        dense(f"{s}/ffn/linear_1", f"{o}.mlp.2")
    ln("decoder/layer_norm", "decoder.ln")
    for flag, value in (("pre_norm", 1), ("scale_embeddings", 0), ("start_from_zero_embedding", 0)):
        v[f"decoder/{flag}"] = np.array(value, dtype=np.int8)
    v["encoder/num_heads"] = np.array(dims.n_audio_head, dtype=np.int16)
    v["decoder/num_heads"] = np.array(dims.n_text_head, dtype=np.int16)
    return v, {"decoder/projection/weight": "decoder/embeddings/weight"}


def write_ct2_dir(directory: Path, dims: ModelDimensions, state: dict[str, np.ndarray], vocabulary: str = "txt",
                  config: dict | None = None) -> Path:
    """A faster-whisper (CTranslate2) directory: model.bin, config.json and vocabulary.txt or
    vocabulary.json. `config` None: no suppress lists (the loader's standard ones apply)."""
    directory.mkdir(parents=True, exist_ok=True)
    variables, aliases = ct2_variables(dims, state)
    write_ct2(directory / "model.bin", variables, aliases)
    (directory / "config.json").write_text(json.dumps(config or {}))
    tokens = whisper_tokens(dims.n_vocab >= 51865)
    if vocabulary == "json":
        (directory / "vocabulary.json").write_text(json.dumps(tokens))
    else:
        (directory / "vocabulary.txt").write_text("\n".join(tokens) + "\n", encoding="utf-8")
    return directory
