"""One training forward: a batch of pairs -> BLIP's loss parts for the configured objectives.

`BlipObjectives` wraps the MED so DistributedDataParallel sees a single `forward`;
the momentum features and the queue bank are computed outside (no gradient) and
passed in as a `ContrastBank`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from blip_core.losses import (
    IGNORE_INDEX,
    diagonal_positives,
    id_positives,
    itc_loss,
    itm_loss,
    lm_loss,
    lm_targets,
    sample_hard_negatives,
)
from blip_core.med import MED
from blip_core.tokenizer import Tokenizer


def image_id_number(image_id: str) -> int:
    """A stable non-negative int64 for an image id string (for the id queue)."""
    return int.from_bytes(hashlib.blake2b(str(image_id).encode(), digest_size=7).digest(), "big")


def cut_words(caption: str, max_words: int) -> str:
    """The caption's first `max_words` whitespace-separated words (BLIP truncates captions to 30)."""
    return " ".join((caption or "").split()[:max_words])


@dataclass
class Batch:
    """A tokenised training batch; text tensors are None when no objective needs them."""

    pixel_values: Tensor  # (B, 3, S, S)
    image_ids: Tensor  # (B,) long, from `image_id_number`
    text_ids: Tensor | None = None  # (B, T) [CLS]-first, for ITC
    text_mask: Tensor | None = None  # (B, T)
    itm_ids: Tensor | None = None  # (B, T) [ENC]-first, same mask as text_ids
    dec_ids: Tensor | None = None  # (B, T') [DEC]-first (prompt included), for LM
    dec_mask: Tensor | None = None  # (B, T')

    def __len__(self) -> int:
        return self.pixel_values.shape[0]


def prepare_batch(
    samples: dict[str, Any],
    tokenizer: Tokenizer,
    objectives: Sequence[str],
    max_words: int,
    max_length: int,
    prompt: str,
    device: torch.device,
) -> Batch:
    """Collated samples ({"pixel_values", "caption", "image_id"}) -> a `Batch` on `device`."""
    captions = [cut_words(c, max_words) for c in samples["caption"]]
    ids = torch.tensor([image_id_number(i) for i in samples["image_id"]], dtype=torch.long)
    batch = Batch(pixel_values=samples["pixel_values"].to(device), image_ids=ids.to(device))
    if "itc" in objectives or "itm" in objectives:
        text_ids, text_mask = tokenizer.encode(captions, mode="text", max_length=max_length)
        itm_ids = text_ids.clone()
        itm_ids[:, 0] = tokenizer.enc_id  # the image-grounded encoder's first token
        batch.text_ids, batch.text_mask, batch.itm_ids = text_ids.to(device), text_mask.to(device), itm_ids.to(device)
    if "lm" in objectives:
        dec_ids, dec_mask = tokenizer.encode(captions, mode="decoder", max_length=max_length, prompt=prompt)
        batch.dec_ids, batch.dec_mask = dec_ids.to(device), dec_mask.to(device)
    return batch


def same_caption(text_ids: Tensor) -> Tensor:
    """(B, T) padded ids -> (B, B) bool, true where two rows hold exactly the same caption."""
    return (text_ids[:, None, :] == text_ids[None, :, :]).all(-1)


def lm_target_count(batch: Batch, prompt_length: int) -> Tensor:
    """Number of LM target tokens in the batch (scalar long), for a global normaliser under DDP."""
    targets = lm_targets(batch.dec_ids, batch.dec_mask, prompt_length)[:, 1:]
    return (targets != IGNORE_INDEX).sum()


@dataclass
class ContrastBank:
    """Momentum features the ITC rows are contrasted with: the global batch, then the queue."""

    image_m: Tensor  # (B, E) this rank's momentum image features
    text_m: Tensor  # (B, E)
    image_bank: Tensor  # (K, E) = gathered batch (G, E) then queue (Q, E)
    text_bank: Tensor  # (K, E)
    id_bank: Tensor  # (K,) image ids
    offset: int  # where this rank's rows start in the bank (rank * B)


class BlipObjectives(nn.Module):
    """`forward(batch, bank, alpha, generator, lm_normalizer) -> {"loss", parts...}` for `objectives`."""

    def __init__(
        self,
        model: MED,
        objectives: Sequence[str],
        retrieval: bool = False,
        prompt_length: int = 0,
        label_smoothing: float = 0.1,
    ) -> None:
        super().__init__()
        unknown = set(objectives) - {"itc", "itm", "lm"}
        if unknown or not objectives:
            raise ValueError(f"objectives must be a non-empty subset of itc, itm, lm; got {list(objectives)}")
        if "itm" in objectives and "itc" not in objectives:
            raise ValueError("ITM draws its hard negatives from ITC similarities: enable itc with itm")
        self.model = model
        self.objectives = tuple(objectives)
        self.retrieval = retrieval
        self.prompt_length = prompt_length
        self.label_smoothing = label_smoothing

    def forward(
        self,
        batch: Batch,
        bank: ContrastBank | None = None,
        alpha: float = 0.4,
        generator: torch.Generator | None = None,
        lm_normalizer: Tensor | float | None = None,
    ) -> dict[str, Tensor]:
        image_embeds = self.model.encode_image(batch.pixel_values)  # (B, 1+N, Dv)
        parts: dict[str, Tensor] = {}
        if "itc" in self.objectives:
            if bank is None:
                raise ValueError("ITC needs a ContrastBank of momentum features")
            parts.update(self._contrastive(batch, image_embeds, bank, alpha, generator))
        if "lm" in self.objectives:
            logits = self.model.lm_logits(image_embeds, batch.dec_ids, batch.dec_mask)  # (B, T, V)
            parts.update(
                lm_loss(logits, batch.dec_ids, batch.dec_mask, self.prompt_length, self.label_smoothing, lm_normalizer)
            )
        parts["loss"] = sum(parts[name] for name in self.objectives)
        return parts

    def _contrastive(
        self, batch: Batch, image_embeds: Tensor, bank: ContrastBank, alpha: float, generator: torch.Generator | None
    ) -> dict[str, Tensor]:
        model = self.model
        b = len(batch)
        text_embeds = model.encode_text(batch.text_ids, batch.text_mask)  # (B, T, D)
        image_feat = model.image_features(image_embeds).float()  # (B, E)
        text_feat = model.text_features(text_embeds).float()  # (B, E)
        temp = model.clamped_temp().float()
        if self.retrieval:
            positives = id_positives(batch.image_ids, bank.id_bank)  # (B, K)
        else:
            positives = diagonal_positives(b, bank.image_bank.shape[0], bank.offset, device=image_feat.device)
        parts = itc_loss(
            image_feat, text_feat, bank.image_m, bank.text_m, bank.image_bank, bank.text_bank, temp, alpha, positives
        )
        if "itm" not in self.objectives:
            return parts
        local = slice(bank.offset, bank.offset + b)
        with torch.no_grad():
            sim_i2t = image_feat @ bank.text_bank[local].T / temp  # (B, B)
            sim_t2i = text_feat @ bank.image_bank[local].T / temp  # (B, B)
        # a pair whose caption is the positive's own caption is no negative (the same words
        # describe both images), so it is never drawn and never labelled "no match"
        excluded = positives[:, local] | same_caption(batch.text_ids)  # (B, B)
        negs = sample_hard_negatives(sim_i2t, sim_t2i, excluded, generator)
        rows = torch.arange(b, device=image_feat.device)
        ids = torch.cat([batch.itm_ids, batch.itm_ids[negs["neg_text"]], batch.itm_ids])  # (3B, T)
        mask = torch.cat([batch.text_mask, batch.text_mask[negs["neg_text"]], batch.text_mask])  # (3B, T)
        image_index = torch.cat([rows, rows, negs["neg_image"]])  # (3B,)
        logits = model.itm_logits(image_embeds, ids, mask, image_index)  # (3B, 2)
        valid = torch.cat([negs["neg_text_valid"], negs["neg_image_valid"]])
        parts.update(itm_loss(logits[:b], logits[b:], valid))
        return parts
