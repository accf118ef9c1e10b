"""SQL over a run folder: one duckdb view per dataset, read-only and confined.

``open_catalog(run_dir)`` returns an in-memory duckdb connection with these views
(each exists only when its shards do):

- ``human``, ``web``, ``test``: ``ingest/<name>/**/part-*.parquet`` (kind ``pairs``). A run
  that reads its web data in place (``data.web``: img2dataset output, tars included) has no
  ``ingest/web``; its ``web`` view is then the web rows as the filter read them (every one
  lands in ``scored``, source ``web``), with the ``pairs`` columns.
- ``synthetic``: ``caption/<hash>/part-*.parquet`` (kind ``pairs``) plus ``settings_hash``.
- ``scored``: ``filter/<hash>/{kept,rejected,failed}/part-*.parquet`` (kind ``scored``)
  plus ``settings_hash`` and ``outcome`` (kept | rejected | failed).
- ``rejects``: the ``scored`` rows whose outcome is not ``kept``.
- ``dataset``: D', ``assemble/<hash>/part-*.parquet`` (kind ``dataset``) plus ``settings_hash``.
- ``stage_stats``: one row per completed shard of each stage folder, from the ``*.done.json``
  completion records (stage, folder, shard, kind, settings_hash, input_fingerprint,
  output_bytes, counts MAP, extra JSON); the filter's three outcome records of a shard are
  one row, so ``sum(counts['input'])`` counts each input row once.

A stage with several settings folders (a rerun with other settings) is shown by the
folder the latest run used, as the run's ``current.json`` records it (`data.layout`);
``stage_stats`` lists the records of all of them.

The run folder may be a URL (``s3://bucket/run``, `data.storage`): the shards are then
read through the fsspec filesystem of that URL (credentials from the AWS variables or
the storage options), wrapped as a pyarrow filesystem; duckdb needs no extension.

Confinement. duckdb itself never touches the file system: the shards are scanned
through pyarrow datasets registered on the connection (projection and filters are
pushed down, rows stream), and the connection is then locked with
``enable_external_access=false``, no allowed paths, no temp directory and
``lock_configuration=true``. So ``COPY ... TO``, ``ATTACH``, ``INSTALL`` / ``LOAD``,
``read_csv('/etc/passwd')`` and ``SET`` fail inside duckdb even on the raw connection.
The files the views are built on must be the run folder's own: a shard or record that is
(or lies below) a symbolic link resolving outside the run folder, or a stage folder the
run's ``current.json`` places outside it, is refused (`QueryRefused`, naming it), so a
link planted in a run folder cannot make a view read another file.
`run_query` adds a statement check with clear errors: exactly one SELECT / WITH /
DESCRIBE / SHOW / SUMMARIZE / EXPLAIN statement. Image bytes stay ``BLOB`` for Python
callers; `hide_blobs` replaces them by their length for display.
"""

from __future__ import annotations

import dataclasses
import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds

from data.defaults import DEFAULT_TIMEOUT_S
from data.layout import FILTER_OUTCOMES, INGEST_SPLITS, RunLayout
from data.schema import check_schema, schema_for
from data.shards import DONE_SUFFIX, SHARD_GLOB, parquet_schema, read_completion
from data.storage import Location, arrow_filesystem, is_inside, list_files, location

_ALLOWED_TYPES = {duckdb.StatementType.SELECT}
_EXPLAIN = re.compile(r"^\s*EXPLAIN\s+(ANALYZE\s+)?(\([^)]*\)\s*)?", re.IGNORECASE)
_WHY_NOT = {
    "COPY": "COPY writes files; use `capfilt query --format csv|json|parquet --output PATH` instead",
    "ATTACH": "ATTACH opens other databases; the catalog holds only this run's datasets",
    "DETACH": "the catalog's databases are fixed",
    "LOAD": "extensions cannot be loaded",
    "SET": "the catalog's settings are locked",
    "VARIABLE_SET": "the catalog's settings are locked",
    "PRAGMA": "pragmas can change settings; use DESCRIBE / SHOW / SUMMARIZE",
    "EXPORT": "EXPORT writes files",
    "CREATE": "the catalog is read-only",
    "INSERT": "the catalog is read-only",
    "UPDATE": "the catalog is read-only",
    "DELETE": "the catalog is read-only",
    "DROP": "the catalog is read-only",
    "ALTER": "the catalog is read-only",
}


class QueryRefused(ValueError):
    """A statement the read-only catalog does not run; the message says why."""


class NoSuchView(ValueError):
    """A query naming a view this run folder does not have; the message says why and what to do."""


_MISSING_TABLE = re.compile(r"Table with name (\S+) does not exist")
_WHY_NO_VIEW = {
    "synthetic": "the run has no caption output yet (run the caption stage)",
    "scored": "the run has no filter output yet (run the filter stage)",
    "rejects": "the run has no filter output yet (run the filter stage)",
    "dataset": "the run has no D' yet (run assemble: `capfilt run`, or `capfilt assemble --output RUN/assemble`)",
    "stage_stats": "no stage has completed a shard here yet",
}


def no_view_message(name: str, views: list[str]) -> str:
    """Why the catalog has no view `name`, and what to do, in one line."""
    if name in INGEST_SPLITS:
        why = (f"ingest/{name} holds no shards: a run given data.{name} reads those shards where they are (the web "
               f"view shows them once the filter has read them), or import them with `capfilt ingest img2dataset "
               f"FOLDER RUN/ingest/{name}`")  # fmt: skip
    else:
        why = _WHY_NO_VIEW.get(name, "no dataset of that name")
    return f"no view {name!r} in this run folder: {why} (views here: {', '.join(views) or 'none'})"


class QueryTimeout(ValueError):
    """A query stopped by `time_limit`; the message says how to run it anyway."""




@contextmanager
def time_limit(con: duckdb.DuckDBPyConnection, seconds: float) -> Iterator[None]:
    """Interrupt whatever `con` runs inside the block once `seconds` have passed (0 or
    less: no limit); the interrupted query raises QueryTimeout here."""
    if seconds <= 0:
        yield
        return
    fired = threading.Event()

    def stop() -> None:
        fired.set()
        con.interrupt()

    timer = threading.Timer(seconds, stop)
    timer.daemon = True
    timer.start()
    try:
        yield
    except duckdb.InterruptException:
        if not fired.is_set():
            raise
        raise QueryTimeout(
            f"the query ran past its time limit of {seconds:g} s and was stopped; narrow it (WHERE, LIMIT) "
            "or give --timeout SECONDS (0: no limit)"
        ) from None
    finally:
        timer.cancel()


@dataclass(frozen=True)
class _Source:
    """One view backed by shards: its name, kind, files and the folder partition columns."""

    name: str
    kind: str
    files: list[Location]
    base: Location | None = None  # files' paths below `base` give the partition columns
    partitions: tuple[str, ...] = ()


def _shards_below(folder: Location) -> list[Location]:
    """``part-*.parquet`` files below `folder`, skipping private ``_x`` / ``.x`` folders
    (e.g. img2dataset's own output under ``ingest/web/_img2dataset``)."""
    return [
        p
        for p in list_files(folder, f"**/{SHARD_GLOB}")
        if not any(part.startswith(("_", ".")) for part in p.relative_to(folder).parts[:-1])
    ]


def _own(run_dir: Location, files: list[Location]) -> list[Location]:
    """`files`, each checked to lie in the run folder once links are resolved."""
    for path in files:
        if not is_inside(path, run_dir):
            target = path.resolve() if isinstance(path, Path) else path
            raise QueryRefused(
                f"refused: {path} leads outside the run folder {run_dir} (to {target}); the catalog reads only the "
                "run folder's own files: replace the link by the files or remove it"
            )
    return files


def _sources(run_dir: Location) -> list[_Source]:
    layout = RunLayout(run_dir)
    sources = [_Source(name, "pairs", _shards_below(layout.ingest(name))) for name in INGEST_SPLITS]
    caption = layout.current_stage("caption")
    if caption is not None:
        sources.append(_Source("synthetic", "pairs", _shards_below(caption), caption.parent, ("settings_hash",)))
    scored = layout.current_stage("filter")
    if scored is not None:
        files = [p for outcome in FILTER_OUTCOMES for p in _shards_below(scored / outcome)]
        sources.append(_Source("scored", "scored", files, scored.parent, ("settings_hash", "outcome")))
    assemble = layout.current_stage("assemble")
    if assemble is not None:
        sources.append(_Source("dataset", "dataset", _shards_below(assemble), assemble.parent, ("settings_hash",)))
    return [dataclasses.replace(s, files=_own(run_dir, s.files)) for s in sources if s.files]


def _dataset(source: _Source) -> pds.Dataset:
    """A pyarrow dataset over the source's shards, each schema-checked (errors name the file)."""
    for path in source.files:
        check_schema(parquet_schema(path), source.kind, path)
    schema = schema_for(source.kind).remove_metadata()
    filesystem, _ = arrow_filesystem(source.files[0])
    paths = [arrow_filesystem(p)[1] for p in source.files]
    if not source.partitions:
        return pds.dataset(paths, schema=schema, format="parquet", filesystem=filesystem)
    partition_schema = pa.schema([(name, pa.string()) for name in source.partitions])
    for name in source.partitions:
        schema = schema.append(pa.field(name, pa.string()))
    return pds.dataset(
        paths,
        schema=schema,
        format="parquet",
        filesystem=filesystem,
        partitioning=pds.DirectoryPartitioning(partition_schema),
        partition_base_dir=arrow_filesystem(source.base)[1],
    )


def _stage_stats(run_dir: Location) -> pa.Table | None:
    """One row per completed shard of each stage folder (None when there are none).

    The filter writes one record per outcome folder (kept / rejected / failed), each with
    the shard's full counts; they are folded into one row (folder = the settings folder,
    output_bytes summed) so that sums over `counts` count every input row once.
    """
    rows: dict[tuple[str, str], dict] = {}
    for done in _own(run_dir, list_files(run_dir, "**/*" + DONE_SUFFIX)):
        try:
            record = read_completion(done)
        except ValueError:
            continue  # a broken record is simply not complete; the stage redoes it
        if record is None:
            continue
        folder = done.parent.relative_to(run_dir)
        if record.extra.get("outcome") in FILTER_OUTCOMES and folder.name == record.extra["outcome"]:
            folder = folder.parent
        key = (folder.as_posix(), record.shard)
        if key in rows:
            rows[key]["output_bytes"] += record.output_bytes
            continue
        rows[key] = {
            "stage": folder.parts[0] if folder.parts else "",
            "folder": folder.as_posix(),
            "shard": record.shard,
            "kind": record.kind,
            "settings_hash": record.settings_hash,
            "input_fingerprint": record.input_fingerprint,
            "output_bytes": record.output_bytes,
            "counts": [(str(k), int(v)) for k, v in sorted(record.counts.items())],
            "extra": json.dumps({k: v for k, v in record.extra.items() if k != "outcome"}, sort_keys=True, default=str),
        }
    if not rows:
        return None
    schema = pa.schema(
        [
            ("stage", pa.string()),
            ("folder", pa.string()),
            ("shard", pa.string()),
            ("kind", pa.string()),
            ("settings_hash", pa.string()),
            ("input_fingerprint", pa.string()),
            ("output_bytes", pa.int64()),
            ("counts", pa.map_(pa.string(), pa.int64())),
            ("extra", pa.string()),
        ]
    )
    return pa.Table.from_pylist(list(rows.values()), schema=schema)


def _lock(con: duckdb.DuckDBPyConnection) -> None:
    """No file system, no extensions, no further setting changes."""
    for statement in (
        "SET autoinstall_known_extensions = false",
        "SET autoload_known_extensions = false",
        "SET temp_directory = ''",
        "SET allowed_directories = []",
        "SET allowed_paths = []",
        "SET enable_external_access = false",
        "SET lock_configuration = true",
    ):
        con.execute(statement)


def open_catalog(run_dir: Location | str) -> duckdb.DuckDBPyConnection:
    """An in-memory, locked duckdb connection with one view per dataset of `run_dir`.

    Reads only footers, schemas and completion records; writes nothing anywhere.
    Raises FileNotFoundError when `run_dir` is not a folder and SchemaError naming the
    file when a shard does not match its dataset kind.
    """
    run_dir = location(run_dir).resolve()
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run folder")
    con = duckdb.connect(":memory:")
    for source in _sources(run_dir):
        con.register(source.name, _dataset(source))
    if "scored" in view_names(con):
        con.execute("CREATE VIEW rejects AS SELECT * FROM scored WHERE outcome <> 'kept'")
        if "web" not in view_names(con):  # data.web read in place: the web rows as the filter read them
            columns = ", ".join(f'"{name}"' for name in schema_for("pairs").names)
            con.execute(f"CREATE VIEW web AS SELECT {columns} FROM scored WHERE source = 'web'")
    stats = _stage_stats(run_dir)
    if stats is not None:
        con.register("_stage_stats_source", stats)
        con.execute("CREATE TABLE stage_stats AS SELECT * FROM _stage_stats_source")
        con.unregister("_stage_stats_source")
    _lock(con)
    return con


def view_names(con: duckdb.DuckDBPyConnection) -> list[str]:
    """The catalog's datasets (views and tables of the main schema), sorted."""
    rows = con.execute(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'main' ORDER BY table_name"
    ).fetchall()
    return [name for (name,) in rows if not name.startswith("_")]


def describe(con: duckdb.DuckDBPyConnection) -> dict[str, list[tuple[str, str]]]:
    """``{view: [(column, type), ...]}`` for every dataset in the catalog."""
    result: dict[str, list[tuple[str, str]]] = {}
    for name in view_names(con):
        rows = con.execute(
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = 'main' AND table_name = ? ORDER BY ordinal_position",
            [name],
        ).fetchall()
        result[name] = [(column, dtype) for column, dtype in rows]
    return result


def check_statement(con: duckdb.DuckDBPyConnection, sql: str) -> None:
    """Raise QueryRefused unless `sql` is exactly one read-only statement."""
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as exc:
        raise QueryRefused(f"cannot parse the query: {exc}") from exc
    if len(statements) != 1:
        raise QueryRefused(f"refused: give exactly one statement, got {len(statements)}")
    kind = statements[0].type
    if kind == duckdb.StatementType.EXPLAIN:
        inner = _EXPLAIN.sub("", sql, count=1)
        if inner == sql:
            raise QueryRefused("refused: cannot read this EXPLAIN statement; write EXPLAIN SELECT ...")
        check_statement(con, inner)
        return
    if kind not in _ALLOWED_TYPES:
        name = kind.name
        why = _WHY_NOT.get(name, "the catalog is read-only")
        raise QueryRefused(
            f"refused: {name} statements are not allowed ({why}); "
            "use SELECT, WITH, DESCRIBE, SHOW, SUMMARIZE or EXPLAIN"
        )


def run_query(con: duckdb.DuckDBPyConnection, sql: str) -> duckdb.DuckDBPyRelation:
    """Check `sql` (see `check_statement`) and return its relation (not yet fetched).

    duckdb's own refusals (a file outside the catalog, a locked setting) come back as
    QueryRefused; other query errors (a typo, a missing column) as duckdb.Error.
    """
    check_statement(con, sql)
    try:
        relation = con.sql(sql)
    except (duckdb.PermissionException, duckdb.InvalidInputException) as exc:
        raise QueryRefused(f"refused: {exc}") from exc
    except duckdb.CatalogException as exc:
        missing = _MISSING_TABLE.search(str(exc))
        if missing is None:
            raise
        raise NoSuchView(no_view_message(missing.group(1).strip("\"'"), view_names(con))) from None
    if relation is None:
        raise QueryRefused("refused: the statement returned no rows to show")
    return relation


def hide_blobs(table: pa.Table | pa.RecordBatch) -> pa.Table:
    """Replace each binary column (image bytes) by its length in bytes, named ``<col>_bytes``."""
    table = pa.Table.from_batches([table]) if isinstance(table, pa.RecordBatch) else table
    for index, field in enumerate(table.schema):
        if pa.types.is_binary(field.type) or pa.types.is_large_binary(field.type) or pa.types.is_fixed_size_binary(field.type):
            lengths = pc.binary_length(table.column(index)).cast(pa.int64())
            table = table.set_column(index, f"{field.name}_bytes", lengths)
    return table
