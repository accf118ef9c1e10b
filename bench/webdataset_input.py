"""Reading img2dataset's webdataset format in place against its parquet format, same samples.

    .venv/bin/python bench/webdataset_input.py --rows 2000 --shards 2 --side 256

Writes the same photo-like JPEGs (img2dataset's default 256 px) as img2dataset's two
output formats: ``NNNNN.parquet`` with a ``jpg`` column, and ``NNNNN.tar`` (webdataset
library's TarWriter) + sidecar. Prints a Markdown table of rows/s for

- the stages' reader (`data.inputs.read_pairs`: join, adapter, decode check of every image),
- the join alone (no decoding): `pq.read_table` of the parquet format against
  `data.webdataset_input.webdataset_rows` (stream the tar, join the sidecar),
- copying the webdataset folder into our Parquet first (`capfilt ingest img2dataset`,
  the way before) and then reading that copy, against reading the tars in place,

with each ratio to the parquet format (or to the copy) and a check that both formats
give the same rows. Each figure is the best of `--repeat` runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds

from data.ingest_web import ImportConfig, import_img2dataset
from data.inputs import expand_inputs, read_pairs
from data.shards import list_shards, read_table
from data.synth_photo import photo_jpeg
from data.webdataset_input import webdataset_rows


def _write(root: Path, rows: int, shards: int, side: int) -> tuple[list[Path], list[Path]]:
    """The same samples as img2dataset's parquet format (root/parquet) and webdataset
    format (root/wds); returns the parquet files and the tars."""
    per = -(-rows // shards)
    for fmt in ("parquet", "wds"):
        (root / fmt).mkdir()
    for index in range(shards):
        keys = [f"{i:09d}" for i in range(index * per, min(rows, (index + 1) * per))]
        images = [photo_jpeg(int(k), side, side) for k in keys]
        meta = {
            "key": keys, "url": [f"http://example.com/{k}.jpg" for k in keys], "caption": [f"photo {k}" for k in keys],
            "status": ["success"] * len(keys), "error_message": pa.nulls(len(keys), pa.string()),
            "width": [side] * len(keys), "height": [side] * len(keys),
        }  # fmt: skip
        pq.write_table(pa.table({**meta, "jpg": pa.array(images, pa.binary())}), root / "parquet" / f"{index:05d}.parquet")
        pq.write_table(pa.table(meta), root / "wds" / f"{index:05d}.parquet")
        with open(root / "wds" / f"{index:05d}.tar", "wb") as handle:
            writer = wds.TarWriter(handle)
            for key, image in zip(keys, images):
                writer.write({"__key__": key, "jpg": image, "txt": f"photo {key}", "json": json.dumps({"key": key})})
            writer.close()
    return expand_inputs([root / "parquet"]), expand_inputs([root / "wds"])


def _best(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--side", type=int, default=256, help="image side in pixels (img2dataset's default 256)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        parquets, tars = _write(root, args.rows, args.shards, args.side)
        same = all(read_pairs(p).to_pylist() == read_pairs(t).to_pylist() for p, t in zip(parquets, tars))

        def copy_then_read() -> None:
            shutil.rmtree(root / "copy", ignore_errors=True)
            import_img2dataset(root / "wds", root / "copy", ImportConfig())
            for path in list_shards(root / "copy"):
                read_table(path, "pairs")

        figures = {
            "read_pairs, parquet format": _best(lambda: [read_pairs(p) for p in parquets], args.repeat),
            "read_pairs, webdataset in place": _best(lambda: [read_pairs(t) for t in tars], args.repeat),
            "join only, parquet format (pq.read_table)": _best(lambda: [pq.read_table(p) for p in parquets], args.repeat),
            "join only, webdataset in place (webdataset_rows)": _best(lambda: [webdataset_rows(t) for t in tars], args.repeat),
            "copy into our Parquet, then read (before)": _best(copy_then_read, args.repeat),
        }
    base = {name: figures["read_pairs, parquet format"] for name in list(figures)[:2]}
    base |= {name: figures["join only, parquet format (pq.read_table)"] for name in list(figures)[2:4]}
    base["copy into our Parquet, then read (before)"] = figures["read_pairs, webdataset in place"]
    print(f"{args.rows} rows, {args.shards} shards, {args.side}x{args.side} JPEG; load average {os.getloadavg()[0]:.2f}; "
          f"both formats give the same rows: {same}\n")  # fmt: skip
    print("| read | seconds | rows/s | time vs reference |")
    print("|---|---:|---:|---:|")
    for name, seconds in figures.items():
        ratio = seconds / base[name]
        print(f"| {name} | {seconds:.3f} | {args.rows / seconds:,.0f} | {ratio:.2f}x |")
    print("\nreference: the parquet format for the first four rows; webdataset in place for the copy.")


if __name__ == "__main__":
    main()
