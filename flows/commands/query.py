"""`capfilt query RUN "SQL"`: read-only SQL over a run's datasets (see data/catalog.py).

Output formats: ``table`` (the first ``--max-rows`` rows, to the terminal or
``--output``), ``csv``, ``json`` (one object per line) and ``parquet`` (needs
``--output``). Image bytes are never printed: in table / csv / json output each
binary column becomes ``<col>_bytes``, its length; Parquet output keeps the bytes.
Files are written to a temporary name and renamed, so a failed query leaves no half file.
"""

from __future__ import annotations

import enum
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import typer

from data.defaults import DEFAULT_TIMEOUT_S
from data.storage import RemotePath, is_url, location

if TYPE_CHECKING:  # imported where used: `capfilt --help` loads neither duckdb nor pyarrow
    import duckdb
    import pyarrow as pa

DEFAULT_MAX_ROWS = 50
MAX_CELL_CHARS = 60
BATCH_ROWS = 8192
EXIT_REFUSED = 2
EXIT_ERROR = 1
RUNS_FOLDER = "runs"


class OutputFormat(str, enum.Enum):
    table = "table"
    csv = "csv"
    json = "json"
    parquet = "parquet"


def resolve_run(run: str | Path) -> Path | RemotePath:
    """`run` as given (a folder or a URL such as ``s3://bucket/run``), or ``runs/<run>``
    when only that exists."""
    if is_url(run):
        return location(run)
    run = Path(run)
    if not run.is_dir() and (Path(RUNS_FOLDER) / run).is_dir():
        return Path(RUNS_FOLDER) / run
    return run


# ----------------------------------------------------------------------------- text


def _cell(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (dict, list, tuple)):
        value = json.dumps(value, default=str)
    text = str(value).replace("\n", "\\n")
    return text if len(text) <= MAX_CELL_CHARS else text[: MAX_CELL_CHARS - 1] + "…"


def format_table(table: pa.Table, more: bool) -> str:
    """A plain text table of `table` (blobs already hidden); notes when rows were cut."""
    names = table.column_names
    rows = [[_cell(v) for v in row.values()] for row in table.to_pylist()]
    widths = [max([len(n)] + [len(r[i]) for r in rows]) for i, n in enumerate(names)]
    line = "  ".join(n.ljust(w) for n, w in zip(names, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    out.append(f"({len(rows)} rows{', more not shown: raise --max-rows or use --format csv' if more else ''})")
    return "\n".join(out) + "\n"


def _json_ready(table: pa.Table) -> pa.Table:
    """Nested columns (maps, lists, structs) as JSON text, for CSV."""
    import pyarrow as pa

    for index, field in enumerate(table.schema):
        if pa.types.is_nested(field.type):
            texts = [None if v is None else json.dumps(v, default=str) for v in table.column(index).to_pylist()]
            table = table.set_column(index, field.name, pa.array(texts, pa.string()))
    return table


# ----------------------------------------------------------------------------- writers


@contextmanager
def _sink(output: str | None, binary: bool) -> Iterator[IO[Any]]:
    """stdout, or a temporary file renamed to `output` (a path or URL) on success."""
    from data.shards import atomic_path

    if output is None:
        yield sys.stdout.buffer if binary else sys.stdout
        return
    target = location(output)
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp, open(tmp, "wb" if binary else "w", encoding=None if binary else "utf-8") as handle:
        yield handle


def _write_stream(relation: duckdb.DuckDBPyRelation, fmt: OutputFormat, output: str | None) -> int:
    """Stream the result to csv / json / parquet; returns the number of rows written."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from data.catalog import hide_blobs

    reader = relation.to_arrow_reader(BATCH_ROWS)
    rows = 0
    with _sink(output, binary=fmt != OutputFormat.json) as handle:
        writer: Any = None
        for batch in reader:
            table = pa.Table.from_batches([batch])
            if fmt == OutputFormat.parquet:
                writer = writer or pq.ParquetWriter(handle, table.schema)
                writer.write_table(table)
            elif fmt == OutputFormat.csv:
                table = _json_ready(hide_blobs(table))
                writer = writer or pacsv.CSVWriter(handle, table.schema)
                writer.write_table(table)
            else:
                for row in hide_blobs(table).to_pylist():
                    handle.write(json.dumps(row, default=str) + "\n")
            rows += table.num_rows
        if writer is None and fmt != OutputFormat.json:  # no rows: still write the header
            empty = hide_blobs(reader.schema.empty_table()) if fmt == OutputFormat.csv else reader.schema.empty_table()
            writer = (pq.ParquetWriter if fmt == OutputFormat.parquet else pacsv.CSVWriter)(handle, empty.schema)
        if writer is not None:
            writer.close()
    return rows


def _print_schema(con: duckdb.DuckDBPyConnection) -> str:
    from data.catalog import describe

    views = describe(con)
    if not views:
        return "no datasets in this run folder yet\n"
    out = []
    for name, columns in views.items():
        (count,) = con.execute(f'SELECT count(*) FROM "{name}"').fetchall()[0]
        out.append(f"{name} ({count} rows)")
        out += [f"  {column:<20} {dtype}" for column, dtype in columns]
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------- command


@contextmanager
def query_errors(command: str) -> Iterator[None]:
    """Turn a refused statement into exit 2 and a failed query (bad SQL, a broken shard, a run
    folder whose current outputs cannot be told) into exit 1, each with its message."""
    import duckdb

    from data.catalog import NoSuchView, QueryRefused, QueryTimeout
    from data.layout import LayoutError
    from data.schema import SchemaError

    try:
        yield
    except (QueryRefused, duckdb.PermissionException) as exc:
        typer.echo(f"capfilt {command}: {exc}", err=True)
        raise typer.Exit(EXIT_REFUSED) from None
    except (duckdb.Error, SchemaError, LayoutError, FileNotFoundError, QueryTimeout, NoSuchView) as exc:
        typer.echo(f"capfilt {command}: {exc}", err=True)
        raise typer.Exit(EXIT_ERROR) from None


def query(
    run: str = typer.Argument(..., help="the run folder, a name under runs/, or a URL (s3://bucket/run)"),
    sql: str | None = typer.Argument(None, help="one SELECT / WITH / DESCRIBE / SHOW / SUMMARIZE / EXPLAIN"),
    fmt: OutputFormat = typer.Option(OutputFormat.table, "--format", "-f", help="table, csv, json or parquet"),
    output: str | None = typer.Option(None, "--output", "-o", help="write here (a path or URL) instead of the terminal"),
    schema: bool = typer.Option(False, "--schema", help="list the datasets (views) and their columns"),
    max_rows: int = typer.Option(DEFAULT_MAX_ROWS, "--max-rows", help="rows shown by --format table"),
    timeout: float = typer.Option(DEFAULT_TIMEOUT_S, "--timeout", help="stop the query after this many seconds (0: no limit)"),
) -> None:
    """Query a run's datasets with SQL (read-only): human, web, test, synthetic, scored,
    rejects, dataset (D'), stage_stats."""
    from data.catalog import QueryRefused, open_catalog, time_limit

    with query_errors("query"):
        con = open_catalog(resolve_run(run))
        if schema:
            with time_limit(con, timeout):
                typer.echo(_print_schema(con), nl=False)
            return
        if not sql:
            raise QueryRefused('give a query, e.g. capfilt query RUN "SELECT count(*) FROM web", or --schema')
        with time_limit(con, timeout):
            _run(con, sql, fmt, output, max_rows)


def _run(con: duckdb.DuckDBPyConnection, sql: str, fmt: OutputFormat, output: str | None, max_rows: int) -> None:
    """Run `sql` and write its rows in `fmt` to `output` (None: the terminal)."""
    from data.catalog import QueryRefused, hide_blobs, run_query

    relation = run_query(con, sql)
    if fmt == OutputFormat.table:
        shown = relation.limit(max_rows + 1).to_arrow_table()
        text = format_table(hide_blobs(shown.slice(0, max_rows)), more=shown.num_rows > max_rows)
        with _sink(output, binary=False) as handle:
            handle.write(text)
    elif fmt == OutputFormat.parquet and output is None:
        raise QueryRefused("--format parquet needs --output PATH (binary is not written to the terminal)")
    else:
        rows = _write_stream(relation, fmt, output)
        if output is not None:
            typer.echo(f"wrote {rows} rows to {output}", err=True)


def register(app: typer.Typer) -> None:
    """Add `capfilt query` to the app."""
    app.command("query")(query)
