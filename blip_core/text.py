"""The BERT-style text tower: embeddings, one layer class, a stack, and the LM head.

One `TextLayer` class does every mode: self-attention (bidirectional or causal), then
cross-attention to image tokens when image keys/values are given, then the FFN.
A decoder layer is built by `TextLayer.sharing_with(encoder_layer)`: it owns only a new
self-attention and is handed the encoder layer's cross-attention and FFN modules, so
MED's parameter sharing ("all but self-attention") is visible in the code.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from blip_core.attention import Attention, KVCache, causal_mask, padding_mask
from blip_core.config import TextConfig

ImageKV = list[tuple[Tensor, Tensor]]  # per layer: cross-attention (keys, values), each (B, H, N, Dh)


class TextEmbeddings(nn.Module):
    """Word + absolute position embeddings, LayerNorm, dropout (no token types, as BLIP)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, input_ids: Tensor, start: int = 0) -> Tensor:
        """`input_ids` (B, T) at positions start..start+T-1 -> (B, T, D)."""
        t = input_ids.shape[1]
        if start + t > self.position_embeddings.num_embeddings:
            raise ValueError(
                f"text of {start + t} tokens exceeds max_position_embeddings="
                f"{self.position_embeddings.num_embeddings}; truncate it (tokenizer max_length)"
            )
        x = self.word_embeddings(input_ids) + self.position_embeddings.weight[start : start + t]
        return self.dropout(self.norm(x))


class FeedForward(nn.Module):
    """BERT FFN with post-norm residual: `LayerNorm(x + fc2(gelu(fc1(x))))`."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x + self.dropout(self.fc2(F.gelu(self.fc1(x)))))


class TextLayer(nn.Module):
    """Self-attention -> (cross-attention to the image, when given) -> FFN."""

    def __init__(self, self_attn: Attention, cross_attn: Attention, ffn: FeedForward, causal: bool):
        super().__init__()
        self.self_attn = self_attn
        self.cross_attn = cross_attn
        self.ffn = ffn
        self.causal = causal

    @classmethod
    def encoder(cls, cfg: TextConfig, image_width: int) -> TextLayer:
        """A bidirectional layer that owns all its modules."""
        d, h, eps, p = cfg.hidden_size, cfg.num_heads, cfg.layer_norm_eps, cfg.dropout
        return cls(Attention(d, d, h, eps, p), Attention(d, image_width, h, eps, p), FeedForward(cfg), causal=False)

    @classmethod
    def sharing_with(cls, encoder_layer: TextLayer, cfg: TextConfig) -> TextLayer:
        """A causal layer with its own self-attention and `encoder_layer`'s cross-attention and FFN."""
        d, h, eps, p = cfg.hidden_size, cfg.num_heads, cfg.layer_norm_eps, cfg.dropout
        return cls(Attention(d, d, h, eps, p), encoder_layer.cross_attn, encoder_layer.ffn, causal=True)

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None,
        is_causal: bool,
        image_kv: tuple[Tensor, Tensor] | None = None,
        cache: KVCache | None = None,
        first_only: bool = False,
    ) -> Tensor:
        """`x` (B, T, D) -> (B, T, D), or (B, 1, D) for the first token only (bidirectional layers).

        With `cache`, keys/values of `x` are appended to it first.
        """
        k, v = self.self_attn.project_kv(x)
        if cache is not None:
            k, v = cache.append(k, v)
        if first_only:
            if is_causal or self.causal:
                raise ValueError("first_only is for bidirectional layers")
            x = x[:, :1]  # every token is a key, only the first is a query
        x = self.self_attn(x, k, v, mask=mask, is_causal=is_causal)
        if image_kv is not None:
            x = self.cross_attn(x, *image_kv)
        return self.ffn(x)


class TextTransformer(nn.Module):
    """Embeddings + a stack of `TextLayer`s; bidirectional or causal as its layers are."""

    def __init__(self, embeddings: TextEmbeddings, layers: list[TextLayer]):
        super().__init__()
        self.embeddings = embeddings
        self.layers = nn.ModuleList(layers)

    @property
    def causal(self) -> bool:
        return self.layers[0].causal

    def image_kv(self, image_embeds: Tensor) -> ImageKV:
        """Cross-attention keys/values of `image_embeds` (B, N, Dv) for every layer, computed once."""
        return [layer.cross_attn.project_kv(image_embeds) for layer in self.layers]

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        image_kv: ImageKV | None = None,
        caches: list[KVCache] | None = None,
        first_only: bool = False,
    ) -> Tensor:
        """`input_ids` (B, T) -> hidden states (B, T, D).

        `image_kv=None` is the unimodal mode (no cross-attention). `image_kv` with fewer
        rows than `input_ids` is shared by consecutive text rows (G per image). With `caches`
        (decoding), `input_ids` are the new tokens only and positions continue after the
        cached ones. `first_only` returns (B, 1, D): the last layer computes only the first
        token, all that ITM and ITC read (exact: nothing else depends on the others there).
        """
        start = caches[0].length if caches else 0
        x = self.embeddings(input_ids, start)
        mask, is_causal = self._mask(attention_mask, input_ids.shape[1], start)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            kv = image_kv[i] if image_kv is not None else None
            x = layer(x, mask, is_causal, kv, caches[i] if caches else None, first_only and i == last)
        return x

    def _mask(self, attention_mask: Tensor | None, queries: int, start: int) -> tuple[Tensor | None, bool]:
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None
        if not self.causal:
            return padding_mask(attention_mask), False
        if attention_mask is None and start == 0:
            return None, True  # plain lower-triangular: SDPA's fast path
        if attention_mask is None and queries == 1:
            return None, False  # one new token attends to everything cached
        return causal_mask(attention_mask, queries, start, self.embeddings.word_embeddings.weight.device), False


class LMHead(nn.Module):
    """BERT prediction head: dense -> GELU -> LayerNorm -> decoder tied to the word embeddings."""

    def __init__(self, cfg: TextConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size)
        self.decoder.weight = word_embeddings.weight  # tied: one tensor, two roles

    def forward(self, hidden: Tensor) -> Tensor:
        """(B, T, D) -> logits (B, T, V)."""
        return self.decoder(self.norm(F.gelu(self.dense(hidden))))
