"""The held-out test set: distinct images and every caption, read from pair shards."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow.compute as pc

from data.images import decode_image
from data.shards import read_table
from data.storage import location


@dataclass
class TestSet:
    """Distinct test images (first row's bytes) and every caption row, with their labels."""

    image_ids: list[str]
    images: list[bytes]
    texts: list[str]
    text_image_ids: list[str]

    def references(self) -> dict[str, list[str]]:
        """Image id -> its reference captions."""
        refs: dict[str, list[str]] = defaultdict(list)
        for img, text in zip(self.text_image_ids, self.texts, strict=True):
            refs[img].append(text)
        return dict(refs)


def read_test_set(test_shards: Sequence[Path], max_images: int | None = None) -> TestSet:
    """Read ok rows of pair shards; rows sharing an `image_id` are one image's captions."""
    image_ids: list[str] = []
    images: list[bytes] = []
    texts: list[str] = []
    text_ids: list[str] = []
    seen: set[str] = set()
    for path in test_shards:
        t = read_table(location(path), "pairs", columns=["image_id", "caption", "jpg", "status"])
        t = t.filter(pc.equal(t["status"], "ok"))
        for img, cap, data in zip(*(t[c].to_pylist() for c in ("image_id", "caption", "jpg")), strict=True):
            if img not in seen:
                if max_images is not None and len(seen) >= max_images:
                    continue
                if data is None or not decode_image(data).ok:
                    continue
                seen.add(img)
                image_ids.append(img)
                images.append(data)
            if cap:
                texts.append(cap)
                text_ids.append(img)
    if not image_ids or not texts:
        raise ValueError(f"no usable test rows (status ok, decodable image, caption) in {[str(p) for p in test_shards]}")
    return TestSet(image_ids, images, texts, text_ids)
