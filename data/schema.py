"""One pyarrow schema per dataset kind, in one place, checked on read and on write.

Dataset kinds (each a folder of ``part-NNNNN.parquet`` shards):

- ``pairs``: image-text pairs as ingested (human, web) or generated (synthetic).
- ``scored``: pairs after the filter judged them (kept or rejected), with the score.
- ``dataset``: D', the assembled training set (pairs plus provenance columns).
- ``videos``: video-text pairs (the clip's bytes in any container / codec ffmpeg
  decodes), for zero-shot video evaluation; rows of one clip share ``video_id``.

Every row has a ``key`` unique within a run and a ``status``: ``ok`` rows carry a
decodable image, ``failed`` rows keep their ``error`` and travel through every stage
so that each input row is accounted for.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

SOURCES = ("human", "web", "synthetic")
STATUSES = ("ok", "failed")
# Reasons a stage rejects a row (the `reject_reason` column); failed rows use `error`.
REJECT_REASONS = ("itm_below_threshold", "duplicate", "not_top_k", "empty_caption")


class SchemaError(ValueError):
    """A shard whose columns do not match its dataset kind; the message names the file."""


_PAIR_FIELDS: list[pa.Field] = [
    pa.field("key", pa.string(), nullable=False),  # unique within a run
    pa.field("image_id", pa.string(), nullable=False),  # rows of one image share it
    pa.field("source", pa.string(), nullable=False),  # one of SOURCES
    pa.field("caption", pa.string()),
    pa.field("jpg", pa.binary()),  # image bytes in any format PIL reads; null if failed
    pa.field("url", pa.string()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("sha256", pa.string()),  # of `jpg`
    pa.field("status", pa.string(), nullable=False),  # one of STATUSES
    pa.field("error", pa.string()),  # why a failed row failed
    pa.field("candidate", pa.int32()),  # synthetic: index among an image's candidates
    pa.field("producer", pa.string()),  # synthetic: fingerprint of the captioner
]

_SCORE_FIELDS: list[pa.Field] = [
    pa.field("itm_score", pa.float32()),  # softmax ITM probability of "match"
    pa.field("keep", pa.bool_()),
    pa.field("reject_reason", pa.string()),  # one of REJECT_REASONS, null when kept
    pa.field("threshold", pa.float32()),
    pa.field("judge", pa.string()),  # fingerprint of the filter model
]

_VIDEO_FIELDS: list[pa.Field] = [
    pa.field("key", pa.string(), nullable=False),  # unique within a run
    pa.field("video_id", pa.string(), nullable=False),  # rows (captions) of one clip share it
    pa.field("source", pa.string(), nullable=False),  # one of SOURCES
    pa.field("caption", pa.string()),
    pa.field("video", pa.binary()),  # the file's bytes (mp4, webm, mkv ...); null if failed
    pa.field("path", pa.string()),  # where it was read from
    pa.field("duration", pa.float64()),  # seconds, as the container states it
    pa.field("fps", pa.float32()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("codec", pa.string()),  # ffmpeg's name of the video codec (h264, vp9 ...)
    pa.field("sha256", pa.string()),  # of `video`
    pa.field("status", pa.string(), nullable=False),  # one of STATUSES
    pa.field("error", pa.string()),  # why a failed row failed ("<kind>: <detail>")
]

PAIRS = pa.schema(_PAIR_FIELDS, metadata={"capfilt.kind": "pairs"})
SCORED = pa.schema(_PAIR_FIELDS + _SCORE_FIELDS, metadata={"capfilt.kind": "scored"})
DATASET = pa.schema(_PAIR_FIELDS + _SCORE_FIELDS, metadata={"capfilt.kind": "dataset"})

VIDEOS = pa.schema(_VIDEO_FIELDS, metadata={"capfilt.kind": "videos"})

SCHEMAS: dict[str, pa.Schema] = {"pairs": PAIRS, "scored": SCORED, "dataset": DATASET, "videos": VIDEOS}


def schema_for(kind: str) -> pa.Schema:
    """The schema of a dataset kind; raises with the allowed names on a bad one."""
    try:
        return SCHEMAS[kind]
    except KeyError:
        raise SchemaError(f"unknown dataset kind {kind!r}; expected one of {sorted(SCHEMAS)}") from None


def check_schema(actual: pa.Schema, kind: str, path: str | Path = "<table>") -> None:
    """Raise SchemaError naming `path` and the first missing or mistyped column."""
    expected = schema_for(kind)
    for field in expected:
        idx = actual.get_field_index(field.name)
        if idx < 0:
            raise SchemaError(f"{path}: missing column {field.name!r} ({field.type}) for kind {kind!r}")
        got = actual.field(idx).type
        if got != field.type:
            raise SchemaError(
                f"{path}: column {field.name!r} has type {got}, expected {field.type} for kind {kind!r}"
            )


def conform(table: pa.Table, kind: str) -> pa.Table:
    """Add absent optional columns as nulls and order columns as the schema says.

    Present columns must already have the right type (checked); this only fills
    in columns a producer did not know about, so every stage writes full rows.
    """
    expected = schema_for(kind)
    columns = []
    for field in expected:
        if field.name in table.column_names:
            col = table.column(field.name)
            if col.type != field.type:
                raise SchemaError(f"<table>: column {field.name!r} has type {col.type}, expected {field.type}")
            columns.append(col)
        elif field.nullable:
            columns.append(pa.nulls(table.num_rows, field.type))
        else:
            raise SchemaError(f"<table>: missing required column {field.name!r} for kind {kind!r}")
    return pa.Table.from_arrays(columns, schema=expected)
