"""Momentum (EMA) encoders and feature queues for ITC with momentum distillation.

`MomentumEncoders` holds a frozen copy of a MED and keeps an exponential moving
average of the parts ITC uses (image encoder, unimodal text encoder, the two
projections): ``m <- decay * m + (1 - decay) * p`` after every optimizer step. Its
features never carry gradient.

`FeatureQueue` keeps the last `size` momentum image/text features and their image ids
(for the retrieval variant, where pairs sharing an image id are all positives). Each
step enqueues the features of the whole global batch, so `size` must be a multiple of
the global batch: the queue then wraps around exactly.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from blip_core.med import MED

# BLIP's EMA decay for the momentum encoders.
MOMENTUM_DECAY = 0.995
# Top-level MED submodules the momentum copy averages and saves (the ITC path).
MOMENTUM_PARTS = ("vision", "text_encoder", "vision_proj", "text_proj")
# Image id stored in queue slots never filled (matches no real id, which are >= 0).
EMPTY_ID = -1


class QueueSizeError(ValueError):
    """The queue size is not a multiple of the global batch (the message names both)."""


class MomentumEncoders(nn.Module):
    """A frozen EMA copy of a MED's ITC path; `image_features` / `text_features` are gradient-free."""

    def __init__(self, model: MED, decay: float = MOMENTUM_DECAY) -> None:
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"momentum decay must be in [0, 1], got {decay}")
        self.decay = decay
        # Copy the whole MED (keeps its call paths) but track only the ITC parts.
        self.model = copy.deepcopy(model)
        self.model.requires_grad_(False)

    def pairs(self, model: MED) -> list[tuple[Tensor, Tensor]]:
        """(momentum tensor, online tensor) pairs for every averaged parameter, by name."""
        online = dict(model.named_parameters())
        return [(p_m, online[name]) for name, p_m in self.model.named_parameters() if name.split(".")[0] in MOMENTUM_PARTS]

    @torch.no_grad()
    def update(self, model: MED) -> None:
        """One EMA step towards `model` (call after each optimizer step)."""
        pairs = self.pairs(model)
        momentum = [m for m, _ in pairs]
        torch._foreach_mul_(momentum, self.decay)
        torch._foreach_add_(momentum, [p.detach() for _, p in pairs], alpha=1.0 - self.decay)

    @torch.no_grad()
    def image_features(self, pixel_values: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, E) L2-normalised momentum image features."""
        return self.model.image_features(self.model.encode_image(pixel_values))

    @torch.no_grad()
    def text_features(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, T) `[CLS]`-first ids -> (B, E) L2-normalised momentum text features."""
        return self.model.text_features(self.model.encode_text(input_ids, attention_mask))

    def averaged_state(self) -> dict[str, Tensor]:
        """The averaged parameters by MED name (what a checkpoint stores)."""
        return {name: p for name, p in self.model.named_parameters() if name.split(".")[0] in MOMENTUM_PARTS}

    @torch.no_grad()
    def load_averaged_state(self, state: dict[str, Tensor]) -> None:
        """Inverse of `averaged_state`; raises naming a missing or unexpected tensor."""
        own = self.averaged_state()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise KeyError(f"momentum state mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
        for name, tensor in own.items():
            tensor.copy_(state[name])


class FeatureQueue(nn.Module):
    """Ring buffers of momentum features (size, E) and image ids (size,), oldest overwritten first."""

    image: Tensor
    text: Tensor
    ids: Tensor
    ptr: Tensor

    def __init__(self, size: int, dim: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if size <= 0:
            raise QueueSizeError(f"queue size must be positive, got {size}")
        # BLIP starts from random unit vectors: they act as negatives until real features arrive.
        self.register_buffer("image", F.normalize(torch.randn(size, dim, generator=generator), dim=1))
        self.register_buffer("text", F.normalize(torch.randn(size, dim, generator=generator), dim=1))
        self.register_buffer("ids", torch.full((size,), EMPTY_ID, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return self.image.shape[0]

    def check_batch(self, global_batch: int) -> None:
        """Raise QueueSizeError unless `global_batch` divides the queue size."""
        if global_batch <= 0 or self.size % global_batch != 0:
            raise QueueSizeError(
                f"queue size {self.size} is not a multiple of the global batch {global_batch} "
                f"(batch per rank x ranks); choose e.g. queue size {max(1, self.size // max(global_batch, 1)) * global_batch}"
            )

    def bank(self, image_feat: Tensor, text_feat: Tensor, ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The contrast bank: this global batch first, then the queue. Shapes (G+Q, E), (G+Q, E), (G+Q,)."""
        return (
            torch.cat([image_feat, self.image.clone()]),
            torch.cat([text_feat, self.text.clone()]),
            torch.cat([ids, self.ids.clone()]),
        )

    @torch.no_grad()
    def enqueue(self, image_feat: Tensor, text_feat: Tensor, ids: Tensor) -> None:
        """Write the global batch (G, E) at the pointer and advance it by G (mod size)."""
        g = image_feat.shape[0]
        self.check_batch(g)
        start = int(self.ptr)
        self.image[start : start + g] = image_feat.to(self.image.dtype)
        self.text[start : start + g] = text_feat.to(self.text.dtype)
        self.ids[start : start + g] = ids
        self.ptr.fill_((start + g) % self.size)
