"""A hostile web corpus, generated (not committed): image files served over HTTP, a URL
list that points at them with hostile captions, duplicates, empty URLs and non-HTTP
schemes, and what each row may end as.

`write_corpus(folder)` writes ``www/<file>`` and ``urls.jsonl`` and returns the cases.
Every case is deterministic (fixed seeds), so a sweep over it is repeatable.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

SIDE = 20  # pixels of the ordinary test images
HUGE_SIDE = 60_000  # a header claiming 3.6e9 pixels: a decompression bomb


@dataclass(frozen=True)
class Case:
    """One URL-list row: `expect` is "ok" (its bytes decode), "failed" (no usable image)."""

    key: str
    url: str
    caption: str | None
    expect: str
    what: str  # what is hostile about it


def _encode(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _noise(seed: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(SIDE, SIDE, 3), dtype=np.uint8)).convert(mode)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels but holds almost nothing (a bomb's header)."""

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def _exif_rotated(orientation: int) -> bytes:
    image = Image.new("RGB", (SIDE, SIDE // 2), (200, 30, 30))
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _encode(image, "JPEG", exif=exif.tobytes())


def _animated(fmt: str) -> bytes:
    frames = [Image.new("RGB", (SIDE, SIDE), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    return _encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=50, loop=0)


def _sixteen_bit() -> bytes:
    ramp = (np.arange(SIDE * SIDE, dtype=np.uint16).reshape(SIDE, SIDE) * 150).astype(np.uint16)
    return _encode(Image.fromarray(ramp), "PNG")


def image_files() -> dict[str, tuple[bytes, str, str]]:
    """file name -> (bytes, expect, what)."""
    jpeg = _encode(_noise(1), "JPEG")
    alpha = _noise(2, "RGBA")
    alpha.putalpha(Image.new("L", alpha.size, 90))
    return {
        "plain.jpg": (jpeg, "ok", "ordinary JPEG"),
        "cmyk.jpg": (_encode(_noise(3, "CMYK"), "JPEG"), "ok", "CMYK JPEG"),
        "gray16.png": (_sixteen_bit(), "ok", "16-bit grayscale PNG"),
        "alpha.png": (_encode(alpha, "PNG"), "ok", "RGBA with transparency"),
        "palette.gif": (_encode(_noise(4, "P"), "GIF"), "ok", "palette GIF"),
        "animated.gif": (_animated("GIF"), "ok", "animated GIF"),
        "animated.webp": (_animated("WEBP"), "ok", "animated WebP"),
        "exif6.jpg": (_exif_rotated(6), "ok", "EXIF orientation 6"),
        "exif8.jpg": (_exif_rotated(8), "ok", "EXIF orientation 8"),
        "really-png.jpg": (_encode(_noise(5), "PNG"), "ok", "PNG bytes named .jpg"),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "failed", "JPEG cut in half"),
        "zero.jpg": (b"", "failed", "zero bytes"),
        "error-page.jpg": (b"<!doctype html><html><body>404 Not Found</body></html>", "failed", "HTML error page"),
        "vector.svg": (b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"><rect width="9" height="9"/></svg>',
                       "failed", "SVG (not a raster image)"),  # fmt: skip
        "bomb.png": (_png_header_only(HUGE_SIDE, HUGE_SIDE), "failed", "huge dimensions (3.6e9 pixels)"),
        "garbage.bin": (bytes(np.random.default_rng(6).integers(0, 256, 512, dtype=np.uint8)), "failed", "random bytes"),
    }


HOSTILE_CAPTIONS: dict[str, str | None] = {
    "null": None,
    "empty": "",
    "whitespace": " \t\n\u00a0 ",
    "very_long": "a red square on the grass " * 400,
    "control": "a\x00red\x07square\x1b[31m on\rthe\x7fgrass",
    "mixed_scripts": "кошка 猫 cat قطة billede ของ แมว",
    "emoji": "🐱🔥👍🏽 a cat 🏳️‍🌈",
    "bidi": "a \u202ered square\u202c on \u200bthe grass",
    "ordinary": "a red square on the grass",
}


def cases(base_url: str, secret: Path) -> list[Case]:
    """Every URL-list row: each image with an ordinary caption, each hostile caption on a
    good image, duplicates, a missing file, empty URLs and non-HTTP schemes (one of them a
    `file://` URL of a real image outside the corpus, which must never be read)."""
    out: list[Case] = []
    for name, (_, expect, what) in image_files().items():
        out.append(Case(f"img-{name}", f"{base_url}/{name}", "a red square on the grass", expect, what))
    for name, text in HOSTILE_CAPTIONS.items():
        out.append(Case(f"cap-{name}", f"{base_url}/plain.jpg", text, "ok", f"caption: {name}"))
    out += [
        Case("dup-1", f"{base_url}/exif6.jpg", "a duplicate url", "ok", "duplicate URL (first)"),
        Case("dup-2", f"{base_url}/exif6.jpg", "a duplicate url", "ok", "duplicate URL (second)"),
        Case("missing", f"{base_url}/no-such-file.jpg", "gone", "failed", "HTTP 404"),
        Case("url-empty", "", "no url", "failed", "empty URL"),
        Case("url-blank", "   ", "blank url", "failed", "whitespace URL"),
        Case("url-file", secret.resolve().as_uri(), "a local file", "failed", "file:// scheme (local file)"),
        Case("url-ftp", "ftp://127.0.0.1/plain.jpg", "ftp", "failed", "ftp:// scheme"),
        Case("url-js", "javascript:alert(1)", "script", "failed", "javascript: scheme"),
        Case("url-data", "data:image/gif;base64,R0lGODlhAQABAAAAACw=", "inline", "failed", "data: URL"),
        Case("url-relative", "plain.jpg", "relative", "failed", "relative URL"),
    ]
    return out


def write_corpus(folder: Path, base_url: str) -> tuple[Path, list[Case]]:
    """Write ``www/`` (the served files), a secret image outside it and ``urls.jsonl``.

    Returns (url list path, cases). Rewriting is harmless: the content is fixed.
    """
    www = folder / "www"
    www.mkdir(parents=True, exist_ok=True)
    for name, (data, _, _) in image_files().items():
        (www / name).write_bytes(data)
    secret = folder / "secret.png"
    secret.write_bytes(_encode(_noise(7), "PNG"))
    rows = cases(base_url, secret)
    url_list = folder / "urls.jsonl"
    with url_list.open("w") as f:
        for case in rows:
            f.write(json.dumps({"key": case.key, "url": case.url, "caption": case.caption}) + "\n")
    return url_list, rows
