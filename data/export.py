"""D' out, to the trainers people run: webdataset tars, BLIP/LAVIS annotation JSON, or Parquet.

`export(inputs, out, fmt, shard_rows)` reads D' (``dataset`` shards) and writes it in a
consumer's layout, ``shard_rows`` rows per output shard, in D' order (input shards sorted,
rows as stored):

- ``webdataset``: ``OUT/00000.tar`` holding ``<stem>.jpg`` (or ``.png`` / ``.webp``: the
  extension is the bytes' real format), ``<stem>.txt`` (the caption) and ``<stem>.json``
  (key, source, itm_score, threshold, judge, ...), the layout img2dataset writes and
  open_clip's ``--train-data`` / ``webdataset.WebDataset`` read; beside each tar the
  sidecar ``00000.parquet`` (the JSON fields, no image bytes) and ``00000_stats.json``;
  ``OUT/sizes.json`` (rows per tar) lets open_clip count samples without
  ``--train-num-samples``.
- ``blip-json``: ``OUT/images/00000/<stem>.<ext>`` and ``OUT/annotations.json``, one list of
  ``{"image": "images/00000/<stem>.png", "caption": ..., "image_id": ..., ...}`` with paths
  relative to OUT (BLIP/LAVIS join them to their ``image_root``).
- ``parquet``: ``OUT/part-00000.parquet`` with ``image`` as the struct ``{bytes, path}`` and
  Hugging Face ``datasets`` features in the schema metadata (what ``datasets`` itself
  writes), so ``load_dataset("parquet", data_dir=OUT)`` decodes PIL images; duckdb reads it
  as is (``image.bytes``).

A tar member name must not hold ``/`` or ``.`` (webdataset splits the sample key at the
first dot of the basename), so each D' key becomes a safe `stem`: unsafe characters become
``_`` and a key that changed gets ``-<8 hex of its sha1>`` so stems stay unique; the
original key is kept in the JSON / sidecar / annotation ``key`` field.

Memory is bounded by one input row group plus one output shard's metadata (no image
bytes are held beyond a row group). Every output file is written to a temporary name
and renamed (`data.shards.atomic_path`); then a completion record goes to
``OUT/.capfilt/<shard>.done.json`` (a hidden folder, so ``datasets`` globs and
open_clip's brace patterns never see it). A rerun skips shards whose record matches the
same D' and settings, so it is the resume; the same D' exported twice gives
byte-identical files (fixed tar header fields, no times). A D' row without image bytes is
an error naming its shard and key, never a silent drop.

OUT may be a local folder or a URL (``s3://bucket/out``, `data.storage`). An export
writes only into a folder that is empty, absent, or its own export of the same format
(``.capfilt/kind.json``, written before anything else): a folder holding anything else
(someone's img2dataset ``00000.tar``, a run folder) is refused, as is an OUT that is, or
holds, one of its own D' inputs, and a local OUT with a symbolic link anywhere inside
(a write through it would land outside OUT). Refusals happen before the first write.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from data.defaults import DEFAULT_SHARD_ROWS
from data.layout import RunLayout
from data.schema import DATASET, SOURCES
from data.shards import (
    CompletionRecord,
    atomic_path,
    combine_fingerprints,
    list_shards,
    read_completion,
    read_row_group,
    row_group_sizes,
    settings_hash,
    shard_identity,
    write_atomic,
)
from data.storage import Location, RemotePath, is_inside, location

FORMATS = ("webdataset", "blip-json", "parquet")
RECORDS_DIR = ".capfilt"  # completion records and the manifest; hidden from consumers' globs
MANIFEST = "export.json"
KIND_FILE = "kind.json"  # {"format": ...}: written first, marks OUT as this kind of capfilt export
ANNOTATIONS = "annotations.json"
SIZES = "sizes.json"  # webdataset: {"00000.tar": rows, ...}, open_clip's get_dataset_size reads it
IMAGES_DIR = "images"
_VERSION = 1  # bump when an output layout changes, so old exports are not taken as complete
_KIND = "dataset"
_STEM_MAX = 100
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_TAR_MTIME = 0
_TAR_MODE = 0o644
_HASH_CHARS = 8
# Columns carried into the JSON / sidecar / annotations / Parquet (no bytes, no status).
META_COLUMNS = ("key", "image_id", "source", "caption", "url", "width", "height", "sha256",
                "candidate", "producer", "itm_score", "threshold", "judge")
_PRIMARY = {"webdataset": "{:05d}.tar", "blip-json": RECORDS_DIR + "/{:05d}.json", "parquet": "part-{:05d}.parquet"}
_HF_DTYPES = {pa.string(): "string", pa.int32(): "int32", pa.float32(): "float32"}


class ExportError(ValueError):
    """A D' that cannot be exported as it is (the message names the shard and key)."""


# ----------------------------------------------------------------------------- what to read


def dataset_shards(source: Location | str) -> list[Location]:
    """D' shards of `source` (a path or URL): a run folder (its current ``assemble/<hash>/``)
    or a folder of ``dataset`` shards. Raises FileNotFoundError saying what is missing."""
    source = location(source)
    layout = RunLayout(source)
    if layout.current_file.is_file() or layout.stage("assemble").is_dir():
        folder = layout.current_stage("assemble")
        if folder is None:
            raise FileNotFoundError(f"{source}: the run has no D' yet (no assemble output); run `capfilt run` first")
        source = folder
    shards = list_shards(source)
    if not shards:
        raise FileNotFoundError(f"{source}: no part-*.parquet D' shards there (give a run folder or a D' folder)")
    return shards


@dataclass(frozen=True)
class Piece:
    """Rows [start, stop) of one row group of one input shard."""

    path: Location
    row_group: int
    start: int
    stop: int


@dataclass(frozen=True)
class OutputShard:
    index: int
    pieces: tuple[Piece, ...]

    @property
    def rows(self) -> int:
        return sum(p.stop - p.start for p in self.pieces)


@dataclass(frozen=True)
class ExportPlan:
    """Which input rows each output shard holds, and the identity of the whole export."""

    fmt: str
    shards: tuple[OutputShard, ...]
    rows: int
    input_fingerprint: str
    settings: str


def plan_export(inputs: Sequence[Location], fmt: str, shard_rows: int = DEFAULT_SHARD_ROWS) -> ExportPlan:
    """Cut D' (in order) into output shards of `shard_rows` rows; reads only footers and records."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; expected one of {FORMATS}")
    if shard_rows < 1:
        raise ValueError(f"--shard-size must be >= 1, got {shard_rows}")
    groups = [(location(p), i, n) for p in inputs for i, n in enumerate(row_group_sizes(p, _KIND)) if n]
    shards: list[OutputShard] = []
    current: list[Piece] = []
    room = shard_rows
    for path, group, n in groups:
        start = 0
        while start < n:
            take = min(room, n - start)
            current.append(Piece(path, group, start, start + take))
            start, room = start + take, room - take
            if room == 0:
                shards.append(OutputShard(len(shards), tuple(current)))
                current, room = [], shard_rows
    if current:
        shards.append(OutputShard(len(shards), tuple(current)))
    fingerprint = combine_fingerprints([shard_identity(p) for p in inputs])
    settings = settings_hash({"format": fmt, "shard_rows": shard_rows, "version": _VERSION})
    return ExportPlan(fmt, tuple(shards), sum(n for _, _, n in groups), fingerprint, settings)


def _batches(shard: OutputShard) -> Iterator[tuple[Location, pa.Table]]:
    """The shard's rows, one input row group (slice) at a time, with the file they came from."""
    for piece in shard.pieces:
        table = read_row_group(piece.path, _KIND, piece.row_group)
        yield piece.path, table.slice(piece.start, piece.stop - piece.start)


# ----------------------------------------------------------------------------- rows


def safe_stem(key: str) -> str:
    """A tar member / file name stem for a D' key: only ``[A-Za-z0-9_-]``; a key that had to
    change (or was too long) gets ``-<sha1[:8]>`` of the original so stems stay unique."""
    stem = _UNSAFE.sub("_", key)
    if stem == key and 0 < len(stem) <= _STEM_MAX:
        return stem
    digest = hashlib.sha1(key.encode()).hexdigest()[:_HASH_CHARS]
    return f"{stem[:_STEM_MAX]}-{digest}"


_MAGIC = ((b"\xff\xd8\xff", "jpg"), (b"\x89PNG\r\n\x1a\n", "png"), (b"GIF8", "gif"), (b"BM", "bmp"))


def image_extension(data: bytes) -> str | None:
    """The file extension of image bytes by their real format (``jpg`` only for JPEG), or None."""
    for magic, ext in _MAGIC:
        if data.startswith(magic):
            return ext
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    try:
        with Image.open(io.BytesIO(data)) as image:
            fmt = image.format
    except (UnidentifiedImageError, OSError, ValueError):
        return None
    return {"JPEG": "jpg", "TIFF": "tiff"}.get(fmt, (fmt or "").lower()) or None


@dataclass(frozen=True)
class Row:
    """One D' row as the writers need it: a safe stem, the image and its metadata."""

    stem: str
    ext: str
    image: bytes
    meta: dict[str, Any]


def _rows(path: Location, table: pa.Table) -> Iterator[Row]:
    meta_rows = table.select(list(META_COLUMNS)).to_pylist()
    for meta, image, status in zip(meta_rows, table.column("jpg").to_pylist(), table.column("status").to_pylist()):
        if status != "ok" or not image:
            raise ExportError(
                f"{path}: row {meta['key']!r} has no image (status {status!r}); a D' row must carry its image bytes"
            )
        ext = image_extension(image)
        if ext is None:
            raise ExportError(f"{path}: row {meta['key']!r}: the image bytes are in no format PIL knows")
        yield Row(safe_stem(meta["key"]), ext, image, meta)


def _unique(stems: set[str], row: Row, path: Location) -> None:
    if row.stem in stems:
        raise ExportError(f"{path}: row {row.meta['key']!r} maps to the file stem {row.stem!r} of an earlier row")
    stems.add(row.stem)


# ----------------------------------------------------------------------------- writers
# Each writes one output shard's files (atomically) and returns (primary file, row counts).


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), _TAR_MTIME, _TAR_MODE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _sidecar_schema() -> pa.Schema:
    fields = [pa.field("stem", pa.string()), pa.field("image", pa.string())]
    return pa.schema(fields + [DATASET.field(name).with_nullable(True) for name in META_COLUMNS])


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()


def write_webdataset_shard(shard: OutputShard, out: Location) -> tuple[Location, Counter]:
    """``NNNNN.tar`` (+ sidecar ``NNNNN.parquet`` and ``NNNNN_stats.json``); returns the tar."""
    name = f"{shard.index:05d}"
    tar_path, counts, formats, stems, sidecar = _primary(out, "webdataset", shard.index), Counter(), Counter(), set(), []
    with atomic_path(tar_path) as tmp, tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for path, table in _batches(shard):
            for row in _rows(path, table):
                _unique(stems, row, path)
                image = f"{row.stem}.{row.ext}"
                _tar_member(tar, image, row.image)
                _tar_member(tar, f"{row.stem}.txt", (row.meta["caption"] or "").encode())
                _tar_member(tar, f"{row.stem}.json", _json_bytes({"stem": row.stem, "image": image, **row.meta}))
                sidecar.append({"stem": row.stem, "image": image, **row.meta})
                counts[row.meta["source"]] += 1
                formats[row.ext] += 1
    with atomic_path(out / f"{name}.parquet") as tmp:
        pq.write_table(pa.Table.from_pylist(sidecar, schema=_sidecar_schema()), tmp)
    # img2dataset's stats fields (no times, so the file is a function of D' too), plus ours.
    stats = {"count": len(sidecar), "successes": len(sidecar), "failed_to_download": 0, "failed_to_resize": 0,
             "sources": {s: counts[s] for s in SOURCES}, "image_formats": dict(formats)}
    write_atomic(out / f"{name}_stats.json", json.dumps(stats, indent=2, sort_keys=True) + "\n")
    return tar_path, counts


def write_blip_json_shard(shard: OutputShard, out: Location) -> tuple[Location, Counter]:
    """``images/NNNNN/<stem>.<ext>`` and the shard's annotation list (``.capfilt/NNNNN.json``).

    Images are written in place (an fsync each would cost ~3 ms per image); a crash
    mid-shard leaves the shard without its record, so the rerun writes it again whole."""
    name = f"{shard.index:05d}"
    folder = out / IMAGES_DIR / name
    folder.mkdir(parents=True, exist_ok=True)
    counts, stems, annotations = Counter(), set(), []
    for path, table in _batches(shard):
        for row in _rows(path, table):
            _unique(stems, row, path)
            image = folder / f"{row.stem}.{row.ext}"
            image.write_bytes(row.image)  # no rename or fsync per image: the shard's record, written after, vouches
            annotations.append({"image": image.relative_to(out).as_posix(), **row.meta})
            counts[row.meta["source"]] += 1
    fragment = _primary(out, "blip-json", shard.index)
    write_atomic(fragment, json.dumps(annotations, ensure_ascii=False))
    return fragment, counts


def _parquet_schema() -> pa.Schema:
    """``image`` as ``datasets``' Image struct, then the metadata columns, with the features
    ``datasets`` reads from the ``huggingface`` schema metadata."""
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    fields = [pa.field("image", image)] + [DATASET.field(n).with_nullable(True) for n in META_COLUMNS]
    features = {"image": {"_type": "Image"}}
    features.update({f.name: {"dtype": _HF_DTYPES[f.type], "_type": "Value"} for f in fields[1:]})
    return pa.schema(fields, metadata={"huggingface": json.dumps({"info": {"features": features}})})


def write_parquet_shard(shard: OutputShard, out: Location) -> tuple[Location, Counter]:
    """``part-NNNNN.parquet``: one row group per input row-group slice."""
    schema, counts, stems = _parquet_schema(), Counter(), set()
    target = _primary(out, "parquet", shard.index)
    with atomic_path(target) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        for path, table in _batches(shard):
            rows = []
            for row in _rows(path, table):
                _unique(stems, row, path)
                rows.append({"image": {"bytes": row.image, "path": f"{row.stem}.{row.ext}"}, **row.meta})
                counts[row.meta["source"]] += 1
            writer.write_table(pa.Table.from_pylist(rows, schema=schema))
    return target, counts


WRITERS: dict[str, Callable[[OutputShard, Location], tuple[Location, Counter]]] = {
    "webdataset": write_webdataset_shard,
    "blip-json": write_blip_json_shard,
    "parquet": write_parquet_shard,
}


# ----------------------------------------------------------------------------- records


def _record_path(out: Location, primary: Location) -> Location:
    return out / RECORDS_DIR / f"{primary.name}.done.json"


def _primary(out: Location, fmt: str, index: int) -> Location:
    """The file a shard's record vouches for (its size is checked): the tar, the Parquet
    file, or blip-json's annotation fragment."""
    return out / _PRIMARY[fmt].format(index)


def _same_export(record: CompletionRecord, plan: ExportPlan) -> bool:
    return (record.input_fingerprint, record.settings_hash) == (plan.input_fingerprint, plan.settings)


def _done(out: Location, plan: ExportPlan, index: int) -> CompletionRecord | None:
    """The shard's record when it is complete for this plan, else None."""
    primary = _primary(out, plan.fmt, index)
    try:
        record = read_completion(_record_path(out, primary))
    except ValueError:
        return None
    if record is None or not primary.is_file() or record.output_bytes != primary.stat().st_size:
        return None
    return record if _same_export(record, plan) else None


def _refuse_other_export(out: Location, plan: ExportPlan) -> None:
    """An OUT holding records of another D' or other settings is refused, not mixed into."""
    for done in sorted((out / RECORDS_DIR).glob("*.done.json")):
        try:
            record = read_completion(done)
        except ValueError:
            continue
        if record is not None and not _same_export(record, plan):
            raise ExportError(
                f"{out} holds an export of another D' or other settings ({done.name}); "
                "export into a new folder, or delete this one first"
            )


# ----------------------------------------------------------------------------- where it may write


def claim_out(out: Location, fmt: str, inputs: Sequence[Location]) -> None:
    """Make `out` this export's folder, or raise ExportError before anything is written:
    when it is (or holds) one of `inputs`, holds a symbolic link, is another format's
    export, or holds files that are no capfilt export (someone else's data)."""
    for src in inputs:
        if is_inside(src, out):
            raise ExportError(f"{out}: it holds the D' shard {src} being exported; export into another folder")
    if out.is_file():
        raise ExportError(f"{out}: it is a file; give a folder to export into")
    link = _first_link(out) if isinstance(out, Path) else None
    if link is not None:
        raise ExportError(f"{out}: {link} is a symbolic link; an export writes only real files inside OUT: "
                          "remove the link or export into a new folder")  # fmt: skip
    kind, manifest = out / RECORDS_DIR / KIND_FILE, out / RECORDS_DIR / MANIFEST
    if kind.is_file() or manifest.is_file():  # the manifest: an export from before kind.json
        theirs = _kind_of(kind if kind.is_file() else manifest)
        if theirs != fmt:
            raise ExportError(f"{out}: it holds a capfilt {theirs} export; export {fmt} into another folder")
        return
    stranger = next(_entries(out), None)
    if stranger is not None:
        raise ExportError(f"{out}: it is not empty ({stranger.name} is there) and is no capfilt {fmt} export; "
                          "export into an empty or new folder")  # fmt: skip
    (out / RECORDS_DIR).mkdir(parents=True, exist_ok=True)
    write_atomic(kind, json.dumps({"format": fmt}) + "\n")


def _first_link(folder: Path) -> Path | None:
    """The first symbolic link found inside `folder` (links are not followed; directory
    entries carry their type, so a big export costs no stat per file), or None."""
    stack = [folder] if folder.is_dir() else []
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                if entry.is_symlink():
                    return Path(entry.path)
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
    return None


def _entries(folder: Location) -> Iterator[Location]:
    """What `folder` holds (nothing when it does not exist)."""
    if isinstance(folder, RemotePath):
        return folder.iterdir()
    return iter(sorted(folder.iterdir())) if folder.is_dir() else iter(())


def _kind_of(kind: Location) -> str:
    try:
        return str(json.loads(kind.read_text()).get("format"))
    except (ValueError, AttributeError):
        return "unknown"


# ----------------------------------------------------------------------------- the export


@dataclass
class ExportStats:
    """What one export did: rows by source, shards written and skipped."""

    fmt: str
    out: str
    rows: int
    by_source: dict[str, int]
    shards: int
    written: int
    skipped: int
    inputs: list[str] = field(default_factory=list)


def _write_annotations(out: Location, shards: int) -> None:
    """``annotations.json``: the shards' lists joined into one, streamed, written last."""
    with atomic_path(out / ANNOTATIONS) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        handle.write("[")
        first = True
        for index in range(shards):
            for item in json.loads(_primary(out, "blip-json", index).read_text(encoding="utf-8")):
                handle.write(("" if first else ",\n") + json.dumps(item, ensure_ascii=False))
                first = False
        handle.write("]\n")


def export(inputs: Sequence[Location | str], out: Location | str, fmt: str, shard_rows: int = DEFAULT_SHARD_ROWS,
           on_shard: Callable[[int, int], None] | None = None) -> ExportStats:  # fmt: skip
    """Export the D' shards `inputs` to `out` in `fmt`; a rerun skips finished shards.
    `on_shard(rows, total_rows)` is called after each output shard (written or found
    finished), e.g. to advance a progress bar.

    Raises ExportError for a row without image bytes (naming shard and key), a stem
    collision, or an `out` that is not an export of this kind (`claim_out`), or holding
    another export; SchemaError for a non-``dataset`` input.
    """
    out = location(out)
    inputs = [location(p) for p in inputs]
    plan = plan_export(inputs, fmt, shard_rows)
    claim_out(out, fmt, inputs)
    _refuse_other_export(out, plan)
    by_source: Counter = Counter()
    sizes: dict[str, int] = {}
    written = 0
    for shard in plan.shards:
        record = _done(out, plan, shard.index)
        if record is None:
            primary, counts = WRITERS[fmt](shard, out)
            rows = sum(counts[s] for s in SOURCES)
            if rows != shard.rows:
                raise ExportError(f"{out}: shard {shard.index} wrote {rows} rows of {shard.rows} planned")
            record = CompletionRecord(primary.name, fmt, {"rows": rows, **{s: counts[s] for s in SOURCES}},
                                      plan.input_fingerprint, plan.settings)
            _write_record(out, primary, record)
            written += 1
        by_source.update({s: record.counts.get(s, 0) for s in SOURCES})
        sizes[record.shard] = record.counts["rows"]
        if on_shard is not None:
            on_shard(record.counts["rows"], plan.rows)
    stats = ExportStats(fmt, str(out), sum(by_source.values()), {s: by_source[s] for s in SOURCES},
                        len(plan.shards), written, len(plan.shards) - written, [str(p) for p in inputs])
    if stats.rows != plan.rows:
        raise ExportError(f"{out}: {stats.rows} rows exported of {plan.rows} in D'")
    _finish(out, plan, stats, sizes, rewrite=written > 0)
    return stats


def _finish(out: Location, plan: ExportPlan, stats: ExportStats, sizes: dict[str, int], rewrite: bool) -> None:
    """The files written once all shards are: ``annotations.json`` (blip-json) or
    ``sizes.json`` (webdataset: rows per tar, which open_clip reads instead of
    ``--train-num-samples``), then the manifest (``.capfilt/export.json``). Left alone by
    a rerun that wrote no shard."""
    manifest = out / RECORDS_DIR / MANIFEST
    final = {"format": plan.fmt, "rows": stats.rows, "by_source": stats.by_source, "shards": stats.shards,
             "input_fingerprint": plan.input_fingerprint, "settings_hash": plan.settings, "version": _VERSION}
    index = {"blip-json": out / ANNOTATIONS, "webdataset": out / SIZES}.get(plan.fmt)
    current = json.loads(manifest.read_text()) if manifest.is_file() else None
    if not rewrite and current == final and (index is None or index.is_file()):
        return
    if plan.fmt == "blip-json":
        _write_annotations(out, stats.shards)
    elif plan.fmt == "webdataset":
        write_atomic(out / SIZES, json.dumps(sizes, indent=2, sort_keys=True) + "\n")
    write_atomic(manifest, json.dumps(final, indent=2, sort_keys=True) + "\n")


def _write_record(out: Location, primary: Location, record: CompletionRecord) -> None:
    record = dataclasses.replace(record, output_bytes=primary.stat().st_size)
    write_atomic(_record_path(out, primary), json.dumps(dataclasses.asdict(record), indent=2, sort_keys=True))

