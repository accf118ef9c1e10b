"""Zero-shot video with an image-trained MED, as BLIP's released video evaluation does it.

A clip is n frames sampled uniformly over its duration, and the model sees them as
one long image:

- ITC: each frame's [CLS] is projected (`vision_proj`), the n projections are averaged
  and the mean is L2-normalised (BLIP's ``eval_retrieval_video.py``: project, mean,
  normalise; not a mean of normalised features);
- ITM and captioning: the text cross-attends to all frames' tokens concatenated along
  the sequence, (B, n (1 + N), Dv), through the unchanged `MED.itm_logits` and
  `generation.generate_from_embeds`.

All frames of a batch of clips go through the vision encoder in one call. A clip of n
identical frames scores as the image itself: the mean of n equal projections is that
projection, and cross-attention over n copies of each key spreads the same weight
evenly over copies of the same value (tests/blip_core/test_video.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from blip_core.generation import generate_from_embeds
from blip_core.med import MED


@dataclass
class VideoEmbeds:
    """What a batch of clips gives the rest of the model."""

    features: Tensor  # (B, E) L2-normalised ITC features
    tokens: Tensor  # (B, n (1 + N), Dv): every frame's tokens, frame-major, for ITM and captioning


def encode_frames(model: MED, frames: Tensor) -> Tensor:
    """(B, n, 3, S, S) frames -> (B, n, 1 + N, Dv) tokens, in one vision-encoder call."""
    b, n = frames.shape[:2]
    tokens = model.encode_image(frames.flatten(0, 1))  # (B n, 1 + N, Dv)
    return tokens.unflatten(0, (b, n))


def video_features(model: MED, frame_tokens: Tensor) -> Tensor:
    """(B, n, 1 + N, Dv) -> (B, E): normalise(mean over frames of vision_proj([CLS]))."""
    projected = model.vision_proj(frame_tokens[:, :, 0])  # (B, n, E)
    return F.normalize(projected.mean(dim=1), dim=-1)


def video_tokens(frame_tokens: Tensor) -> Tensor:
    """(B, n, 1 + N, Dv) -> (B, n (1 + N), Dv): the frames as one long image."""
    return frame_tokens.flatten(1, 2)


@torch.no_grad()
def embed_videos(model: MED, frames: Tensor) -> VideoEmbeds:
    """ITC features and concatenated tokens of a batch of clips (B, n, 3, S, S)."""
    frame_tokens = encode_frames(model, frames)
    return VideoEmbeds(features=video_features(model, frame_tokens), tokens=video_tokens(frame_tokens))


@torch.no_grad()
def video_itm_probability(model: MED, frames: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """Softmax "match" probability (B,) of clip i with text i (`[ENC]`-first ids)."""
    logits = model.itm_logits(embed_videos(model, frames).tokens, input_ids, attention_mask)
    return logits.float().softmax(dim=-1)[:, 1]


@torch.no_grad()
def video_itc_similarity(model: MED, frames: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """Cosine similarity (B_video, B_text) of clip and text ITC features (as `MED.itc_similarity`)."""
    videos = embed_videos(model, frames).features
    texts = model.text_features(model.encode_text(input_ids, attention_mask, first_only=True))
    return videos @ texts.t()


@torch.no_grad()
def caption_videos(model: MED, frames: Tensor, strategy: str = "beam", **settings) -> Tensor:
    """Caption ids (B * num_captions, L) of clips (B, n, 3, S, S); settings as `generate_from_embeds`."""
    return generate_from_embeds(model, embed_videos(model, frames).tokens, strategy, **settings)
