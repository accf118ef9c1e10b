"""ImageTransform: matches transformers' BLIP processor in eval mode; train mode is driven by rng only."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from blip_core.image import BLIP_MEAN, BLIP_STD, ImageTransform, normalise, random_resized_box


def _image(h: int = 50, w: int = 70, seed: int = 0, mode: str = "RGB") -> Image.Image:
    pixels = np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(pixels).convert(mode)


def test_eval_matches_transformers_blip_processor() -> None:
    from transformers import BlipImageProcessor

    img = _image()
    processor = BlipImageProcessor(size={"height": 32, "width": 32})
    reference = torch.tensor(processor(img, return_tensors="np")["pixel_values"][0])  # (3, 32, 32)
    ours = ImageTransform(32)(img)
    assert ours.shape == (3, 32, 32) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)


def test_normalisation_of_a_flat_colour() -> None:
    img = Image.new("RGB", (8, 8), (255, 0, 128))
    out = ImageTransform(4)(img)
    expected = [(v / 255 - m) / s for v, m, s in zip((255, 0, 128), BLIP_MEAN, BLIP_STD)]
    for channel, value in enumerate(expected):
        torch.testing.assert_close(out[channel], torch.full((4, 4), value), atol=1e-5, rtol=0)


def test_uint8_pixels_normalised_as_a_batch_equal_the_per_image_transform() -> None:
    images = [_image(seed=s) for s in range(3)]
    for transform, rngs in ((ImageTransform(24), [None] * 3), (ImageTransform(24, train=True), [random.Random(s) for s in range(3)])):
        expected = torch.stack([transform(img, random.Random(i) if r else None) for i, (img, r) in enumerate(zip(images, rngs))])
        raw = torch.stack([transform.pixels(img, random.Random(i) if r else None) for i, (img, r) in enumerate(zip(images, rngs))])
        assert raw.dtype == torch.uint8 and raw.shape == (3, 3, 24, 24)
        assert torch.equal(normalise(raw), expected)  # bit-identical: loaders may ship uint8


def test_non_rgb_input_is_converted() -> None:
    assert ImageTransform(16)(_image(mode="L")).shape == (3, 16, 16)
    assert ImageTransform(16, train=True)(_image(mode="RGBA"), random.Random(0)).shape == (3, 16, 16)


def test_train_mode_is_a_function_of_the_rng() -> None:
    img = _image()
    transform = ImageTransform(32, train=True)
    torch.manual_seed(0)
    a = transform(img, random.Random(7))
    torch.manual_seed(1)  # global RNGs must not matter
    random.seed(123)
    b = transform(img, random.Random(7))
    assert torch.equal(a, b)
    outs = {tuple(transform(img, random.Random(s)).flatten()[:20].tolist()) for s in range(8)}
    assert len(outs) > 4  # different seeds give different crops


def test_train_mode_needs_an_rng() -> None:
    with pytest.raises(ValueError, match="rng"):
        ImageTransform(32, train=True)(_image())


def test_crop_boxes_respect_scale_and_bounds() -> None:
    rng = random.Random(0)
    for _ in range(200):
        box = random_resized_box(70, 50, (0.5, 1.0), rng)
        assert 0 <= box.left and box.left + box.width <= 70
        assert 0 <= box.top and box.top + box.height <= 50
        assert box.width * box.height >= 0.5 * 70 * 50 * 0.9  # rounding slack


def test_flip_only_when_enabled() -> None:
    # a left-right gradient: a flip reverses the column order
    ramp = np.tile(np.linspace(0, 255, 32, dtype=np.uint8)[None, :, None], (32, 1, 3))
    img = Image.fromarray(ramp)
    no_flip = ImageTransform(32, train=True, scale=(1.0, 1.0), hflip=False)
    flip = ImageTransform(32, train=True, scale=(1.0, 1.0), hflip=True)
    assert all(no_flip(img, random.Random(s))[0, 0, 0] < 0 for s in range(10))
    firsts = [flip(img, random.Random(s))[0, 0, 0].item() for s in range(20)]
    assert min(firsts) < 0 < max(firsts)
