"""Video-text pairs: a folder of video files plus a captions file -> ``videos`` shards.

`ingest_videos(src, out, cfg)` reads the captions file (`src` itself, or the one
``*.csv`` / ``*.tsv`` / ``*.jsonl`` / ``*.json`` inside the folder `src`) in any of

- a CSV / TSV / JSONL list with a path column (``path`` or ``video``) and ``caption``
  (optional ``key`` and ``video_id`` columns);
- MSR-VTT's annotation JSON (``{"videos": [{"video_id": "video0", ...}], "sentences":
  [{"video_id": "video0", "caption": ..., "sen_id": 0}]}``; files ``<video_id>.mp4``);
- a BLIP-style JSON list (``[{"video": path, "caption": str | [str, ...]}]``),

and writes ``out/part-NNNNN.parquet`` (kind ``videos``) of `rows_per_shard` rows in input
order, then each shard's completion record. Every row is accounted for: ``ok`` when its
file decodes (`data.video.probe`: header, limits, two frames), else ``failed`` with
``error`` = ``"<kind>: <detail>"`` (``file_not_found``, and `data.video`'s kinds: empty,
undecodable, no_video_stream, too_long, too_large, truncated). A rerun skips shards
whose record matches the shard's rows and these settings.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa

from data.ingest import IngestStats, counts_of
from data.ingest_web import read_list_table
from data.shards import CompletionRecord, is_complete, read_completion, settings_hash, shard_name, write_completion, write_shard
from data.video import VideoLimits, probe

FILE_NOT_FOUND = "file_not_found"
CAPTION_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json")
PATH_COLUMNS = ("path", "video")
MSRVTT_SUFFIX = ".mp4"
_ID_HASH_CHARS = 16


@dataclass(frozen=True)
class VideoIngestConfig:
    """How a video set is read and what counts as a usable clip."""

    source: str = "human"
    key_prefix: str = "video-"
    video_root: str | None = None  # where relative paths live; None: the captions file's folder
    rows_per_shard: int = 500
    max_duration_s: float = VideoLimits.max_duration_s
    max_bytes: int = VideoLimits.max_bytes
    max_frame_pixels: int = VideoLimits.max_frame_pixels

    def limits(self) -> VideoLimits:
        return VideoLimits(self.max_duration_s, self.max_bytes, self.max_frame_pixels)


@dataclass(frozen=True)
class VideoEntry:
    """One row to ingest: a caption of the clip at `path`."""

    key: str
    video_id: str
    caption: str | None
    path: str


def find_captions_file(src: Path) -> Path:
    """`src` when it is a file, else the single captions file in the folder `src`."""
    src = Path(src)
    if src.is_file():
        return src
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: no such folder or captions file")
    found = sorted(p for p in src.iterdir() if p.is_file() and p.suffix.lower() in CAPTION_SUFFIXES)
    if len(found) != 1:
        names = ", ".join(p.name for p in found) or "none"
        raise ValueError(f"{src}: expected one captions file ({'/'.join(CAPTION_SUFFIXES)}), found {names}; pass it as SRC")
    return found[0]


def read_entries(captions: Path, cfg: VideoIngestConfig) -> list[VideoEntry]:
    """The rows a captions file lists, paths resolved against the video root."""
    captions = Path(captions)
    root = Path(cfg.video_root) if cfg.video_root else captions.parent
    if captions.suffix.lower() == ".json":
        try:
            loaded = json.loads(captions.read_text())
        except json.JSONDecodeError:
            loaded = None  # JSON Lines under a .json name
        if loaded is not None:
            return _json_entries(captions, loaded, root, cfg.key_prefix)
    return _list_entries(captions, root, cfg.key_prefix)


def _json_entries(src: Path, loaded: object, root: Path, prefix: str) -> list[VideoEntry]:
    if isinstance(loaded, dict) and "sentences" in loaded:  # MSR-VTT
        known = {str(v["video_id"]) for v in loaded.get("videos", [])}
        entries = []
        for i, s in enumerate(loaded["sentences"]):
            vid = str(s.get("video_id"))
            if known and vid not in known:
                raise ValueError(f"{src}: sentence {i} names video_id {vid!r}, absent from 'videos'")
            path = str(root / f"{vid}{MSRVTT_SUFFIX}")
            entries.append(VideoEntry(f"{prefix}{s.get('sen_id', i)}", f"{prefix}{vid}", s.get("caption"), path))
        return entries
    if isinstance(loaded, list):
        entries = []
        for i, item in enumerate(loaded):
            if not isinstance(item, dict) or "video" not in item or "caption" not in item:
                raise ValueError(f"{src}: item {i} needs 'video' and 'caption' fields (BLIP-style list)")
            path = str(root / item["video"])
            vid = f"{prefix}{item['video_id']}" if "video_id" in item else _path_id(prefix, path)
            captions = item["caption"] if isinstance(item["caption"], list) else [item["caption"]]
            entries += [VideoEntry(f"{prefix}{i:08d}-{j}", vid, c, path) for j, c in enumerate(captions)]
        return entries
    raise ValueError(f"{src}: expected MSR-VTT's annotation JSON (videos + sentences) or a BLIP-style list")


def _list_entries(src: Path, root: Path, prefix: str) -> list[VideoEntry]:
    table = read_list_table(src, None)
    names = table.column_names
    path_col = next((c for c in PATH_COLUMNS if c in names), None)
    if path_col is None or "caption" not in names:
        raise ValueError(f"{src}: needs a path column ({' or '.join(PATH_COLUMNS)}) and 'caption' (columns: {names})")
    paths = [str(root / str(p)) if p is not None else "" for p in table.column(path_col).to_pylist()]
    captions = table.column("caption").to_pylist()
    keys = table.column("key").cast("string").to_pylist() if "key" in names else None
    ids = table.column("video_id").cast("string").to_pylist() if "video_id" in names else None
    return [
        VideoEntry(keys[i] if keys else f"{prefix}{i:08d}", ids[i] if ids else _path_id(prefix, path), caption, path)
        for i, (path, caption) in enumerate(zip(paths, captions))
    ]


def _path_id(prefix: str, path: str) -> str:
    return f"{prefix}{hashlib.sha1(path.encode()).hexdigest()[:_ID_HASH_CHARS]}"


def ingest_videos(src: Path, out: Path, cfg: VideoIngestConfig | None = None) -> IngestStats:
    """Ingest the captions file at (or in) `src` and its videos into shards under `out`."""
    cfg = cfg or VideoIngestConfig()
    return write_video_entries(read_entries(find_captions_file(src), cfg), Path(out), cfg)


def write_video_entries(entries: list[VideoEntry], out: Path, cfg: VideoIngestConfig) -> IngestStats:
    """Probe each entry's file and write ``videos`` shards of `cfg.rows_per_shard` rows.

    Only one shard's videos are in memory at a time; a clip captioned by several rows
    is read and probed once per shard; complete shards are skipped.
    """
    keys = [e.key for e in entries]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate keys among the input rows, e.g. {sorted(k for k in set(keys) if keys.count(k) > 1)[:3]}")
    settings = settings_hash({**asdict(cfg), "kind": "video-files"})
    size = max(1, cfg.rows_per_shard)
    stats = IngestStats()
    for index, start in enumerate(range(0, len(entries), size)):
        chunk = entries[start : start + size]
        path = Path(out) / shard_name(index)
        fingerprint = settings_hash([{**asdict(e), "bytes": _size(e.path)} for e in chunk])
        if is_complete(path, fingerprint, settings):
            record = read_completion(path)
            assert record is not None
            stats.add(record, written=False)
            continue
        stats.add(write_videos_shard(videos_table(chunk, cfg), path, fingerprint, settings), written=True)
    return stats


def _size(path: str) -> int | None:
    try:
        return Path(path).stat().st_size
    except OSError:
        return None


def videos_table(entries: list[VideoEntry], cfg: VideoIngestConfig) -> pa.Table:
    """Read and probe each entry's file: a ``videos`` table (not yet written)."""
    probed: dict[str, tuple[bytes | None, dict]] = {}
    rows = []
    for e in entries:
        if e.path not in probed:
            probed[e.path] = _read_and_probe(e.path, cfg.limits())
        data, meta = probed[e.path]
        rows.append({"key": e.key, "video_id": e.video_id, "source": cfg.source, "caption": e.caption,
                     "path": e.path, "video": data, **meta})  # fmt: skip
    return video_rows_table(rows)


def _read_and_probe(path: str, limits: VideoLimits) -> tuple[bytes | None, dict]:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        return None, {"status": "failed", "error": f"{FILE_NOT_FOUND}: {path} ({exc.strerror or exc})"}
    decoded = probe(data, limits)
    if not decoded.ok:
        return None, {"status": "failed", "error": decoded.error}
    info = decoded.info
    assert info is not None
    meta = {"status": "ok", "error": None, "duration": info.duration_s, "fps": info.fps, "width": info.width,
            "height": info.height, "codec": info.codec, "sha256": hashlib.sha256(data).hexdigest()}  # fmt: skip
    return data, meta


_TYPES = {"video": pa.binary(), "duration": pa.float64(), "fps": pa.float32(), "width": pa.int32(), "height": pa.int32()}
_COLUMNS = ("key", "video_id", "source", "caption", "video", "path", "duration", "fps", "width", "height", "codec",
            "sha256", "status", "error")  # fmt: skip


def video_rows_table(rows: list[dict]) -> pa.Table:
    """Rows (dicts with some of the ``videos`` columns) -> a table; absent values are null."""
    return pa.table({c: pa.array([r.get(c) for r in rows], _TYPES.get(c, pa.string())) for c in _COLUMNS})


def write_videos_shard(table: pa.Table, path: Path, input_fingerprint: str, settings: str,
                       extra: dict | None = None) -> CompletionRecord:  # fmt: skip
    """Write `table` as a ``videos`` shard at `path`, then its completion record (counts
    recomputed from the table: input = ok + failed, failures by kind in ``extra``)."""
    write_shard(table, path, "videos", row_group_size=64)
    counts, failures = counts_of(table)
    record = CompletionRecord(
        shard=Path(path).name, kind="videos", counts=counts, input_fingerprint=input_fingerprint,
        settings_hash=settings, extra={**(extra or {}), "failures": failures},
    )  # fmt: skip
    write_completion(path, record)
    return record
