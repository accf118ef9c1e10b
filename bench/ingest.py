"""Ingestion throughput: a synthetic web set served from 127.0.0.1, downloaded with
img2dataset and normalised into pairs shards, at 1 and 2 processes.

    .venv/bin/python bench/ingest.py --urls 2000 --processes 1 2 --threads 16

Prints a Markdown table: rows/s end to end (img2dataset start-up included, the way a
user meets it), the download part alone (the span of img2dataset's per-shard stats),
and our normalisation alone (decode every image, build the pairs tables; timed again
after the run, without writing).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

from data.ingest_web import WebIngestConfig, ingest_web, normalise_raw_shard, serve_folder
from data.synth import SynthConfig, generate_world, write_url_list


def _download_seconds(out: Path) -> float:
    """Wall span of img2dataset's shards (first start to last end) from its stats files."""
    stats = [json.loads(p.read_text()) for p in (out / "_img2dataset" / "raw").glob("*_stats.json")]
    return max(s["end_time"] for s in stats) - min(s["start_time"] for s in stats)


def _normalise_seconds(out: Path, cfg: WebIngestConfig) -> float:
    """Time to turn img2dataset's raw shards into pairs tables again (decode + checks)."""
    work = out / "_img2dataset"
    rows = pq.read_table(work / "input.parquet").to_pylist()
    size = cfg.rows_per_shard
    start = time.perf_counter()
    for index, first in enumerate(range(0, len(rows), size)):
        normalise_raw_shard(rows[first : first + size], work / "raw" / f"{index:05d}.parquet", cfg)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--urls", type=int, default=2000, help="web images in the served world")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--shards", type=int, default=8, help="shards the list is cut into")
    args = parser.parse_args()
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        world = root / "world"
        generate_world(world, SynthConfig(human_images=1, web_images=args.urls, test_images=1), as_urls=True)
        rows = []
        with serve_folder(world / "www") as base_url:
            url_list = write_url_list(world, base_url)
            n_rows = pq.read_metadata(url_list).num_rows  # the images plus a few broken URLs
            for processes in args.processes:
                cfg = WebIngestConfig(rows_per_shard=-(-n_rows // args.shards), processes=processes, threads=args.threads)
                out = root / f"web-p{processes}"
                start = time.perf_counter()
                stats = ingest_web(url_list, out, cfg)
                wall = time.perf_counter() - start
                download = _download_seconds(out)
                rows.append((processes, stats, wall, download, _normalise_seconds(out, cfg)))
    print(f"load average before: {load[0]:.1f} (1 min), CPUs: {os.cpu_count()}")
    print("| URLs | processes | threads | shards | ok | failed | wall s | rows/s end to end | rows/s download | rows/s normalise |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for processes, stats, wall, download, normalise in rows:
        print(
            f"| {stats.input} | {processes} | {args.threads} | {stats.shards_written} | {stats.ok} | {stats.failed} "
            f"| {wall:.1f} | {stats.input / wall:.0f} | {stats.input / download:.0f} | {stats.input / normalise:.0f} |"
        )


if __name__ == "__main__":
    main()
