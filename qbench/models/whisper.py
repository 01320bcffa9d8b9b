"""Whisper in numpy: log-mel front end, encoder, decoder with KV cache, greedy decoding.

Read top to bottom like openai/whisper's model.py. Parameter names (the canonical names every
checkpoint loader maps to):

    encoder.conv1.weight [d, n_mels, 3]      encoder.conv1.bias
    encoder.conv2.weight [d, d, 3]           encoder.conv2.bias
    encoder.positional_embedding [n_audio_ctx, d]
    encoder.blocks.{i}.attn_ln.{weight,bias}
    encoder.blocks.{i}.attn.qkv.{weight [3d, d], bias [3d]}   (query, key, value stacked;
                                                               the key has no bias: zeros)
    encoder.blocks.{i}.attn.out.{weight, bias}
    encoder.blocks.{i}.mlp_ln.{weight,bias}
    encoder.blocks.{i}.mlp.fc1.{weight [4d, d], bias}  encoder.blocks.{i}.mlp.fc2.{weight, bias}
    encoder.ln_post.{weight,bias}
    decoder.token_embedding.weight [n_vocab, d]   (also the output projection: tied)
    decoder.positional_embedding [n_text_ctx, d]
    decoder.blocks.{i}.attn_ln / attn.qkv / attn.out            masked self-attention
    decoder.blocks.{i}.cross_attn_ln / cross_attn.q / cross_attn.kv [2d, d] / cross_attn.out
    decoder.blocks.{i}.mlp_ln / mlp.fc1 / mlp.fc2
    decoder.ln.{weight,bias}
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelDimensions:
    n_mels: int
    n_audio_ctx: int
    n_audio_state: int
    n_audio_head: int
    n_audio_layer: int
    n_vocab: int
    n_text_ctx: int
    n_text_state: int
    n_text_head: int
    n_text_layer: int
