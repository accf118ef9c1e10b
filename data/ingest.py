"""Ingestion's common step: raw rows (bytes or an error) -> a checked pairs shard.

Every ingester (web URL lists through img2dataset, existing img2dataset folders, human
COCO / JSONL sets) ends here, so every row of every source is decoded the same way and
accounted for the same way: `status` ok with a decodable image, or failed with an
``error`` of the form ``"<kind>: <detail>"`` (see `failure_kind`).

The ingesters live in `data.ingest_web` and `data.ingest_human`.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa

from data.images import DEFAULT_MAX_PIXELS, decode_image
from data.schema import SOURCES
from data.shards import CompletionRecord, write_completion, write_shard
from data.storage import Location, location

# Failure kinds an ingester writes before the colon of `error`.
UNDECODABLE = "undecodable"  # bytes arrived but are no image (decode_image's reason follows)
NO_BYTES = "no_image_bytes"  # a success without bytes (should not happen; kept for accounting)


@dataclass
class RawRow:
    """One input row before normalisation: image bytes, or None and why."""

    key: str
    image_id: str
    caption: str | None
    data: bytes | None
    url: str | None = None
    error: str | None = None  # "<kind>: <detail>" when the fetch already failed


@dataclass
class IngestStats:
    """Rows by outcome over the shards an ingestion call wrote or found complete."""

    input: int = 0
    ok: int = 0
    failed: int = 0
    failures: dict[str, int] = field(default_factory=dict)  # failure kind -> rows
    shards_written: int = 0
    shards_skipped: int = 0

    def add(self, record: CompletionRecord, written: bool) -> None:
        """Fold one shard's completion record into the totals."""
        self.input += record.counts.get("input", 0)
        self.ok += record.counts.get("ok", 0)
        self.failed += record.counts.get("failed", 0)
        for kind, n in record.extra.get("failures", {}).items():
            self.failures[kind] = self.failures.get(kind, 0) + n
        if written:
            self.shards_written += 1
        else:
            self.shards_skipped += 1


def failure_kind(error: str | None) -> str:
    """The kind of a failed row's `error` (text before the first colon)."""
    if not error:
        return NO_BYTES
    return error.split(":", 1)[0].strip()


def normalise_rows(rows: list[RawRow], source: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> pa.Table:
    """Decode each row's bytes and build a pairs table (not yet conformed / written).

    A row is ok only when its bytes decode (`data.images.decode_image`); width and
    height are the decoded image's, sha256 is of the stored bytes. Failed rows keep no
    bytes and carry ``error``.
    """
    if source not in SOURCES:
        raise ValueError(f"source {source!r} is not one of {SOURCES}")
    cols: dict[str, list] = {
        name: [] for name in ("key", "image_id", "caption", "jpg", "url", "width", "height", "sha256", "status", "error")
    }
    for row in rows:
        data, error, width, height = row.data, row.error, None, None
        if error is None and data is None:
            error = f"{NO_BYTES}: the fetch reported success but returned no bytes"
        if error is None:
            decoded = decode_image(data, max_pixels=max_pixels)
            if decoded.image is None:
                error = f"{UNDECODABLE}: {decoded.error}"
            else:
                width, height = decoded.image.size
        ok = error is None
        cols["key"].append(row.key)
        cols["image_id"].append(row.image_id)
        cols["caption"].append(row.caption)
        cols["jpg"].append(data if ok else None)
        cols["url"].append(row.url)
        cols["width"].append(width)
        cols["height"].append(height)
        cols["sha256"].append(hashlib.sha256(data).hexdigest() if ok and data is not None else None)
        cols["status"].append("ok" if ok else "failed")
        cols["error"].append(error)
    types = {"jpg": pa.binary(), "width": pa.int32(), "height": pa.int32()}
    arrays = {name: pa.array(values, types.get(name, pa.string())) for name, values in cols.items()}
    arrays["source"] = pa.array([source] * len(rows), pa.string())
    return pa.table(arrays)


def counts_of(table: pa.Table) -> tuple[dict[str, int], dict[str, int]]:
    """(counts, failures by kind) of a pairs table, as a completion record stores them."""
    statuses = table.column("status").to_pylist()
    errors = table.column("error").to_pylist()
    failures = Counter(failure_kind(e) for s, e in zip(statuses, errors) if s == "failed")
    ok = statuses.count("ok")
    counts = {"input": table.num_rows, "ok": ok, "failed": table.num_rows - ok}
    return counts, dict(sorted(failures.items()))


def write_pairs_shard(
    table: pa.Table,
    path: Location,
    input_fingerprint: str,
    settings: str,
    extra: dict | None = None,
) -> CompletionRecord:
    """Write `table` as a pairs shard at `path`, then its completion record.

    The record's counts are recomputed from the table (input = ok + failed, failures by
    kind in ``extra["failures"]``), so they always describe what was written.
    """
    keys = table.column("key").to_pylist()
    if len(set(keys)) != len(keys):
        dupes = sorted({k for k in keys if keys.count(k) > 1})[:5]
        raise ValueError(f"{path}: duplicate keys {dupes}; keys must be unique within a run")
    write_shard(table, path, "pairs")
    counts, failures = counts_of(table)
    record = CompletionRecord(
        shard=location(path).name,
        kind="pairs",
        counts=counts,
        input_fingerprint=input_fingerprint,
        settings_hash=settings,
        extra={**(extra or {}), "failures": failures},
    )
    write_completion(path, record)
    return record
