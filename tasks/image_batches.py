"""Image batches for the model stages: decode and transform rows of a binary column in
DataLoader workers, ship them as uint8, normalise once on the device.

`decode="reduced"` lets libjpeg decode a large JPEG at 1/2-1/8 scale (never below the
model's size) before the exact resize; ``"exact"`` decodes every pixel first.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader, Dataset

from blip_core.image import ImageTransform, normalise
from data.images import decode_image
from tasks.execution import ExecutionConfig, resolve_workers


Decode = Literal["reduced", "exact"]
DECODE_MODES = ("reduced", "exact")


class _DecodedImages(Dataset):
    """Row i of an arrow binary column -> (uint8 pixels (3,S,S), error or "")."""

    def __init__(self, jpg: pa.Array, transform: ImageTransform, decode: Decode = "exact") -> None:
        if decode not in DECODE_MODES:
            raise ValueError(f"decode must be one of {DECODE_MODES}, got {decode!r}")
        self.jpg = jpg
        self.transform = transform
        # a training crop may want every pixel of a small region: only eval resizes reduce
        self.reduce_to = transform.image_size if decode == "reduced" and not transform.train else None

    def __len__(self) -> int:
        return len(self.jpg)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        decoded = decode_image(self.jpg[index].as_py(), reduce_to=self.reduce_to)
        if decoded.image is None:
            size = self.transform.image_size
            return torch.zeros(3, size, size, dtype=torch.uint8), decoded.error or "undecodable"
        return self.transform.pixels(decoded.image), ""


def image_batches(
    jpg: pa.Array,
    batches: list[list[int]],
    transform: ImageTransform,
    execution: ExecutionConfig,
    device: torch.device,
    decode: Decode = "exact",
) -> Iterator[tuple[torch.Tensor, list[str]]]:
    """Decode and transform the rows of each index batch in DataLoader workers.

    Yields (pixel_values (B,3,S,S) float on `device`, errors) in batch order; an error is
    "" for a good image, else the reason (its pixels are a constant and must not be used).
    Workers decode the next batches while the model runs on this one; batches travel as
    uint8 (pinned on CUDA) and are normalised once on the device. `decode`: see the
    module docstring (the stages pass their config's `decode`).
    """
    if not batches:
        return
    workers = resolve_workers(execution.num_workers, device)
    loader = DataLoader(
        _DecodedImages(jpg, transform, decode),
        batch_sampler=batches,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=2 if workers else None,
        persistent_workers=False,
    )
    for pixels, errors in loader:  # pixels: (B, 3, S, S) uint8
        yield normalise(pixels.to(device, non_blocking=True)), list(errors)


def index_batches(indices: np.ndarray, batch_size: int) -> list[list[int]]:
    """Consecutive chunks of at most `batch_size` row indices."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    return [indices[i : i + batch_size].tolist() for i in range(0, len(indices), batch_size)]
