"""Photo-like JPEGs at web sizes, for decode tests and benchmarks (no photos ship here).

A smooth colour gradient, a few filled shapes with hard edges, fine sensor-like noise
and a high-frequency texture band, saved as a baseline JPEG: enough of a natural
image's spectrum that a DCT-domain reduced decode is tested on edges and texture, not
only on flat colour.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw

_SHAPES = 6
_NOISE_STD = 6.0  # grey levels of per-pixel noise


def photo_like(seed: int, width: int, height: int) -> Image.Image:
    """An RGB image of `width` x `height` drawn from `seed` only."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    u, v = x / max(width - 1, 1), y / max(height - 1, 1)
    corners = rng.uniform(0, 255, size=(4, 3)).astype(np.float32)
    base = (
        corners[0] * ((1 - u) * (1 - v))[..., None] + corners[1] * (u * (1 - v))[..., None]
        + corners[2] * ((1 - u) * v)[..., None] + corners[3] * (u * v)[..., None]
    )  # (H, W, 3)
    period = rng.uniform(6, 24) * max(width, height) / 640  # a texture band a few px wide
    stripes = 20 * np.sin(2 * np.pi * (x + 0.5 * y) / period)
    band = (v > 0.7) & (v < 0.85)
    base[band] += stripes[band][:, None]
    base += rng.normal(0, _NOISE_STD, size=base.shape).astype(np.float32)
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(_SHAPES):
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        r = rng.uniform(0.05, 0.2) * min(width, height)
        box = (cx - r, cy - r, cx + r, cy + r)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    return image


def photo_jpeg(seed: int, width: int, height: int, quality: int = 90, exif: bytes | None = None) -> bytes:
    """`photo_like(seed, width, height)` as JPEG bytes (optionally with an EXIF block)."""
    buffer = io.BytesIO()
    kwargs = {"exif": exif} if exif else {}
    photo_like(seed, width, height).save(buffer, format="JPEG", quality=quality, **kwargs)
    return buffer.getvalue()
