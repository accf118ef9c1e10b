"""Small inputs for the CapFilt stage tests: pair shards with real JPEG bytes and a tiny
random MED checkpoint saved (with its tokenizer) into a temporary folder."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

import blip_core
from blip_core.med import MED
from blip_core.tokenizer import build_tokenizer
from data.shards import shard_name, write_shard

WORDS = ["a", "red", "blue", "green", "square", "circle", "on", "the", "grass", "dog", "cat", "two", "small", "big"]


def jpeg(index: int, size: int = 24) -> bytes:
    """A small JPEG whose content depends on `index`."""
    rng = np.random.default_rng(index)
    pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def caption(index: int) -> str:
    rng = np.random.default_rng(1000 + index)
    return " ".join(rng.choice(WORDS, size=int(rng.integers(2, 9))))


def web_rows(start: int, n: int, failed: tuple[int, ...] = (), garbage: tuple[int, ...] = ()) -> list[dict]:
    """Web pair rows `start .. start+n-1`; offsets in `failed` have status failed, offsets in
    `garbage` have status ok but bytes that do not decode."""
    rows = []
    for offset in range(n):
        i = start + offset
        data = jpeg(i)
        row = {
            "key": f"w{i:04d}", "image_id": f"img{i:04d}", "source": "web", "caption": caption(i),
            "jpg": data, "url": f"http://example.com/{i}.jpg", "width": 24, "height": 24,
            "sha256": hashlib.sha256(data).hexdigest(), "status": "ok", "error": None,
        }
        if offset in failed:
            row.update(jpg=None, sha256=None, status="failed", error="HTTP 404")
        if offset in garbage:
            row.update(jpg=b"<html>not an image</html>", sha256=None)
        rows.append(row)
    return rows


def write_pairs(path: Path, rows: list[dict]) -> Path:
    schema = pa.schema(
        [
            ("key", pa.string()), ("image_id", pa.string()), ("source", pa.string()), ("caption", pa.string()),
            ("jpg", pa.binary()), ("url", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
            ("sha256", pa.string()), ("status", pa.string()), ("error", pa.string()),
        ]
    )
    write_shard(pa.Table.from_pylist(rows, schema=schema), path, kind="pairs")
    return path


def web_shards(folder: Path, sizes: tuple[int, ...], failed: tuple[int, ...] = (1,), garbage: tuple[int, ...] = ()) -> list[Path]:
    """One web shard per size, keys unique across shards."""
    paths, start = [], 0
    for index, n in enumerate(sizes):
        paths.append(write_pairs(folder / shard_name(index), web_rows(start, n, failed, garbage)))
        start += n
    return paths


def tiny_model(folder: Path, seed: int = 0, image_size: int = 32) -> Path:
    """A random tiny MED with a tokenizer built on the test vocabulary, saved into `folder`."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer([" ".join(WORDS)] * 4, vocab_size=200)
    config = blip_core.preset("tiny").with_tokenizer(tokenizer).with_image_size(image_size)
    blip_core.save(MED(config), tokenizer, folder)
    return folder
