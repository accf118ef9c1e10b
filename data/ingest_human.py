"""Human-annotated pairs: a COCO-style captions JSON plus an image folder, or a list.

`ingest_human(src, out, cfg)` accepts

- a COCO captions JSON (``{"images": [{"id", "file_name"}], "annotations": [{"id",
  "image_id", "caption"}]}``): one row per annotation, key ``<prefix><annotation id>``,
  image_id ``<prefix>img-<image id>``;
- a BLIP-style JSON list (``[{"image": path, "caption": str | [str, ...], "image_id"?}]``);
- a Parquet / JSONL / CSV / TSV list of (image path or URL, caption). Paths are read from
  disk; a list of URLs goes through img2dataset (`data.ingest_web`) with source human.

and writes ``out/part-NNNNN.parquet`` pairs shards of `rows_per_shard` rows each, in input
order. A missing or unreadable image becomes a failed row (``file_not_found: <path>``).
A rerun skips shards whose record matches the shard's rows and these settings.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from data.images import DEFAULT_MAX_PIXELS
from data.ingest import IngestStats, RawRow, normalise_rows, write_pairs_shard
from data.ingest_web import WebIngestConfig, ingest_web, read_list_table
from data.shards import is_complete, read_completion, settings_hash, shard_name

FILE_NOT_FOUND = "file_not_found"
_URL_PREFIXES = ("http://", "https://")
_PATH_HASH_CHARS = 16


@dataclass(frozen=True)
class HumanIngestConfig:
    """How a human-annotated set is read."""

    image_col: str = "image"  # lists: the column with an image path or URL
    caption_col: str = "caption"
    image_root: str | None = None  # where relative paths live; None: next to the list / JSON
    source: str = "human"
    key_prefix: str = "human-"
    rows_per_shard: int = 1000
    max_pixels: int = DEFAULT_MAX_PIXELS
    # used only for lists of URLs (img2dataset)
    processes: int = 1
    threads: int = 16


@dataclass(frozen=True)
class Entry:
    """One row to ingest from disk."""

    key: str
    image_id: str
    caption: str | None
    path: str


def ingest_human(src: Path, out: Path, cfg: HumanIngestConfig) -> IngestStats:
    """Ingest a COCO / BLIP JSON or a pairs list into pairs shards under `out`."""
    src = Path(src)
    if not src.is_file():
        raise FileNotFoundError(f"{src}: no such captions file")
    root = Path(cfg.image_root) if cfg.image_root else src.parent
    if src.suffix.lower() == ".json":
        loaded = _load_json(src)
        if loaded is not None:
            return write_entries(_json_entries(src, loaded, root, cfg), out, cfg)
    return _ingest_list(src, out, root, cfg)


def _load_json(src: Path) -> object | None:
    """The parsed JSON, or None when the file is JSON Lines instead."""
    try:
        return json.loads(src.read_text())
    except json.JSONDecodeError:
        return None


def _json_entries(src: Path, loaded: object, root: Path, cfg: HumanIngestConfig) -> list[Entry]:
    p = cfg.key_prefix
    if isinstance(loaded, dict) and "annotations" in loaded and "images" in loaded:
        files = {img["id"]: img["file_name"] for img in loaded["images"]}
        entries = []
        for i, ann in enumerate(loaded["annotations"]):
            if ann.get("image_id") not in files:
                raise ValueError(f"{src}: annotation {i} names image_id {ann.get('image_id')!r}, absent from 'images'")
            path = str(root / files[ann["image_id"]])
            entries.append(Entry(f"{p}{ann.get('id', i)}", f"{p}img-{ann['image_id']}", ann.get("caption"), path))
        return entries
    if isinstance(loaded, list):
        entries = []
        for i, item in enumerate(loaded):
            if not isinstance(item, dict) or "image" not in item or "caption" not in item:
                raise ValueError(f"{src}: item {i} needs 'image' and 'caption' fields (BLIP-style list)")
            path = str(root / item["image"])
            image_id = f"{p}img-{item['image_id']}" if "image_id" in item else _path_image_id(p, path)
            captions = item["caption"] if isinstance(item["caption"], list) else [item["caption"]]
            entries += [Entry(f"{p}{i:08d}-{j}", image_id, c, path) for j, c in enumerate(captions)]
        return entries
    raise ValueError(f"{src}: expected a COCO captions dict (images + annotations) or a BLIP-style list")


def _path_image_id(prefix: str, path: str) -> str:
    return f"{prefix}{hashlib.sha1(path.encode()).hexdigest()[:_PATH_HASH_CHARS]}"


def _ingest_list(src: Path, out: Path, root: Path, cfg: HumanIngestConfig) -> IngestStats:
    table = read_list_table(src, None)
    names = table.column_names
    for col in (cfg.image_col, cfg.caption_col):
        if col not in names:
            raise ValueError(f"{src}: no column {col!r} (columns: {names}); pass the right column name")
    images = [str(v) if v is not None else "" for v in table.column(cfg.image_col).to_pylist()]
    urls = [v.startswith(_URL_PREFIXES) for v in images]
    if any(urls):
        if not all(urls):
            raise ValueError(
                f"{src}: row {urls.index(True)} is a URL but row {urls.index(False)} is a path; "
                "split URLs and paths into two lists"
            )
        web = WebIngestConfig(
            url_col=cfg.image_col,
            caption_col=cfg.caption_col,
            source=cfg.source,
            key_prefix=cfg.key_prefix,
            rows_per_shard=cfg.rows_per_shard,
            processes=cfg.processes,
            threads=cfg.threads,
            max_pixels=cfg.max_pixels,
        )
        return ingest_web(src, out, web)
    captions = table.column(cfg.caption_col).to_pylist()
    keys = table.column("key").cast("string").to_pylist() if "key" in names else None
    ids = table.column("image_id").cast("string").to_pylist() if "image_id" in names else None
    entries = []
    for i, (image, caption) in enumerate(zip(images, captions)):
        path = str(root / image)
        key = keys[i] if keys else f"{cfg.key_prefix}{i:08d}"
        entries.append(Entry(key, ids[i] if ids else _path_image_id(cfg.key_prefix, path), caption, path))
    return write_entries(entries, out, cfg)


def write_entries(entries: list[Entry], out: Path, cfg: HumanIngestConfig) -> IngestStats:
    """Read each entry's image file and write pairs shards of `cfg.rows_per_shard` rows.

    Only one shard's images are in memory at a time; complete shards are skipped.
    """
    keys = [e.key for e in entries]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate keys among the input rows, e.g. {sorted(k for k in set(keys) if keys.count(k) > 1)[:3]}")
    settings = settings_hash({**cfg.__dict__, "image_root": cfg.image_root, "kind": "human-files"})
    size = max(1, cfg.rows_per_shard)
    stats = IngestStats()
    for index, start in enumerate(range(0, len(entries), size)):
        chunk = entries[start : start + size]
        path = Path(out) / shard_name(index)
        fingerprint = settings_hash([e.__dict__ for e in chunk])
        if is_complete(path, fingerprint, settings):
            record = read_completion(path)
            assert record is not None
            stats.add(record, written=False)
            continue
        rows = [_read_entry(e) for e in chunk]
        stats.add(write_pairs_shard(normalise_rows(rows, cfg.source, cfg.max_pixels), path, fingerprint, settings), True)
    return stats


def _read_entry(entry: Entry) -> RawRow:
    row = RawRow(key=entry.key, image_id=entry.image_id, caption=entry.caption, data=None, url=None)
    try:
        row.data = Path(entry.path).read_bytes()
    except OSError as exc:
        row.error = f"{FILE_NOT_FOUND}: {entry.path} ({exc.strerror or exc})"
    return row
