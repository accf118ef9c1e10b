"""BERT-style attention through `scaled_dot_product_attention`, and its decoding cache.

One `Attention` class serves self-attention (bidirectional or causal) and cross-attention
to image tokens: the caller decides where keys and values come from. Keys/values are
projected by `project_kv` so a decoder can compute the image's cross-attention keys and
values once and reuse them for every decoding step and every beam.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Attention(nn.Module):
    """Multi-head attention with BERT's post-norm output: `LayerNorm(x + dense(attn(x)))`.

    `kv_width` is the width of what keys/values are computed from: the text width for
    self-attention, the vision width for cross-attention.
    """

    def __init__(self, width: int, kv_width: int, num_heads: int, eps: float, dropout: float = 0.0):
        super().__init__()
        if width % num_heads:
            raise ValueError(f"text width {width} is not a multiple of num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = width // num_heads
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(kv_width, width)
        self.value = nn.Linear(kv_width, width)
        self.dense = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width, eps=eps)
        self.dropout = dropout

    def _heads(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape  # (B, T, D) -> (B, H, T, Dh)
        return x.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)

    def project_kv(self, states: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values of `states` (B, S, kv_width), each (B, H, S, Dh)."""
        return self._heads(self.key(states)), self._heads(self.value(states))

    def forward(
        self,
        x: Tensor,
        keys: Tensor,
        values: Tensor,
        mask: Tensor | None = None,
        is_causal: bool = False,
    ) -> Tensor:
        """Attend from `x` (B, T, D) to `keys`/`values` (B / G, H, S, Dh); `mask` (B|1, 1, T|1, S) bool, True = attend.

        When keys/values have fewer rows than `x` (G text rows per image, image-major),
        the G rows' queries are stacked and attend to their image's keys together:
        exact for unmasked cross-attention, and the image's keys are never copied.
        """
        b, t, d = x.shape
        rows, h, dh = keys.shape[0], self.num_heads, self.head_dim
        q = self.query(x)  # (B, T, D)
        if rows == b:
            q = q.view(b, t, h, dh).transpose(1, 2)  # (B, H, T, Dh)
        else:
            if mask is not None or is_causal or b % rows:
                raise ValueError(f"{b} query rows cannot share {rows} key rows under a mask")
            q = q.view(rows, b // rows, t, h, dh).permute(0, 3, 1, 2, 4).reshape(rows, h, -1, dh)  # (B/G, H, G*T, Dh)
        p = self.dropout if self.training else 0.0
        ctx = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, dropout_p=p, is_causal=is_causal)
        if rows == b:
            ctx = ctx.transpose(1, 2).reshape(b, t, d)  # (B, T, D)
        else:
            ctx = ctx.view(rows, h, b // rows, t, dh).permute(0, 2, 3, 1, 4).reshape(b, t, d)
        out = F.dropout(self.dense(ctx), p, self.training)
        return self.norm(out + x)


@dataclass
class KVCache:
    """Self-attention keys/values of one layer, preallocated to the longest sequence.

    `append` writes the new step's keys/values in place and returns views of everything
    so far; `reorder` follows beam search's choice of parent beams.
    """

    keys: Tensor  # (B, H, L_max, Dh)
    values: Tensor  # (B, H, L_max, Dh)
    length: int = 0

    @classmethod
    def empty(cls, rows: int, heads: int, max_length: int, head_dim: int, like: Tensor) -> KVCache:
        shape = (rows, heads, max_length, head_dim)
        return cls(like.new_empty(shape), like.new_empty(shape))

    def append(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        end = self.length + keys.shape[2]
        if end > self.keys.shape[2]:
            raise ValueError(f"KV cache holds {self.keys.shape[2]} positions; step would reach {end}")
        self.keys[:, :, self.length : end] = keys
        self.values[:, :, self.length : end] = values
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def reorder(self, rows: Tensor) -> None:
        """Keep rows `rows` (R,) in that order (beam search's parents)."""
        self.keys = self.keys.index_select(0, rows)
        self.values = self.values.index_select(0, rows)


def padding_mask(attention_mask: Tensor | None) -> Tensor | None:
    """(B, T) 1/0 mask -> (B, 1, 1, T) bool for SDPA; None when nothing is padded."""
    if attention_mask is None or bool(attention_mask.all()):
        return None
    return attention_mask.bool()[:, None, None, :]


def causal_mask(attention_mask: Tensor | None, queries: int, offset: int, device: torch.device) -> Tensor:
    """Causal mask for queries at positions offset..offset+queries-1 -> (B|1, 1, Tq, Tk) bool."""
    keys = offset + queries
    q_pos = torch.arange(offset, keys, device=device)[:, None]
    k_pos = torch.arange(keys, device=device)[None, :]
    mask = (k_pos <= q_pos)[None, None]  # (1, 1, Tq, Tk)
    if attention_mask is not None:
        mask = mask & attention_mask.bool()[:, None, None, :keys]
    return mask
