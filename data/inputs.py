"""Which shards a stage reads, and those shards read as ``pairs`` rows.

A stage is given files, folders and globs (`expand_inputs`), local or as URLs
(``s3://bucket/web/``, ``s3://bucket/web/*.parquet``; see `data.storage`); each input shard names the
output shard it writes (`output_name`, `plan_outputs`): ``part-00042.parquet`` stays,
img2dataset's ``00042.parquet`` becomes ``part-00042.parquet``. Inputs may be our shards
of any kind holding the pair columns, or img2dataset's own Parquet output, which
`read_pairs` turns into ``pairs`` rows with the one img2dataset adapter
(`data.img2dataset`), the same rows ingestion would write for it, or img2dataset's
webdataset output (``00042.tar`` + sidecar ``00042.parquet``), read in place by
`data.webdataset_input` into the same rows: the tar is the input (it names
``part-00042.parquet``), its sidecar is part of it, never an input of its own.

Nothing here writes; reading a shard again gives the same rows.
"""

from __future__ import annotations

import glob
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data.img2dataset import is_img2dataset, read_as_pairs
from data.schema import conform
from data.shards import combine_fingerprints, file_fingerprint, parquet_schema, read_table, shard_name
from data.storage import Location, RemotePath, list_files, location, open_input
from data.webdataset_input import is_webdataset_shard, read_webdataset_pairs, sidecar_of, tar_of, webdataset_rows

_OUR_SHARD = re.compile(r"part-\d{5}\.parquet")
_NUMBERED_SHARD = re.compile(r"(\d+)\.(?:parquet|tar)")
_SHARD_SUFFIXES = (".parquet", ".tar")


def expand_item(item: str | Path | RemotePath) -> list[Location]:
    """One input: a file, a folder (its ``*.parquet`` and ``*.tar``, sorted) or a glob
    pattern (sorted), local or a URL; a webdataset sidecar stands for its tar (`webdataset_tars`).

    Raises FileNotFoundError naming an item that matches nothing.
    """
    path = location(item)
    matches = _expand_remote(path) if isinstance(path, RemotePath) else _expand_local(path)
    if not matches:
        raise FileNotFoundError(f"input {item!s}: no Parquet or webdataset shards there (give files, folders or globs)")
    return webdataset_tars(matches)


def _expand_remote(path: RemotePath) -> list[Location]:
    if any(c in path.key for c in "*?["):
        found = (RemotePath(path.fs.unstrip_protocol(p), path.options) for p in path.fs.glob(path.path))
        return sorted(p for p in found if p.name.endswith(_SHARD_SUFFIXES))
    if path.name.endswith(_SHARD_SUFFIXES) and path.is_file():
        return [path]
    return sorted(p for suffix in _SHARD_SUFFIXES for p in list_files(path, f"*{suffix}"))  # a folder: listings


def _expand_local(path: Path) -> list[Location]:
    item = str(path)
    if path.is_dir():
        matches = sorted(p for suffix in _SHARD_SUFFIXES for p in path.glob(f"*{suffix}") if p.is_file())
    elif path.is_file():
        matches = [path]
    else:
        matches = sorted(Path(p) for p in glob.glob(item) if p.endswith(_SHARD_SUFFIXES))
    return [p.resolve() for p in matches]


def webdataset_tars(paths: Sequence[Location]) -> list[Location]:
    """`paths` with each webdataset sidecar (``N.parquet`` beside an ``N.tar``) replaced by
    its tar, once: the tar is read in place with its sidecar, and both would name the
    same output. Order is kept."""
    out = [tar if p.name.endswith(".parquet") and (tar := location(tar_of(p))).is_file() else p for p in paths]
    return list(dict.fromkeys(out))


def input_rows(src: Location) -> int:
    """How many rows `read_pairs` gives for an input shard, cheaply: a Parquet file's row
    count from its footer; a webdataset tar's rows (sidecar and tar joined, nothing decoded)."""
    if is_webdataset_shard(src):
        return webdataset_rows(src).num_rows
    return pq.ParquetFile(open_input(location(src))).metadata.num_rows


def input_fingerprint(src: Location) -> str:
    """The identity of an input shard's bytes: the file's fingerprint; a webdataset tar's
    with its sidecar's (a changed sidecar changes the rows read)."""
    if is_webdataset_shard(src) and (sidecar := location(sidecar_of(src))).is_file():
        return combine_fingerprints([file_fingerprint(src), file_fingerprint(sidecar)])
    return file_fingerprint(src)


def expand_inputs(items: Sequence[str | Path | RemotePath]) -> list[Location]:
    """Files, folders and globs -> unique Parquet paths sorted by the output they name."""
    unique = list(dict.fromkeys(p for item in items for p in expand_item(item)))
    return sorted(unique, key=lambda p: (output_name(p), str(p)))


def output_name(src: Location) -> str:
    """The output shard name for an input: ``part-00042.parquet`` stays, img2dataset's
    ``00042.parquet`` or ``00042.tar`` becomes ``part-00042.parquet``; other names are refused."""
    name = location(src).name
    if _OUR_SHARD.fullmatch(name):
        return name
    numbered = _NUMBERED_SHARD.fullmatch(name)
    if numbered:
        return shard_name(int(numbered.group(1)))
    raise ValueError(
        f"{src}: input shards must be named part-NNNNN.parquet, or NNNNN.parquet / NNNNN.tar (img2dataset), "
        "so outputs can be named after them; rename the file"
    )


def plan_outputs(inputs: Sequence[Location]) -> list[tuple[Location, str]]:
    """(input, output name) pairs; refuses two inputs that would write the same output."""
    seen: dict[str, Location] = {}
    plan = []
    for src in inputs:
        name = output_name(src)
        if name in seen:
            raise ValueError(
                f"{src} and {seen[name]} would both write {name}; run the stage once per input folder"
            )
        seen[name] = location(src)
        plan.append((location(src), name))
    return plan


def read_pairs(path: Location, columns: Sequence[str] | None = None) -> pa.Table:
    """Read a shard as ``pairs`` rows, whether ours (any kind holding the pair columns),
    img2dataset's raw Parquet output (`data.img2dataset.read_as_pairs`, source ``web``) or
    its webdataset tar read in place (`data.webdataset_input.read_webdataset_pairs`).
    `columns` limits what is returned (and, for ours, what is read)."""
    if is_webdataset_shard(path):
        table = read_webdataset_pairs(path)
        return table.select(list(columns)) if columns else table
    path = location(path)
    schema = parquet_schema(path)
    if is_img2dataset(schema):
        table = read_as_pairs(path)
        return table.select(list(columns)) if columns else table
    if columns:
        return read_table(path, "pairs", columns=list(columns))
    return conform(read_table(path, "pairs"), "pairs")


def ok_mask(table: pa.Table) -> np.ndarray:
    """Rows with status ok and image bytes present, as a bool array."""
    ok = pc.and_(pc.equal(table.column("status"), "ok"), pc.is_valid(table.column("jpg")))
    return np.asarray(pc.fill_null(ok, False).to_numpy(zero_copy_only=False), dtype=bool)
