"""decode_image(reduce_to=S): libjpeg's DCT-domain reduce for large JPEGs, never below S x S."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from blip_core.image import ImageTransform
from data.images import decode_image
from data.synth_photo import photo_jpeg, photo_like

# Mean absolute difference (grey levels, 0-255) allowed between the reduced and exact
# paths' model-size pixels; measured 0.13-0.70 on these images (issue 16).
_MAX_MEAN_ABS = 1.5
_ORIENTATION = 0x0112


def _pixels(data: bytes, size: int, reduce_to: int | None) -> np.ndarray:
    decoded = decode_image(data, reduce_to=reduce_to)
    assert decoded.ok, decoded.error
    return ImageTransform(size).pixels(decoded.image).numpy().astype(np.int16)  # (3, S, S)


@pytest.mark.parametrize(("width", "height", "size", "expected"), [
    (1600, 1200, 384, (800, 600)),  # min(1600//384, 1200//384) = 3 -> scale 1/2
    (1600, 1200, 224, (400, 300)),  # 5 -> 1/4
    (1600, 1200, 32, (200, 150)),   # 37 -> 1/8 (the largest libjpeg offers)
    (640, 480, 224, (320, 240)),    # 2 -> 1/2
    (640, 480, 384, (640, 480)),    # short side < 2 x 384: full decode
    (256, 256, 224, (256, 256)),
])  # fmt: skip
def test_reduced_size_stays_at_least_the_target(width: int, height: int, size: int, expected: tuple[int, int]) -> None:
    data = photo_jpeg(0, width, height)
    reduced = decode_image(data, reduce_to=size).image
    assert reduced is not None and reduced.mode == "RGB"
    assert reduced.size == expected and min(reduced.size) >= size
    assert decode_image(data).image.size == (width, height)  # exact mode: every pixel


@pytest.mark.parametrize(("width", "height", "size"), [(1600, 1200, 384), (1600, 1200, 224), (640, 480, 224), (1600, 1200, 32)])
def test_model_pixels_close_to_the_exact_path(width: int, height: int, size: int) -> None:
    for seed in range(3):
        data = photo_jpeg(seed, width, height)
        diff = np.abs(_pixels(data, size, size) - _pixels(data, size, None))
        assert diff.mean() < _MAX_MEAN_ABS, (seed, diff.mean())


def test_exif_rotation_is_the_same_in_both_modes() -> None:
    exif = Image.Exif()
    exif[_ORIENTATION] = 6  # stored landscape, shown rotated 90 degrees clockwise: portrait
    data = photo_jpeg(1, 1600, 1200, exif=exif.tobytes())
    exact, reduced = decode_image(data).image, decode_image(data, reduce_to=224).image
    assert exact.size == (1200, 1600) and reduced.size == (300, 400)
    diff = np.abs(_pixels(data, 224, 224) - _pixels(data, 224, None))
    assert diff.mean() < _MAX_MEAN_ABS
    # a mismatched rotation would be far off: compare against the unrotated stored image
    stored = ImageTransform(224).pixels(photo_like(1, 1600, 1200)).numpy().astype(np.int16)
    assert np.abs(stored - _pixels(data, 224, 224)).mean() > 5 * _MAX_MEAN_ABS


def test_png_is_untouched() -> None:
    buffer = io.BytesIO()
    photo_like(2, 1600, 1200).save(buffer, format="PNG")
    data = buffer.getvalue()
    reduced, exact = decode_image(data, reduce_to=224).image, decode_image(data).image
    assert reduced.size == exact.size == (1600, 1200)
    assert np.array_equal(np.asarray(reduced), np.asarray(exact))


def test_truncated_jpeg_is_an_error_not_an_exception() -> None:
    data = photo_jpeg(3, 1600, 1200)
    result = decode_image(data[: len(data) // 2], reduce_to=224)
    assert not result.ok and result.error.startswith("truncated image")


def test_pixel_limit_is_checked_on_the_header_size() -> None:
    data = photo_jpeg(4, 1600, 1200)
    result = decode_image(data, max_pixels=1_000_000, reduce_to=224)  # reduced: 120,000 px; header: 1.92 M
    assert not result.ok and result.error.startswith("decompression bomb")
