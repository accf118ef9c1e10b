"""Pair shards on object storage, copied to this machine for the trainer.

The trainer (`tasks.train`, `data.dataset.PairDataset`) reads local Parquet files by
memory map, many passes over the same row groups; reading them through fsspec each
epoch would fetch every byte again. `local_shards(items)` gives local paths for the
shards the items name: a local item as is, a URL shard (or every ``part-*.parquet`` of
a URL folder) downloaded once into ``<cache>/shards/<digest>/`` with its completion
record, so `data.shards.shard_identity` (and with it a model's content-named id) is
the same for the copy as for the object. The digest covers the URL, size and ETag, so
a rewritten object is fetched again; a download goes to a private folder moved into
place whole, so a killed download is never used.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

from data.shards import completion_path, list_shards
from data.storage import RemotePath, location
from tasks.model_store import cache_root, fill_cache


def local_shards(items: Sequence[str | Path]) -> list[str]:
    """Local paths for `items` (shard files or folders; local ones returned as given)."""
    out: list[str] = []
    for item in items:
        source = location(item)
        if not isinstance(source, RemotePath):
            out.append(str(item))
            continue
        files = list_shards(source) if source.is_dir() else [source]
        if not files:
            raise FileNotFoundError(f"{source}: no part-*.parquet shards there")
        out += [str(_cached(f)) for f in files]  # type: ignore[arg-type]
    return out


def _cached(shard: RemotePath) -> Path:
    info = shard.fs.info(shard.path)
    key = f"{shard.url}\n{info.get('size')}\n{info.get('ETag') or info.get('mtime') or ''}"

    def download(folder: Path) -> None:
        shard.download(folder / shard.name)
        record = completion_path(shard)
        if record.is_file():
            record.download(folder / record.name)  # type: ignore[union-attr]

    folder = cache_root() / "shards" / hashlib.sha256(key.encode()).hexdigest()[:24]
    return fill_cache(folder, shard.name, download) / shard.name
