"""Export throughput: a fabricated D' (web JPEGs, human and synthetic PNGs) written as
webdataset tars, BLIP/LAVIS annotation JSON + image files, and Hugging Face Parquet.

    .venv/bin/python bench/export.py --rows 4000 --side 128 --shard-size 1000

Prints a Markdown table: rows/s per format (a fresh export, then the rerun that skips
every shard), the size of the export on disk against D' itself, and a check that the
same D' exported twice gives the same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

from data.export import FORMATS, export
from data.shards import list_shards, shard_name, write_shard

ROWS_PER_INPUT_SHARD = 1000


def _image(rng: np.random.Generator, side: int, fmt: str) -> bytes:
    """A smooth random image (compresses like a photo, not like noise)."""
    small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((side, side), Image.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def fabricate(folder: Path, rows: int, side: int, seed: int = 0) -> list[Path]:
    """D' shards of `rows` rows: 40% web (JPEG), 40% synthetic captions of them (PNG), 20% human (PNG)."""
    rng = np.random.default_rng(seed)
    for index, first in enumerate(range(0, rows, ROWS_PER_INPUT_SHARD)):
        n = min(ROWS_PER_INPUT_SHARD, rows - first)
        kinds = [("human", "PNG") if i % 5 == 0 else ("web", "JPEG") if i % 5 in (1, 2) else ("synthetic", "PNG")
                 for i in range(first, first + n)]
        keys = [f"{s}-{first + i:06d}" if s != "synthetic" else f"web-{first + i:06d}/syn0" for i, (s, _) in enumerate(kinds)]
        table = pa.table({
            "key": keys,
            "image_id": [k.split("/")[0] for k in keys],
            "source": [s for s, _ in kinds],
            "caption": [f"a caption for image {k} with some words in it" for k in keys],
            "jpg": pa.array([_image(rng, side, fmt) for _, fmt in kinds], pa.binary()),
            "status": ["ok"] * n,
            "itm_score": pa.array(rng.random(n), pa.float32()),
        })
        write_shard(table, folder / shard_name(index), "dataset")
    return list_shards(folder)


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + path.read_bytes())
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--side", type=int, default=128, help="image side in pixels")
    parser.add_argument("--shard-size", type=int, default=1000, help="rows per output shard")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        root = Path(tmp)
        inputs = fabricate(root / "dprime", args.rows, args.side)
        dprime_mb = _size(root / "dprime") / 1e6
        print(f"D': {args.rows} rows, {len(inputs)} shards, {dprime_mb:.1f} MB ({args.side}px images)\n")
        print("| format | output shards | rows/s export | rows/s rerun (all skipped) | MB on disk | x D' | same bytes twice |")
        print("|---|---|---|---|---|---|---|")
        for fmt in FORMATS:
            out, again = root / fmt, root / f"{fmt}-again"
            start = time.perf_counter()
            stats = export(inputs, out, fmt, args.shard_size)
            seconds = time.perf_counter() - start
            start = time.perf_counter()
            rerun = export(inputs, out, fmt, args.shard_size)
            rerun_seconds = time.perf_counter() - start
            assert stats.rows == rerun.rows == args.rows and rerun.written == 0
            export(inputs, again, fmt, args.shard_size)
            same = _digest(out) == _digest(again)
            mb = _size(out) / 1e6
            print(f"| {fmt} | {stats.shards} | {stats.rows / seconds:,.0f} | {rerun.rows / rerun_seconds:,.0f} | "
                  f"{mb:.1f} | {mb / dprime_mb:.2f} | {same} |")


if __name__ == "__main__":
    main()
