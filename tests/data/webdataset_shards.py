"""Hand-built img2dataset shards of the same samples in both of its formats: parquet
(``NNNNN.parquet`` with a ``jpg`` column) and webdataset (``NNNNN.tar`` written with the
`webdataset` library's TarWriter + sidecar ``NNNNN.parquet`` + ``NNNNN_stats.json``),
laid out as img2dataset lays them out (failed fetches only in the Parquet)."""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds
from PIL import Image

HTML = b"<!doctype html><html><body>404 page saved as .jpg</body></html>"


def jpeg(index: int, size: int = 24) -> bytes:
    """A small JPEG whose pixels depend on `index`."""
    pixels = np.random.default_rng(index).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


@dataclass
class Sample:
    """One input URL's outcome in img2dataset's terms."""

    key: str
    caption: str | None
    data: bytes | None  # None: img2dataset failed to fetch it
    error: str | None = None

    @property
    def status(self) -> str:
        return "success" if self.data is not None else "failed_to_download"


def samples(start: int, n: int, failed: tuple[int, ...] = (), garbage: tuple[int, ...] = ()) -> list[Sample]:
    """Samples `start .. start+n-1` (offsets in `failed` not fetched, in `garbage` an HTML page)."""
    out = []
    for offset in range(n):
        i = start + offset
        data: bytes | None = HTML if offset in garbage else jpeg(i)
        error = None
        if offset in failed:
            data, error = None, "HTTP Error 404: Not Found"
        out.append(Sample(key=f"{i:09d}", caption=f"photo number {i}", data=data, error=error))
    return out


def metadata(rows: list[Sample]) -> dict[str, list]:
    """img2dataset's metadata columns (no bytes) for `rows`."""
    ok = [r.data is not None for r in rows]
    size = pa.array([24 if o else None for o in ok], pa.int64())
    return {
        "key": [r.key for r in rows],
        "url": [f"http://example.com/{r.key}.jpg" for r in rows],
        "caption": [r.caption for r in rows],
        "status": [r.status for r in rows],
        "error_message": [r.error for r in rows],
        "width": size, "height": size, "original_width": size, "original_height": size,
        "exif": pa.nulls(len(rows), pa.string()),
        "sha256": [hashlib.sha256(r.data).hexdigest() if r.data else None for r in rows],
    }  # fmt: skip


def write_parquet_format(folder: Path, index: int, rows: list[Sample]) -> Path:
    """img2dataset's parquet output format: the metadata plus the ``jpg`` bytes column."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{index:05d}.parquet"
    pq.write_table(pa.table({**metadata(rows), "jpg": pa.array([r.data for r in rows], pa.binary())}), path)
    return path


def tar_bytes(rows: list[Sample], ext: str = "jpg") -> bytes:
    """A webdataset tar of the fetched `rows` (KEY.<ext>, KEY.txt, KEY.json), as img2dataset writes it."""
    buffer = io.BytesIO()
    writer = wds.TarWriter(buffer)
    for r in rows:
        if r.data is None:
            continue
        meta = {"key": r.key, "url": f"http://example.com/{r.key}.jpg", "caption": r.caption, "status": r.status}
        writer.write({"__key__": r.key, ext: r.data, "txt": r.caption or "", "json": json.dumps(meta)})
    writer.close()
    return buffer.getvalue()


def write_webdataset_format(folder: Path, index: int, rows: list[Sample], sidecar_rows: list[Sample] | None = None) -> Path:
    """img2dataset's webdataset output format for `rows`; the sidecar lists `sidecar_rows`
    (default: the same rows), so a test can make the two disagree. Returns the tar."""
    folder.mkdir(parents=True, exist_ok=True)
    tar = folder / f"{index:05d}.tar"
    tar.write_bytes(tar_bytes(rows))
    listed = rows if sidecar_rows is None else sidecar_rows
    pq.write_table(pa.table(metadata(listed)), folder / f"{index:05d}.parquet")
    stats = {"count": len(listed), "successes": sum(r.data is not None for r in listed)}
    (folder / f"{index:05d}_stats.json").write_text(json.dumps(stats))
    return tar
