"""Parquet shard IO: atomic writes, completion records, schema-checked streaming reads.

A stage writes ``<folder>/part-00042.parquet`` (named by its input, never by time or
worker) to a temporary name and renames it (on object storage: one upload of the whole
object, see `data.storage`), then writes ``part-00042.done.json``.
A shard counts as complete only when both files exist and the record's input
fingerprint and settings hash match what the stage would use now, so a rerun after a
crash, or after a settings change, redoes exactly the shards that need it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data.schema import SchemaError, check_schema, conform, schema_for
from data.storage import Location, RemotePath, list_files, location, open_input

SHARD_GLOB = "part-*.parquet"
DONE_SUFFIX = ".done.json"
TMP_SUFFIX = ".tmp"
# Rows per Parquet row group: the unit a reader holds in memory and the unit the
# training dataset deals out to workers. 256 images of ~50 kB is ~13 MB per group.
DEFAULT_ROW_GROUP_ROWS = 256
SETTINGS_HASH_CHARS = 12
_READ_CHUNK_BYTES = 1 << 20


def shard_name(index: int) -> str:
    """The file name of shard `index`: ``part-00042.parquet``."""
    if index < 0:
        raise ValueError(f"shard index must be >= 0, got {index}")
    return f"part-{index:05d}.parquet"


def completion_path(shard_path: Location) -> Location:
    """``part-00042.parquet`` -> ``part-00042.done.json`` (same folder)."""
    shard_path = location(shard_path)
    return shard_path.with_name(shard_path.name.removesuffix(".parquet") + DONE_SUFFIX)


def _tmp_path(path: Path) -> Path:
    return path.with_name(path.name + TMP_SUFFIX)


@contextmanager
def atomic_path(path: Location) -> Iterator[Path]:
    """``with atomic_path(path) as tmp:`` write the file at `tmp`; on a clean exit it is
    fsynced and renamed over `path`, so readers see the old or the new file, never half.

    The one place in `data` and above that renames a file into place. The temporary name
    is fixed (``<name>.tmp``): a leftover of a killed writer is removed before the block
    and after it, error or not; one writer per file (the run lock) is assumed.

    On object storage (`path` a `RemotePath`) `tmp` is a local temporary file, uploaded
    on a clean exit as one object (a PUT, or a multipart upload the store publishes only
    when complete): there is no rename there, and none is needed. A block that raises
    uploads nothing.
    """
    path = location(path)
    if isinstance(path, RemotePath):
        with tempfile.TemporaryDirectory(prefix="capfilt-upload-") as folder:
            tmp = Path(folder) / path.name
            yield tmp
            path.upload(tmp)
        return
    tmp = _tmp_path(path)
    tmp.unlink(missing_ok=True)
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: Location, data: str | bytes) -> None:
    """Write a small file (JSON, Markdown, PNG) through `atomic_path`."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


def write_if_changed(path: Location, data: str | bytes) -> None:
    """`write_atomic`, unless the file holds these bytes already: a deterministic writer's
    rerun (or a moved run folder's) leaves the file, its inode and mtime, untouched."""
    path = location(path)
    data = data.encode() if isinstance(data, str) else data
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file() and path.read_bytes() == data:
        return
    write_atomic(path, data)


def parquet_bytes(table: pa.Table) -> bytes:
    """`table` as the bytes of one Parquet file (for `write_if_changed`)."""
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer)
    return buffer.getvalue().to_pybytes()


def write_shard(
    table: pa.Table, path: Location, kind: str, row_group_size: int = DEFAULT_ROW_GROUP_ROWS
) -> None:
    """Write `table` as a shard of `kind` at `path`, atomically.

    The table is conformed (absent optional columns become nulls) and checked, written
    to ``path.parquet.tmp`` and renamed over `path`. Any completion record of an older
    version of this shard is removed first, so a crash mid-rewrite leaves the shard
    incomplete rather than wrongly complete. A rerun simply overwrites the same file.
    """
    path = location(path)
    table = conform(table, kind)
    check_schema(table.schema, kind, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    completion_path(path).unlink(missing_ok=True)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, row_group_size=max(1, row_group_size))


@dataclass
class CompletionRecord:
    """What a stage wrote for one shard; stored as ``part-NNNNN.done.json``.

    `counts` holds rows by outcome (e.g. ``{"input": n, "kept": a, "rejected": b,
    "failed": c}``). `output_bytes` is filled in by `write_completion` from the data
    file, so a shard replaced or truncated after the record was written is not
    mistaken for complete.
    """

    shard: str
    kind: str
    counts: dict[str, int]
    input_fingerprint: str
    settings_hash: str
    extra: dict[str, Any] = field(default_factory=dict)
    output_bytes: int | None = None


def write_completion(shard_path: Location, record: CompletionRecord) -> Location:
    """Write the completion record of `shard_path` atomically, after its data.

    Raises FileNotFoundError when the shard itself is missing (the record must never
    exist without its data). Returns the path of the ``.done.json`` file.
    """
    shard_path = location(shard_path)
    if not shard_path.is_file():
        raise FileNotFoundError(f"{shard_path}: cannot mark complete, the shard file does not exist")
    record = dataclasses.replace(record, output_bytes=shard_path.stat().st_size)
    done = completion_path(shard_path)
    write_atomic(done, json.dumps(dataclasses.asdict(record), indent=2, sort_keys=True))
    return done


def read_completion(path: Location) -> CompletionRecord | None:
    """The completion record for a shard (pass the ``.parquet`` or the ``.done.json``).

    Returns None when there is none; raises ValueError naming the file when it exists
    but is not a valid record.
    """
    path = location(path)
    done = path if path.name.endswith(DONE_SUFFIX) else completion_path(path)
    try:
        text = done.read_text()
    except (FileNotFoundError, IsADirectoryError):
        return None
    try:
        raw = json.loads(text)
        known = {f.name for f in dataclasses.fields(CompletionRecord)}
        return CompletionRecord(**{k: v for k, v in raw.items() if k in known})
    except (json.JSONDecodeError, TypeError, AttributeError) as exc:
        raise ValueError(f"{done}: not a valid completion record ({exc}); delete it to redo the shard") from exc


def is_complete(shard_path: Location, input_fingerprint: str, settings_hash: str) -> bool:
    """True when the shard and its record exist and match these inputs and settings."""
    shard_path = location(shard_path)
    if not shard_path.is_file():
        return False
    try:
        record = read_completion(shard_path)
    except ValueError:
        return False
    if record is None:
        return False
    if record.output_bytes is not None and record.output_bytes != shard_path.stat().st_size:
        return False
    return record.input_fingerprint == input_fingerprint and record.settings_hash == settings_hash


def list_shards(folder: Location) -> list[Location]:
    """Sorted ``part-*.parquet`` files of `folder` (temporary files ignored; [] if absent)."""
    return list_files(location(folder), SHARD_GLOB)


def _open(path: Location, kind: str) -> pq.ParquetFile:
    """Open a shard and check its schema; errors name the file. Close it with `_close`."""
    try:
        handle = pq.ParquetFile(open_input(path))
    except (OSError, pa.ArrowException) as exc:
        raise SchemaError(f"{path}: not a readable Parquet file ({exc})") from exc
    try:
        check_schema(handle.schema_arrow, kind, path)
    except SchemaError:
        _close(handle)
        raise
    return handle


def _close(handle: pq.ParquetFile) -> None:
    """Close a shard and the file under it (a remote file object too)."""
    handle.close(force=True)


def parquet_schema(path: Location) -> pa.Schema:
    """The Arrow schema of a Parquet file, local or remote (reads only the footer);
    SchemaError naming the file when it is not one."""
    path = location(path)
    try:
        if isinstance(path, RemotePath):
            with path.open("rb") as handle:
                return pq.read_schema(handle)
        return pq.read_schema(path)
    except (OSError, pa.ArrowException) as exc:
        raise SchemaError(f"{path}: not a readable Parquet file ({exc})") from exc


def read_table(path: Location, kind: str, columns: list[str] | None = None) -> pa.Table:
    """Read a whole shard (or some `columns`), after checking it is of `kind`, in our fields
    (`as_ours`): a shard another tool wrote with other nullability or column order reads
    as ours does, so tables from both mix."""
    path = location(path)
    handle = _open(path, kind)
    try:
        return as_ours(handle.read(columns=columns), kind, path)
    finally:
        _close(handle)


def as_ours(table: pa.Table, kind: str, path: str | Path = "<table>") -> pa.Table:
    """`table` with the kind's own field definitions (nullability) and column order for the
    columns it has (others kept after them). A required column holding nulls is refused,
    naming the file, the column and the first such row."""
    expected = schema_for(kind)
    ours = [field for field in expected if field.name in table.column_names]
    for field in ours:
        column = table.column(field.name)
        if not field.nullable and column.null_count:
            first = pc.index(pc.is_null(column), True).as_py()
            raise SchemaError(f"{path}: column {field.name!r} has {column.null_count} nulls (first at row {first}); "
                              f"every {kind!r} row needs one: fix or drop those rows")  # fmt: skip
    fields = ours + [table.schema.field(name) for name in table.column_names if expected.get_field_index(name) < 0]
    if fields == list(table.schema):
        return table
    schema = pa.schema(fields, metadata=table.schema.metadata)
    return pa.Table.from_arrays([table.column(field.name) for field in fields], schema=schema)


def iter_batches(
    path: Location, kind: str, batch_size: int, columns: list[str] | None = None
) -> Iterator[pa.RecordBatch]:
    """Stream a shard in batches of at most `batch_size` rows, one row group at a time.

    Memory is bounded by one row group plus one batch, whatever the shard's size.
    """
    path = location(path)
    handle = _open(path, kind)
    try:
        yield from handle.iter_batches(batch_size=batch_size, columns=columns)
    finally:
        _close(handle)


def row_group_sizes(path: Location, kind: str) -> list[int]:
    """Rows in each row group of a shard (schema-checked); reads only the footer."""
    handle = _open(location(path), kind)
    try:
        meta = handle.metadata
        return [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    finally:
        _close(handle)


def read_row_group(path: Location, kind: str, index: int, columns: list[str] | None = None) -> pa.Table:
    """Read row group `index` of a shard (schema-checked)."""
    handle = _open(location(path), kind)
    try:
        return handle.read_row_group(index, columns=columns)
    finally:
        _close(handle)


def file_fingerprint(path: Location) -> str:
    """``"<size>-<sha256 hex>"`` of a file's bytes: the identity of a stage's input
    (the same for the same bytes on a local disk or on object storage)."""
    path = location(path)
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as handle:
        while chunk := handle.read(_READ_CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
    return f"{size}-{digest.hexdigest()}"


def combine_fingerprints(parts: list[str]) -> str:
    """One fingerprint for several inputs (order matters)."""
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def shard_identity(path: Location) -> str:
    """What a shard holds, cheaply: from its completion record (the stage's input
    fingerprint, settings hash and byte count) when it has a valid one, else the file's
    fingerprint. Never its path, so a moved run folder keeps its identities."""
    path = location(path)
    try:
        record = read_completion(path)
    except ValueError:
        record = None
    if record is not None and record.output_bytes == path.stat().st_size:
        return f"{record.input_fingerprint}/{record.settings_hash}/{record.output_bytes}"
    return file_fingerprint(path)


def _plain(obj: Any) -> Any:
    """Turn dataclasses / pydantic models / paths into JSON-able plain values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _plain(dataclasses.asdict(obj))
    if hasattr(obj, "model_dump"):
        return _plain(obj.model_dump())
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted(_plain(v) for v in obj)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, RemotePath):
        return str(obj)  # the URL only: storage options never enter a hash or a record
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    raise TypeError(f"settings_hash: cannot hash a value of type {type(obj).__name__}: {obj!r}")


def settings_hash(obj: Any) -> str:
    """sha256 of the canonical JSON of a dict / dataclass / pydantic model, 12 hex chars.

    Keys are sorted, so the hash depends on values only, not on field order.
    """
    canonical = json.dumps(_plain(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:SETTINGS_HASH_CHARS]
