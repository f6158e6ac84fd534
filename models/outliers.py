"""Function-preserving outlier injection: the fixture with the outlier channels real LLMs have.

Real LLMs' keys have a few channels whose magnitude dwarfs the rest (KVQuant, KIVI), which is
what makes one 4-bit scale per tensor fail. The small fixture has none, so we make them without
changing what the model computes:

- keys: for a few RoPE pairs (channel i and i + head_dim/2, rotated together, so the scaling
  commutes with RoPE) of each KV head, scale the K-projection rows by `KEY_ALPHA` and the
  matching rows of every query head in that KV head's group by 1 / KEY_ALPHA: q.k is unchanged.
- values: for a few channels of each KV head, scale the V-projection rows by `VALUE_ALPHA` and the
  output-projection columns that read that channel (in every query head of the group) by
  1 / VALUE_ALPHA: the attention output is unchanged.

The factors are powers of two, so every scaled product is exact in binary floating point and the
float logits stay equal.
"""

from __future__ import annotations

import torch

KEY_ALPHA = 32.0
VALUE_ALPHA = 16.0
KEY_PAIRS_PER_HEAD = 2
VALUE_CHANNELS_PER_HEAD = 2


def outlier_key_channels(head_dim: int, layer: int, kv_head: int) -> list[int]:
    """The key channels made outliers: whole RoPE pairs among the low-frequency half."""
    half = head_dim // 2
    firsts = [half - 1 - ((layer + kv_head + 3 * k) % (half // 2)) for k in range(KEY_PAIRS_PER_HEAD)]
    return sorted({c for i in firsts for c in (i, i + half)})


def outlier_value_channels(head_dim: int, layer: int, kv_head: int) -> list[int]:
    return sorted({(7 * layer + 13 * kv_head + 17 * k) % head_dim for k in range(VALUE_CHANNELS_PER_HEAD)})


@torch.no_grad()
def inject_outliers(model):
    """Scale K/Q and V/O weights of an HF Llama in place so keys and values get outlier channels."""
    cfg = model.config
    hd = cfg.head_dim
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    for layer, block in enumerate(model.model.layers):
        attn = block.self_attn
        for g in range(cfg.num_key_value_heads):
            q_heads = range(g * group, (g + 1) * group)
            for c in outlier_key_channels(hd, layer, g):
                attn.k_proj.weight[g * hd + c, :] *= KEY_ALPHA
                for h in q_heads:
                    attn.q_proj.weight[h * hd + c, :] /= KEY_ALPHA
            for c in outlier_value_channels(hd, layer, g):
                attn.v_proj.weight[g * hd + c, :] *= VALUE_ALPHA
                for h in q_heads:
                    attn.o_proj.weight[:, h * hd + c] /= VALUE_ALPHA
    return model
