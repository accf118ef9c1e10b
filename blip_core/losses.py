"""BLIP's three objectives as pure functions over tensors, each returning named parts.

- `itc_loss`: image-text contrastive loss against a bank of momentum features (the
  current global batch followed by the queue) with momentum-distilled soft targets.
- `sample_hard_negatives` + `itm_loss`: image-text matching with one hard negative
  text per image and one hard negative image per text.
- `lm_loss`: the decoder's causal cross-entropy with label smoothing; pad and prompt
  positions are not targets.

Positives are a boolean matrix so the same code serves pretraining (the pair itself)
and retrieval finetuning (every pair sharing an image id): build it with
`diagonal_positives` or `id_positives`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Weight added to every valid negative before sampling, so a row whose softmax
# underflows to zero still has something to draw (BLIP's original crashed there).
HARD_NEGATIVE_EPS = 1e-4
# BLIP's label smoothing for the captioning loss.
LM_LABEL_SMOOTHING = 0.1
# Target id that cross-entropy ignores.
IGNORE_INDEX = -100


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Half-precision logits (bf16 autocast) are upcast before softmax; fp32/fp64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def diagonal_positives(batch: int, bank: int, offset: int = 0, device: torch.device | None = None) -> torch.Tensor:
    """(batch, bank) bool: row i's only positive is bank column `offset + i` (its own pair)."""
    pos = torch.zeros(batch, bank, dtype=torch.bool, device=device)
    rows = torch.arange(batch, device=device)
    pos[rows, rows + offset] = True
    return pos


def id_positives(ids: torch.Tensor, bank_ids: torch.Tensor) -> torch.Tensor:
    """(B, K) bool: True where a row's image id equals a bank entry's image id (retrieval variant)."""
    return ids.view(-1, 1) == bank_ids.view(1, -1)


def soft_targets(sim_m: torch.Tensor, positives: torch.Tensor, alpha: float) -> torch.Tensor:
    """`alpha * softmax(sim_m) + (1 - alpha) * positives / row count`, rows summing to 1. (B, K)"""
    pos = positives.to(sim_m.dtype)
    counts = pos.sum(dim=1, keepdim=True)
    if bool((counts == 0).any()):
        raise ValueError("every row needs at least one positive in the bank (is its own pair in it?)")
    return alpha * F.softmax(sim_m, dim=1) + (1.0 - alpha) * pos / counts


def itc_loss(
    image_feat: torch.Tensor,
    text_feat: torch.Tensor,
    image_feat_m: torch.Tensor,
    text_feat_m: torch.Tensor,
    image_bank_m: torch.Tensor,
    text_bank_m: torch.Tensor,
    temp: torch.Tensor,
    alpha: float,
    positives: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Contrastive loss with momentum distillation (BLIP eq. ITC).

    image_feat, text_feat: (B, E) L2-normalised online features (with grad).
    image_feat_m, text_feat_m: (B, E) momentum features of the same pairs (no grad).
    image_bank_m, text_bank_m: (K, E) momentum features the rows are contrasted with:
    the (gathered) batch first, then the queue. temp: scalar temperature.
    positives: (B, K) bool, see `diagonal_positives` / `id_positives`.
    Returns {"itc", "itc_i2t", "itc_t2i"}; "itc" is their mean.
    """
    with torch.no_grad():
        t = temp.detach()
        targets_i2t = soft_targets(image_feat_m @ text_bank_m.T / t, positives, alpha)  # (B, K)
        targets_t2i = soft_targets(text_feat_m @ image_bank_m.T / t, positives, alpha)  # (B, K)
    sim_i2t = image_feat @ text_bank_m.T / temp  # (B, K)
    sim_t2i = text_feat @ image_bank_m.T / temp  # (B, K)
    loss_i2t = -(F.log_softmax(sim_i2t, dim=1) * targets_i2t).sum(dim=1).mean()
    loss_t2i = -(F.log_softmax(sim_t2i, dim=1) * targets_t2i).sum(dim=1).mean()
    return {"itc": (loss_i2t + loss_t2i) / 2, "itc_i2t": loss_i2t, "itc_t2i": loss_t2i}


def _draw(sim: torch.Tensor, positives: torch.Tensor, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One column per row with probability softmax(sim) over non-positives; (idx, valid) both (B,)."""
    # NaN similarities (a diverged step) must not crash sampling: the loss check reports them.
    probs = torch.nan_to_num(F.softmax(_at_least_fp32(sim), dim=1), nan=0.0, posinf=0.0, neginf=0.0)
    weights = (probs + HARD_NEGATIVE_EPS).masked_fill(positives, 0.0)  # (B, B)
    valid = ~positives.all(dim=1)  # rows with at least one negative candidate
    # Rows without a candidate draw from a dummy uniform row; their draw is masked out of the loss.
    weights = torch.where(valid.view(-1, 1), weights, torch.ones_like(weights))
    idx = torch.multinomial(weights, 1, generator=generator).view(-1)
    return idx, valid


def sample_hard_negatives(
    sim_i2t: torch.Tensor,
    sim_t2i: torch.Tensor,
    positives: torch.Tensor,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Draw one hard negative text per image and one hard negative image per text.

    sim_i2t, sim_t2i: (B, B) contrastive similarities within the local batch.
    positives: (B, B) bool (the diagonal, or shared image ids). A row is drawn with
    probability softmax(sim) + eps over its non-positive columns. A row with no
    negative at all (a batch of one, or a batch of one image's captions) is flagged
    invalid instead of crashing; `itm_loss` leaves it out.
    Returns {"neg_text", "neg_text_valid", "neg_image", "neg_image_valid"}, each (B,).
    """
    if sim_i2t.shape != positives.shape or sim_t2i.shape != positives.T.shape:
        raise ValueError(f"similarity shapes {tuple(sim_i2t.shape)}, {tuple(sim_t2i.shape)} do not match positives {tuple(positives.shape)}")
    with torch.no_grad():
        neg_text, text_ok = _draw(sim_i2t, positives, generator)
        neg_image, image_ok = _draw(sim_t2i, positives.T, generator)
    return {"neg_text": neg_text, "neg_text_valid": text_ok, "neg_image": neg_image, "neg_image_valid": image_ok}


def itm_loss(pos_logits: torch.Tensor, neg_logits: torch.Tensor, neg_valid: torch.Tensor) -> dict[str, torch.Tensor]:
    """Binary matching cross-entropy: positives labelled 1, negatives 0, invalid negatives left out.

    pos_logits: (B, 2) for the true pairs; neg_logits: (M, 2) for negative pairs
    (BLIP: M = 2B, image-with-hard-text then text-with-hard-image); neg_valid: (M,) bool.
    The mean runs over the B positives plus the valid negatives. Returns {"itm", "itm_acc"}
    (accuracy detached, for logging).
    """
    logits = torch.cat([pos_logits, neg_logits], dim=0)  # (B + M, 2)
    labels = torch.cat(
        [torch.ones(len(pos_logits), dtype=torch.long, device=logits.device),
         torch.zeros(len(neg_logits), dtype=torch.long, device=logits.device)]
    )
    keep = torch.cat([torch.ones(len(pos_logits), dtype=torch.bool, device=logits.device), neg_valid])
    per_item = F.cross_entropy(_at_least_fp32(logits), labels, reduction="none")  # (B + M,)
    weight = keep.to(per_item.dtype)
    loss = (per_item * weight).sum() / weight.sum()
    with torch.no_grad():
        acc = ((logits.argmax(dim=1) == labels).to(per_item.dtype) * weight).sum() / weight.sum()
    return {"itm": loss, "itm_acc": acc}


def lm_targets(input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int = 0) -> torch.Tensor:
    """(B, T) next-token targets aligned with the inputs: pads and the first `prompt_length` tokens ignored."""
    targets = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    if prompt_length > 0:
        targets[:, :prompt_length] = IGNORE_INDEX
    return targets


def lm_loss(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_length: int = 0,
    label_smoothing: float = LM_LABEL_SMOOTHING,
    normalizer: float | torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Causal cross-entropy: position t predicts token t+1, with label smoothing.

    logits: (B, T, V) decoder outputs for input_ids (B, T) whose first token is the bos.
    Pads and the first `prompt_length` tokens (bos + prompt, see
    `Tokenizer.prompt_length`) are not targets. The loss is the token sum divided by
    `normalizer` (default: this batch's target count); the trainer passes the global
    count / world size under DDP so averaged gradients equal a single-process batch.
    Returns {"lm", "lm_tokens"}.
    """
    targets = lm_targets(input_ids, attention_mask, prompt_length)[:, 1:]  # (B, T-1)
    scores = _at_least_fp32(logits[:, :-1, :])  # (B, T-1, V)
    per_token = F.cross_entropy(
        scores.reshape(-1, scores.shape[-1]),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        label_smoothing=label_smoothing,
        reduction="sum",
    )
    count = (targets != IGNORE_INDEX).sum()
    if normalizer is None:
        normalizer = count.clamp(min=1).to(per_token.dtype)
    return {"lm": per_token / normalizer, "lm_tokens": count}
