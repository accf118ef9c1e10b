"""img2dataset's output rows -> our ``pairs`` rows: the one format adapter.

img2dataset writes, per shard, a Parquet file with the columns ``key, url, caption, status,
error_message, width, height, original_width, original_height, exif, sha256`` and the image
bytes in a column named after its encode format (``jpg``; ``png`` or ``webp`` when asked);
rows whose ``status`` is not ``success`` have no bytes. Ingestion (`data.ingest_web`) and
the stages' reader (`data.inputs.read_pairs`) both turn such rows into ``pairs`` rows here,
by one rule:

- key: ``capfilt_key`` when the file has that column (our key, carried through an
  img2dataset run of ours), else img2dataset's ``key``, unchanged; ``image_id``: the file's
  ``image_id`` column when it has one, else the key. A null or repeated key is an error
  naming the file and the row.
- status: ``success`` -> ok; anything else (null included) -> failed with the error
  ``"<status>: <error_message>"`` (``failed`` / ``no error message`` standing in for nulls),
  so the text before the colon is the failure kind (`data.ingest.failure_kind`).
- the decode check: the bytes of a success row go through `data.ingest.normalise_rows`
  (the check every ingester uses): bytes that do not decode make the row failed with
  ``"undecodable: <reason>"``, a success without bytes fails as ``no_image_bytes``; width
  and height are the decoded image's, sha256 is of the stored bytes.

Reading is pure: nothing is written, so calling it again gives the same rows.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data.images import DEFAULT_MAX_PIXELS
from data.ingest import RawRow, normalise_rows
from data.schema import SchemaError, conform
from data.storage import Location, location, open_input

KEY_COLUMN = "capfilt_key"  # our key, carried through img2dataset as an additional column
SUCCESS = "success"
# img2dataset's encode formats, each also the name of its bytes column (jpeg: some tars)
IMAGE_COLUMNS = ("jpg", "png", "webp", "jpeg")
_MARKER_COLUMNS = frozenset({"status", "error_message"})


def is_img2dataset(schema: pa.Schema) -> bool:
    """True for img2dataset's own rows (status + error_message + a key, no ``source``)."""
    names = set(schema.names)
    has_key = "key" in names or KEY_COLUMN in names
    return _MARKER_COLUMNS <= names and has_key and "source" not in names


def read_img2dataset(path: Location) -> pa.Table:
    """One img2dataset Parquet shard as it is (no rows changed).

    Raises SchemaError naming the file when it is no readable Parquet file or no
    img2dataset output, and saying what to do instead.
    """
    path = location(path)
    try:
        table = pq.read_table(open_input(path))
    except (OSError, pa.ArrowException) as exc:
        raise SchemaError(f"{path}: not a readable Parquet file ({exc}); replace it or remove it") from exc
    if not is_img2dataset(table.schema):
        raise SchemaError(
            f"{path}: not img2dataset output (needs columns key, status, error_message and no source; "
            f"has {table.column_names}); pass img2dataset's own NNNNN.parquet files"
        )
    return table


def raw_rows(table: pa.Table, where: str | Path) -> list[RawRow]:
    """img2dataset rows -> `RawRow`s (key, image_id, caption, url, bytes or error); no decoding.

    `where` names the file in errors. Raises SchemaError for a table without a bytes column
    and for a null or repeated key, naming the row.
    """
    keys = _keys(table, where)
    image_col = next((c for c in IMAGE_COLUMNS if c in table.column_names), None)
    if image_col is None:
        raise SchemaError(
            f"{where}: no image bytes column ({', '.join(IMAGE_COLUMNS)}); this is img2dataset's webdataset "
            "sidecar, whose images are in the NNNNN.tar beside it: put that tar back and pass the tar or its folder"
        )
    image_ids = _strings(table, "image_id", where)
    captions = _strings(table, "caption", where)
    urls = _strings(table, "url", where)
    statuses = _strings(table, "status", where)
    messages = _strings(table, "error_message", where)
    data = _column(table, image_col, pa.binary(), where).to_pylist()
    rows = []
    for i, key in enumerate(keys):
        row = RawRow(key=key, image_id=image_ids[i] or key, caption=captions[i], data=None, url=urls[i])
        if statuses[i] == SUCCESS:
            row.data = data[i]
        else:
            row.error = failure_text(statuses[i], messages[i])
        rows.append(row)
    return rows


def to_pairs(table: pa.Table, where: str | Path, source: str = "web", max_pixels: int = DEFAULT_MAX_PIXELS) -> pa.Table:
    """img2dataset rows -> conformed ``pairs`` rows, in the same order (see the module docstring)."""
    return conform(normalise_rows(raw_rows(table, where), source, max_pixels), "pairs")


def read_as_pairs(path: Path, source: str = "web", max_pixels: int = DEFAULT_MAX_PIXELS) -> pa.Table:
    """One img2dataset Parquet shard read as ``pairs`` rows (`read_img2dataset` + `to_pairs`)."""
    return to_pairs(read_img2dataset(path), path, source, max_pixels)


def failure_text(status: str | None, message: str | None) -> str:
    """The ``error`` of a row img2dataset did not fetch: ``"<status>: <error_message>"``."""
    return f"{status or 'failed'}: {message or 'no error message'}"


def _keys(table: pa.Table, where: str | Path) -> list[str]:
    name = KEY_COLUMN if KEY_COLUMN in table.column_names else "key"
    if name not in table.column_names:
        raise SchemaError(f"{where}: no key column ('key' or {KEY_COLUMN!r}); pass img2dataset's own output")
    keys = _strings(table, name, where)
    first: dict[str, int] = {}
    for i, key in enumerate(keys):
        if key is None:
            raise SchemaError(f"{where}: row {i} has a null {name!r}; every row needs a key: fix or drop that row")
        if key in first:
            raise SchemaError(
                f"{where}: {name!r} {key!r} repeats at rows {first[key]} and {i}; keys must be unique: drop the repeat"
            )
        first[key] = i
    return keys  # type: ignore[return-value]  # no None left


def _strings(table: pa.Table, name: str, where: str | Path) -> list[str | None]:
    return _column(table, name, pa.string(), where).to_pylist()


def _column(table: pa.Table, name: str, type_: pa.DataType, where: str | Path) -> pa.Array:
    if name not in table.column_names:
        return pa.nulls(table.num_rows, type_)
    try:
        return pc.cast(table.column(name), type_).combine_chunks()
    except pa.ArrowException as exc:
        raise SchemaError(f"{where}: column {name!r} is not {type_} ({exc}); pass img2dataset's own output") from exc
