"""MED: BLIP's multimodal mixture of encoder-decoder, in one module.

Three modes over one network:
1. unimodal text encoder (`encode_text`, no cross-attention) -> ITC features;
2. image-grounded text encoder (`itm_logits`, the SAME layers with cross-attention) -> ITM head;
3. image-grounded text decoder (`lm_logits`, causal) -> LM head tied to the word embeddings.

Sharing ("all but self-attention", the paper's best): the decoder is built from the
encoder's embeddings and each decoder layer is handed its encoder layer's cross-attention
and FFN (`TextLayer.sharing_with`); only the decoder's self-attentions are its own.
Special token ids come from `config.text`, never from literals; the model never swaps
tokens (the tokenizer's mode decides what comes first).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from blip_core.config import MEDConfig
from blip_core.generation import generate
from blip_core.text import ImageKV, LMHead, TextEmbeddings, TextLayer, TextTransformer
from blip_core.vit import VisionTransformer

class MED(nn.Module):
    """Vision transformer + shared text encoder/decoder + ITC / ITM / LM heads."""

    def __init__(self, config: MEDConfig):
        super().__init__()
        config.check()
        self.config = config
        tcfg, vcfg = config.text, config.vision
        self.vision = VisionTransformer(vcfg)
        encoder_layers = [TextLayer.encoder(tcfg, vcfg.hidden_size) for _ in range(tcfg.num_layers)]
        self.text_encoder = TextTransformer(TextEmbeddings(tcfg), encoder_layers)
        decoder_layers = [TextLayer.sharing_with(layer, tcfg) for layer in encoder_layers]
        self.text_decoder = TextTransformer(self.text_encoder.embeddings, decoder_layers)
        self.lm_head = LMHead(tcfg, self.text_encoder.embeddings.word_embeddings)
        self.vision_proj = nn.Linear(vcfg.hidden_size, config.embed_dim)
        self.text_proj = nn.Linear(tcfg.hidden_size, config.embed_dim)
        self.itm_head = nn.Linear(tcfg.hidden_size, 2)
        self.temp = nn.Parameter(torch.tensor(config.temp_init))
        self.apply(lambda module: _init_module(module, config.init_std))
        nn.init.trunc_normal_(self.vision.embeddings.class_embedding, std=config.init_std)
        nn.init.trunc_normal_(self.vision.embeddings.position_embedding, std=config.init_std)
        with torch.no_grad():  # the tied LM decoder was re-initialised after the embedding
            self.text_encoder.embeddings.word_embeddings.weight[tcfg.pad_token_id].zero_()

    def tie_weights(self) -> None:
        """(Re)tie the LM decoder to the word embeddings, e.g. after `to_empty` from the meta device."""
        self.lm_head.decoder.weight = self.text_encoder.embeddings.word_embeddings.weight

    # ---- towers -------------------------------------------------------------------

    def encode_image(self, pixel_values: Tensor) -> Tensor:
        """(B, 3, H, W) -> image tokens (B, 1 + N, Dv), [CLS] first."""
        return self.vision(pixel_values)

    def image_features(self, image_embeds: Tensor) -> Tensor:
        """(B, 1 + N, Dv) -> L2-normalised ITC features (B, E)."""
        return F.normalize(self.vision_proj(image_embeds[:, 0]), dim=-1)

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor | None = None, first_only: bool = False) -> Tensor:
        """Unimodal text encoder (no cross-attention): (B, T) ids -> (B, T, D), or (B, 1, D) with `first_only`."""
        return self.text_encoder(input_ids, attention_mask, first_only=first_only)

    def text_features(self, text_embeds: Tensor) -> Tensor:
        """(B, T, D) -> L2-normalised ITC features (B, E)."""
        return F.normalize(self.text_proj(text_embeds[:, 0]), dim=-1)

    def clamped_temp(self) -> Tensor:
        """The ITC temperature clamped to [temp_min, temp_max] (differentiable inside the range)."""
        return self.temp.clamp(self.config.temp_min, self.config.temp_max)

    # ---- image-grounded modes -----------------------------------------------------

    def grounded_text(
        self,
        image_embeds: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        image_index: Tensor | None = None,
        first_only: bool = False,
    ) -> Tensor:
        """Image-grounded encoder hidden states (B, T, D), or (B, 1, D) with `first_only`.

        `image_index` (B,) maps each text row to a row of `image_embeds`, so an image with
        several captions is encoded, and its cross-attention keys/values projected, once.
        """
        kv = _expand(self.text_encoder.image_kv(image_embeds), image_index)
        return self.text_encoder(input_ids, attention_mask, image_kv=kv, first_only=first_only)

    def itm_logits(
        self,
        image_embeds: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        image_index: Tensor | None = None,
    ) -> Tensor:
        """ITM logits (B, 2) from the first token; callers pass `[ENC]`-first ids."""
        hidden = self.grounded_text(image_embeds, input_ids, attention_mask, image_index, first_only=True)
        return self.itm_head(hidden[:, 0])

    def decoder_hidden(
        self,
        image_embeds: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        image_index: Tensor | None = None,
    ) -> Tensor:
        """Image-grounded causal decoder hidden states (B, T, D)."""
        kv = _expand(self.text_decoder.image_kv(image_embeds), image_index)
        return self.text_decoder(input_ids, attention_mask, image_kv=kv)

    def lm_logits(
        self,
        image_embeds: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        image_index: Tensor | None = None,
    ) -> Tensor:
        """Next-token logits (B, T, V) for `[DEC]`-first ids; position t predicts token t+1."""
        return self.lm_head(self.decoder_hidden(image_embeds, input_ids, attention_mask, image_index))

    # ---- scoring conveniences (what the filter stage calls) -------------------------

    @torch.no_grad()
    def itm_probability(
        self,
        pixel_values: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        image_index: Tensor | None = None,
    ) -> Tensor:
        """Softmax probability of "match" (B,) as transformers' BlipForImageTextRetrieval gives it.

        With `image_index` (B,), `pixel_values` holds each distinct image once.
        """
        logits = self.itm_logits(self.encode_image(pixel_values), input_ids, attention_mask, image_index)
        return logits.float().softmax(dim=-1)[:, 1]

    @torch.no_grad()
    def itc_similarity(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Cosine similarity (B_img, B_txt) of ITC features.

        This is exactly what transformers' `use_itm_head=False` returns (no temperature);
        divide by `clamped_temp()` for the training logits.
        """
        img = self.image_features(self.encode_image(pixel_values))
        txt = self.text_features(self.encode_text(input_ids, attention_mask, first_only=True))
        return img @ txt.t()

    @torch.no_grad()
    def generate(self, pixel_values: Tensor, strategy: str = "greedy", **kwargs) -> Tensor:
        """Caption token ids (B * num_captions, L), bos first; see `blip_core.generation.generate`."""
        return generate(self, pixel_values, strategy=strategy, **kwargs)


def _expand(kv: ImageKV, image_index: Tensor | None) -> ImageKV:
    """Per-image keys/values for the text rows of `image_index`.

    Left per image (shared by consecutive rows, no copy) when rows come image-major in
    equal groups, i.e. `image_index == arange(B_img).repeat_interleave(G)`; gathered otherwise.
    """
    if image_index is None:
        return kv
    images = kv[0][0].shape[0]
    groups = image_index.shape[0] // images
    regular = torch.arange(images, device=image_index.device).repeat_interleave(groups)
    if groups * images == image_index.shape[0] and torch.equal(image_index, regular):
        return kv
    return [(k.index_select(0, image_index), v.index_select(0, image_index)) for k, v in kv]


def _init_module(module: nn.Module, std: float) -> None:
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        nn.init.trunc_normal_(module.weight, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.trunc_normal_(module.weight, std=std)
        if module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
