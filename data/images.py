"""Image decoding that never crashes a stage: bytes in, an RGB image or a reason out.

Web bytes are hostile: empty bodies, HTML error pages saved as ``.jpg``, truncated
downloads, CMYK / 16-bit / palette / alpha images, animations, EXIF-rotated photos and
decompression bombs. `decode_image` turns each into either a fully loaded RGB image
(EXIF orientation applied, first frame, transparency composited on white) or a short
reason string that a stage stores in the row's ``error`` column.

Given `reduce_to` (the model's image size S), a JPEG at least 2S on its short side is
decoded by libjpeg at 1/2, 1/4 or 1/8 scale (DCT-domain, `Image.draft`), never below
S x S, which is several times faster than a full decode; the caller then resizes to
S x S as before. Other formats, and ``reduce_to=None`` (exact mode), decode in full.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 50_000_000
_SNIFF_BYTES = 512
_WHITE = (255, 255, 255)
_MAX_8BIT = 255
_MAX_16BIT = 65535
# 65535 / 255: maps the 16-bit range onto the 8-bit one.
_16_TO_8 = 257.0
_MAX_REASON_CHARS = 200


@dataclass(frozen=True)
class DecodedImage:
    """An RGB image, or None and the reason it could not be decoded."""

    image: Image.Image | None
    error: str | None

    @property
    def ok(self) -> bool:
        return self.image is not None


def _fail(reason: str) -> DecodedImage:
    return DecodedImage(image=None, error=reason[:_MAX_REASON_CHARS])


def _sniff_text(data: bytes) -> str | None:
    """Name what text-like bytes are (HTML, SVG, XML, JSON), or None for binary data."""
    head = data[:_SNIFF_BYTES].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if head.startswith((b"<!doctype html", b"<html", b"<head", b"<body")) or b"<html" in head:
        return "HTML"
    if b"<svg" in head:
        return "SVG (vector images are not supported)"
    if head.startswith(b"<?xml"):
        return "XML"
    if head.startswith((b"{", b"[")):
        return "JSON"
    return None


def _to_8bit_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB, scaling deep images and compositing alpha on white."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        return _to_8bit_rgb(image)
    if mode.startswith("I") or mode == "F":
        values = np.asarray(image, dtype=np.float64)  # (H, W)
        if mode.startswith("I;16") or (mode == "I" and values.max(initial=0) > _MAX_8BIT):
            values = np.clip(values, 0, _MAX_16BIT) / _16_TO_8
        elif mode == "F" and values.max(initial=0) <= 1.0:
            values = values * _MAX_8BIT
        gray = np.clip(np.rint(values), 0, _MAX_8BIT).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, _WHITE)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def _orient(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation; a corrupt EXIF block leaves the image as stored."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - bad EXIF must not fail an otherwise good image
        return image


def _reduce(image: Image.Image, target: int) -> None:
    """Ask libjpeg for a 1/2, 1/4 or 1/8 scale decode that stays >= target x target.

    The request is square, so it holds whatever the EXIF orientation (draft works on the
    stored image, before `_orient` turns it). Pillow's draft picks the largest scale
    whose result is at least the requested size on both sides.
    """
    if image.format != "JPEG" or min(image.size) < 2 * target:
        return
    image.draft("RGB", (target, target))


def decode_image(
    data: bytes | None, max_pixels: int = DEFAULT_MAX_PIXELS, reduce_to: int | None = None
) -> DecodedImage:
    """Decode image bytes to a fully loaded RGB image; never raises for bad bytes.

    Images with more than `max_pixels` pixels are refused from the header alone
    (before any pixel is decoded). Pillow's own global bomb limit is left untouched;
    its DecompressionBombError / Warning are caught and reported the same way.
    `reduce_to=S`: a JPEG at least 2S on its short side comes back reduced by libjpeg
    (a power of two, each side still >= S); None decodes every pixel.
    """
    if data is None or len(data) == 0:
        return _fail("empty image bytes")
    try:
        # catch_warnings swaps the process-wide filter list; a racing thread can at worst
        # see Pillow's warning as a plain warning, and the pixel check below still refuses.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                return _fail(f"decompression bomb: {width * height} pixels > limit {max_pixels}")
            if reduce_to is not None:
                _reduce(image, reduce_to)
            image.load()  # first frame, fully decoded: truncation shows up here
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return _fail(f"decompression bomb: {exc}")
    except UnidentifiedImageError:
        kind = _sniff_text(data)
        return _fail(f"not an image: looks like {kind}" if kind else "not an image: unknown format")
    except OSError as exc:
        if "truncated" in str(exc).lower():
            return _fail(f"truncated image: {exc}")
        return _fail(f"corrupt image: {exc}")
    except Exception as exc:  # noqa: BLE001 - decoders raise many types on hostile bytes
        return _fail(f"corrupt image: {type(exc).__name__}: {exc}")
    try:
        rgb = _to_8bit_rgb(_orient(image))
        rgb.load()
    except Exception as exc:  # noqa: BLE001 - an exotic mode Pillow cannot convert
        return _fail(f"unsupported image mode {image.mode}: {type(exc).__name__}: {exc}")
    return DecodedImage(image=rgb, error=None)
