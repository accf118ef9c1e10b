"""decode_image over a hostile corpus generated here: every case is a clean RGB image or a reason."""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from data.images import decode_image


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG claiming width x height pixels, with one tiny IDAT: a decompression bomb's header."""

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def _rgb(color: tuple[int, int, int], size: tuple[int, int] = (8, 6)) -> Image.Image:
    return Image.new("RGB", size, color)


def _center(image: Image.Image) -> tuple[int, ...]:
    return image.getpixel((image.width // 2, image.height // 2))


def _assert_ok(data: bytes, size: tuple[int, int] | None = None) -> Image.Image:
    result = decode_image(data)
    assert result.error is None, result.error
    assert result.ok and result.image is not None
    assert result.image.mode == "RGB"
    if size is not None:
        assert result.image.size == size
    return result.image


def _assert_fails(data: bytes | None, reason_start: str, **kwargs) -> str:
    result = decode_image(data, **kwargs)
    assert result.image is None and not result.ok
    assert result.error is not None and result.error.startswith(reason_start), result.error
    return result.error


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "TIFF"])
def test_ordinary_formats_decode(fmt: str) -> None:
    image = _assert_ok(_encode(_rgb((200, 30, 40)), fmt), size=(8, 6))
    assert np.allclose(_center(image), (200, 30, 40), atol=12)


def test_empty_and_missing_bytes() -> None:
    _assert_fails(None, "empty image bytes")
    _assert_fails(b"", "empty image bytes")


def test_html_error_page_and_svg_and_garbage() -> None:
    html = b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head><body>gone</body></html>"
    assert _assert_fails(html, "not an image") == "not an image: looks like HTML"
    svg = b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="4" height="4"></svg>'
    assert "SVG" in _assert_fails(svg, "not an image")
    assert _assert_fails(b"\x00\x01garbage" * 20, "not an image") == "not an image: unknown format"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_images_fail_with_reason(fmt: str) -> None:
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    data = _encode(Image.fromarray(noise), fmt)
    assert _assert_fails(data[: len(data) // 2], "truncated image: ")


def test_header_only_is_truncated() -> None:
    data = _encode(_rgb((1, 2, 3), (32, 32)), "PNG")
    _assert_fails(data[:40], "")


def test_cmyk_becomes_rgb() -> None:
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red in CMYK
    image = _assert_ok(_encode(cmyk, "JPEG", quality=95), size=(8, 8))
    r, g, b = _center(image)
    assert r > 200 and g < 60 and b < 60


def test_16bit_grayscale_is_scaled_not_clipped() -> None:
    gray16 = Image.fromarray(np.full((6, 8), 32768, dtype=np.uint16))  # mid grey
    data = _encode(gray16, "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    image = _assert_ok(data, size=(8, 6))
    assert all(abs(c - 128) <= 1 for c in _center(image))


def test_palette_with_and_without_transparency() -> None:
    palette = _rgb((0, 0, 255)).convert("P")
    image = _assert_ok(_encode(palette, "PNG"))
    assert _center(image) == (0, 0, 255)
    transparent = _rgb((0, 0, 255)).convert("P")
    index = transparent.getpixel((0, 0))
    image = _assert_ok(_encode(transparent, "PNG", transparency=index))
    assert _center(image) == (255, 255, 255)  # fully transparent -> white


def test_alpha_is_composited_on_white() -> None:
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    rgba.paste((255, 0, 0, 255), (0, 0, 4, 8))  # left half opaque red, right half transparent
    image = _assert_ok(_encode(rgba, "PNG"))
    assert image.getpixel((1, 4)) == (255, 0, 0)
    assert image.getpixel((6, 4)) == (255, 255, 255)
    la = Image.new("LA", (4, 4), (0, 128))  # black at half alpha -> mid grey
    assert all(abs(c - 127) <= 1 for c in _center(_assert_ok(_encode(la, "PNG"))))


def test_grayscale_and_bilevel() -> None:
    assert _center(_assert_ok(_encode(Image.new("L", (4, 4), 77), "PNG"))) == (77, 77, 77)
    assert _center(_assert_ok(_encode(Image.new("1", (4, 4), 1), "PNG"))) == (255, 255, 255)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_animated_takes_first_frame(fmt: str) -> None:
    frames = [_rgb((255, 0, 0)), _rgb((0, 255, 0)), _rgb((0, 0, 255))]
    data = _encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3
    r, g, b = _center(_assert_ok(data, size=(8, 6)))
    assert r > 200 and g < 40 and b < 40


# EXIF orientation -> where the top-left (red) corner of the stored image ends up.
_ORIENTATIONS = {
    1: ((0, 0), (8, 4)),
    2: ((7, 0), (8, 4)),
    3: ((7, 3), (8, 4)),
    4: ((0, 3), (8, 4)),
    5: ((0, 0), (4, 8)),
    6: ((3, 0), (4, 8)),
    7: ((3, 7), (4, 8)),
    8: ((0, 7), (4, 8)),
}


@pytest.mark.parametrize("orientation", sorted(_ORIENTATIONS))
def test_exif_orientation_is_applied(orientation: int) -> None:
    stored = Image.new("RGB", (8, 4), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 2, 2))  # a red 2x2 marker in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _encode(stored, "PNG", exif=exif.tobytes())
    corner, size = _ORIENTATIONS[orientation]
    image = _assert_ok(data, size=size)
    assert image.getpixel(corner) == (255, 0, 0)


def test_decompression_bombs_are_refused_from_the_header() -> None:
    limit_before = Image.MAX_IMAGE_PIXELS
    filters_before = list(warnings.filters)
    # Over our limit, under Pillow's own: our check, exact reason.
    assert (
        _assert_fails(_png_header_only(10_000, 6_000), "decompression bomb")
        == "decompression bomb: 60000000 pixels > limit 50000000"
    )
    # Over twice Pillow's global limit: Pillow refuses first; still a reason, not a crash.
    _assert_fails(_png_header_only(20_000, 10_000), "decompression bomb")
    # A caller-chosen limit applies to small images too.
    data = _encode(_rgb((1, 2, 3), (100, 100)), "PNG")
    assert _assert_fails(data, "decompression", max_pixels=5_000) == "decompression bomb: 10000 pixels > limit 5000"
    assert decode_image(data, max_pixels=10_000).ok
    assert Image.MAX_IMAGE_PIXELS == limit_before  # global state untouched
    assert list(warnings.filters) == filters_before


def test_wrong_extension_is_decoded_by_content() -> None:
    # A PNG served as "photo.jpg" (img2dataset names everything .jpg): content decides.
    png = _encode(_rgb((10, 200, 10)), "PNG")
    assert _center(_assert_ok(png)) == (10, 200, 10)


def test_corrupt_bytes_inside_a_valid_header() -> None:
    data = bytearray(_encode(_rgb((5, 5, 5), (32, 32)), "PNG"))
    data[60:80] = b"\xff" * 20  # smash the compressed stream
    result = decode_image(bytes(data))
    assert (result.image is None) != (result.error is None)
    if result.image is None:
        assert result.error.startswith(("corrupt image", "truncated image"))


def test_decoded_image_owns_its_pixels() -> None:
    data = _encode(_rgb((9, 9, 9)), "JPEG")
    image = _assert_ok(data)
    image.load()
    assert np.asarray(image).shape == (6, 8, 3)
