"""Image preprocessing for MED: PIL RGB -> normalised (3, S, S) float tensor, without torchvision.

Evaluation resizes the whole image to S x S (bicubic), as BLIP's test transform does.
Training takes a random resized crop (area fraction in `scale`, aspect ratio in
[3/4, 4/3]) and a horizontal flip, both drawn from the `random.Random` the caller
passes in, so a data loader that derives that generator from (seed, epoch, index)
reproduces every augmented image exactly on a rerun or a resume.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

# CLIP/BLIP normalisation constants (per RGB channel).
BLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
BLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Aspect-ratio range of the random resized crop (torchvision's default, used by BLIP).
_RATIO = (3.0 / 4.0, 4.0 / 3.0)
# Tries at a crop inside the image before falling back to a central crop.
_CROP_ATTEMPTS = 10


@dataclass(frozen=True)
class CropBox:
    """A crop in pixel coordinates: `left`, `top`, `width`, `height`."""

    left: int
    top: int
    width: int
    height: int


def random_resized_box(width: int, height: int, scale: tuple[float, float], rng: random.Random) -> CropBox:
    """A crop covering `scale` of the area with aspect ratio in [3/4, 4/3], drawn with `rng` only."""
    area = width * height
    log_lo, log_hi = math.log(_RATIO[0]), math.log(_RATIO[1])
    for _ in range(_CROP_ATTEMPTS):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return CropBox(rng.randint(0, width - w), rng.randint(0, height - h), w, h)
    # Fallback: the largest central crop whose aspect ratio lies in the allowed range.
    in_ratio = width / height
    if in_ratio < _RATIO[0]:
        w, h = width, round(width / _RATIO[0])
    elif in_ratio > _RATIO[1]:
        w, h = round(height * _RATIO[1]), height
    else:
        w, h = width, height
    return CropBox((width - w) // 2, (height - h) // 2, w, h)


_MEAN = torch.tensor(BLIP_MEAN).view(3, 1, 1)
_STD = torch.tensor(BLIP_STD).view(3, 1, 1)


def to_uint8_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) uint8, the pixels as stored (a quarter of float32's bytes)."""
    array = np.array(image, dtype=np.uint8)  # (H, W, 3), a writable copy
    return torch.from_numpy(array).permute(2, 0, 1)  # (3, H, W)


def normalise(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (..., 3, H, W) -> float32 scaled to [0, 1] then normalised with BLIP mean/std.

    Works on a whole batch on its device, so loaders can ship uint8 and normalise once.
    """
    mean, std = _MEAN.to(pixels.device), _STD.to(pixels.device)
    return pixels.float().div_(255.0).sub_(mean).div_(std)


def to_normalised_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) float32, scaled to [0, 1] then normalised with BLIP mean/std."""
    return normalise(to_uint8_tensor(image))


class ImageTransform:
    """Callable `(image, rng) -> (3, S, S)` tensor; see the module docstring for the two modes."""

    def __init__(
        self,
        image_size: int,
        train: bool = False,
        scale: tuple[float, float] = (0.2, 1.0),
        hflip: bool = True,
    ) -> None:
        if image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        if not 0.0 < scale[0] <= scale[1] <= 1.0:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale}")
        self.image_size = image_size
        self.train = train
        self.scale = scale
        self.hflip = hflip

    def __call__(self, image: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        """Resize (eval) or crop+resize+flip (train) and normalise; train mode needs `rng`."""
        return normalise(self.pixels(image, rng))

    def pixels(self, image: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        """Like calling the transform, but stops before normalising: (3, S, S) uint8.

        `normalise(pixels)` gives exactly what the call gives; batch loaders use this to
        move a quarter of the bytes and normalise a whole batch in one op.
        """
        if image.mode != "RGB":
            image = image.convert("RGB")
        size = (self.image_size, self.image_size)
        if not self.train:
            return to_uint8_tensor(image.resize(size, Image.Resampling.BICUBIC))
        if rng is None:
            raise ValueError("ImageTransform(train=True) needs an rng: pass random.Random(seed) per sample")
        box = random_resized_box(image.width, image.height, self.scale, rng)
        crop = (box.left, box.top, box.left + box.width, box.top + box.height)
        out = image.resize(size, Image.Resampling.BICUBIC, box=crop)
        if self.hflip and rng.random() < 0.5:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return to_uint8_tensor(out)

    def __repr__(self) -> str:
        return (
            f"ImageTransform(image_size={self.image_size}, train={self.train}, "
            f"scale={self.scale}, hflip={self.hflip})"
        )
