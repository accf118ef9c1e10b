"""Images and texts as tensors on the model's device, the way the evaluation feeds them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from data.images import decode_image


def model_device(model: Any) -> torch.device:
    """The device the model's parameters live on."""
    return next(model.parameters()).device


def pixels(images: Sequence[bytes], size: int, device: torch.device) -> torch.Tensor:
    """Encoded images -> the model's normalised pixels, (B, 3, S, S)."""
    from blip_core.image import ImageTransform

    transform = ImageTransform(size)
    return torch.stack([transform(decode_image(b).image) for b in images]).to(device)  # (B, 3, S, S)


def tokens(tokenizer: Any, texts: list[str], mode: str, max_length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask of `texts` for `mode` (text / itm / decoder), (B, T) each."""
    ids, mask = tokenizer.encode(texts, mode, max_length)
    return ids.to(device), mask.to(device)  # (B, T) each
