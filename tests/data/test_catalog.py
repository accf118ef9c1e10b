"""The duckdb catalog and `capfilt query`: views per dataset, read-only, confined, no bytes on the terminal."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from data.layout import LayoutError, RunLayout
from data.catalog import NoSuchView, QueryRefused, check_statement, describe, hide_blobs, open_catalog, run_query, view_names
from data.schema import SchemaError
from data.shards import CompletionRecord, shard_name, write_completion, write_shard
from flows.commands import query as query_commands


def _png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (value, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def _pairs(prefix: str, n: int, source: str) -> pa.Table:
    return pa.table(
        {
            "key": [f"{prefix}{i}" for i in range(n)],
            "image_id": [f"img{i}" for i in range(n)],
            "source": [source] * n,
            "caption": [f"{source} caption {i}" for i in range(n)],
            "jpg": pa.array([_png(i) for i in range(n)], pa.binary()),
            "status": ["ok"] * n,
        }
    )


def _scored(prefix: str, n: int, keep: bool, status: str = "ok") -> pa.Table:
    table = _pairs(prefix, n, "web").set_column(5, "status", pa.array([status] * n))
    return table.append_column("itm_score", pa.array([0.9 if keep else 0.1] * n, pa.float32())).append_column(
        "keep", pa.array([keep] * n)
    )


def _done(path: Path, counts: dict[str, int], digest: str = "h", extra: dict | None = None) -> None:
    write_completion(path, CompletionRecord(path.name, "pairs", counts, "fp", digest, extra=extra or {}))


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("run")
    write_shard(_pairs("h", 2, "human"), root / "ingest/human" / shard_name(0), "pairs")
    for i in range(2):
        path = root / "ingest/web" / shard_name(i)
        write_shard(_pairs(f"w{i}_", 3, "web"), path, "pairs")
        _done(path, {"input": 3, "kept": 3, "rejected": 0, "failed": 0})
    write_shard(_pairs("t", 2, "human"), root / "ingest/test/coco" / shard_name(0), "pairs")
    old = root / "caption/oldhash00000" / shard_name(0)
    write_shard(_pairs("old", 5, "synthetic"), old, "pairs")
    os.utime(old, (4_000_000_000, 4_000_000_000))  # written "later", but not the folder the run used: not shown
    new = root / "caption/newhash00000" / shard_name(0)
    write_shard(_pairs("s", 4, "synthetic"), new, "pairs")
    _done(new, {"input": 4, "kept": 4, "rejected": 0, "failed": 0}, "newhash00000")
    filt = root / "filter/filterhash00"
    write_shard(_scored("k", 3, True), filt / "kept" / shard_name(0), "scored")
    write_shard(_scored("r", 2, False), filt / "rejected" / shard_name(0), "scored")
    write_shard(_scored("f", 1, False, "failed"), filt / "failed" / shard_name(0), "scored")
    for outcome in ("failed", "rejected", "kept"):  # as the filter writes them: the same counts in each
        _done(filt / outcome / shard_name(0), {"input": 6, "kept": 3, "rejected": 2, "failed": 1}, "filterhash00",
              {"outcome": outcome})
    write_shard(_scored("k", 3, True), root / "assemble/asmhash00000" / shard_name(0), "dataset")
    RunLayout(root).write_current({"caption": root / "caption/newhash00000"})  # the filter and assemble: one folder each
    (root / "truth").mkdir()
    (root / "truth/world.json").write_text("{}")
    return root


@pytest.fixture()
def con(run: Path) -> duckdb.DuckDBPyConnection:
    connection = open_catalog(run)
    yield connection
    connection.close()


def _one(con: duckdb.DuckDBPyConnection, sql: str):
    return run_query(con, sql).fetchall()


def test_one_view_per_dataset(con: duckdb.DuckDBPyConnection) -> None:
    assert view_names(con) == sorted(["human", "web", "test", "synthetic", "scored", "rejects", "dataset", "stage_stats"])
    columns = dict(describe(con)["scored"])
    assert columns["jpg"] == "BLOB" and columns["itm_score"] == "FLOAT" and columns["outcome"] == "VARCHAR"


def test_views_answer_over_the_shards(con: duckdb.DuckDBPyConnection) -> None:
    assert _one(con, "SELECT count(*) FROM web") == [(6,)]
    assert _one(con, "SELECT count(*) FROM human") == [(2,)]
    assert _one(con, "SELECT key FROM test ORDER BY key") == [("t0",), ("t1",)]
    # Only the caption settings folder the run's current.json names.
    assert _one(con, "SELECT DISTINCT settings_hash, count(*) FROM synthetic GROUP BY ALL") == [("newhash00000", 4)]
    assert _one(con, "SELECT outcome, count(*) FROM scored GROUP BY ALL ORDER BY ALL") == [
        ("failed", 1), ("kept", 3), ("rejected", 2)]
    assert _one(con, "SELECT count(*) FROM rejects") == [(3,)]
    assert _one(con, "SELECT count(*), bool_and(keep) FROM dataset") == [(3, True)]
    assert _one(con, "SELECT sum(counts['input']) FROM stage_stats WHERE stage = 'ingest'") == [(6,)]
    # the filter's three outcome records of one shard are one row: its rows are counted once
    assert _one(con, "SELECT folder, counts['input'], counts['rejected'], extra FROM stage_stats WHERE stage = 'filter'") == [
        ("filter/filterhash00", 6, 2, "{}")]


def test_python_callers_get_the_bytes(con: duckdb.DuckDBPyConnection) -> None:
    (jpg,) = _one(con, "SELECT jpg FROM human WHERE key = 'h1'")[0]
    assert jpg == _png(1)
    shown = hide_blobs(run_query(con, "SELECT key, jpg FROM human ORDER BY key").to_arrow_table())
    assert shown.column_names == ["key", "jpg_bytes"] and shown.column("jpg_bytes").to_pylist() == [len(_png(0)), len(_png(1))]


def test_allowed_statement_kinds(con: duckdb.DuckDBPyConnection) -> None:
    for sql in ("WITH x AS (SELECT key FROM web) SELECT count(*) FROM x", "DESCRIBE web", "SHOW TABLES",
                "SUMMARIZE human", "EXPLAIN SELECT * FROM web", "FROM web LIMIT 1"):
        assert run_query(con, sql).fetchall()


@pytest.mark.parametrize(
    ("sql", "reason"),
    [
        ("COPY web TO '{out}/leak.csv'", "COPY"),
        ("COPY (SELECT * FROM web) TO '{run}/ingest/web/part-00000.parquet' (FORMAT parquet)", "COPY"),
        ("ATTACH '{out}/other.duckdb' AS other", "ATTACH"),
        ("INSTALL httpfs", "extensions"),
        ("LOAD httpfs", "extensions"),
        ("SELECT * FROM read_csv('/etc/passwd')", "Cannot access file"),
        ("SELECT * FROM read_text('{run}/../../../etc/hostname')", "Cannot access file"),
        ("SELECT * FROM read_parquet('{run}/ingest/web/part-00000.parquet')", "Cannot access file"),
        ("SELECT * FROM glob('/*')", "Cannot access file"),
        ("CREATE TABLE t AS SELECT 1", "read-only"),
        ("INSERT INTO stage_stats (stage) VALUES ('x')", "read-only"),
        ("DROP VIEW rejects", "read-only"),
        ("SET enable_external_access = true", "locked"),
        ("PRAGMA enable_profiling", "PRAGMA"),
        ("SELECT 1; SELECT 2", "exactly one statement"),
        ("SELECT 1; COPY web TO '{out}/x.csv'", "exactly one statement"),
        ("EXPLAIN ANALYZE COPY web TO '{out}/x.csv'", "COPY"),
        ("EXPORT DATABASE '{out}/export'", "EXPORT"),
        ("", "exactly one statement"),
    ],
)
def test_each_escape_is_refused(con: duckdb.DuckDBPyConnection, run: Path, tmp_path: Path, sql: str, reason: str) -> None:
    sql = sql.format(run=run, out=tmp_path)
    before = pq.read_table(run / "ingest/web" / shard_name(0)).num_rows
    with pytest.raises(QueryRefused, match="refused") as info:
        run_query(con, sql).fetchall()
    assert reason in str(info.value)
    assert list(tmp_path.iterdir()) == []  # nothing written
    assert pq.read_table(run / "ingest/web" / shard_name(0)).num_rows == before
    assert _one(con, "SELECT count(*) FROM web") == [(6,)]  # the catalog is intact


@pytest.mark.parametrize(
    "sql",
    [
        "COPY web TO '{out}/raw.csv'",
        "ATTACH '{out}/raw.duckdb'",
        "SELECT * FROM read_csv('/etc/passwd')",
        "INSTALL httpfs",
        "LOAD httpfs",
        "SET enable_external_access = true",
        "SET lock_configuration = false",
    ],
)
def test_raw_connection_is_confined_too(con: duckdb.DuckDBPyConnection, tmp_path: Path, sql: str) -> None:
    """Without the statement check (a notebook using the connection directly) duckdb itself refuses."""
    with pytest.raises((duckdb.PermissionException, duckdb.InvalidInputException)):
        con.execute(sql.format(out=tmp_path)).fetchall()
    assert list(tmp_path.iterdir()) == []


def test_python_objects_are_not_scanned(con: duckdb.DuckDBPyConnection) -> None:
    secret = pa.table({"password": ["hunter2"]})  # noqa: F841 - a local duckdb could scan by name
    with pytest.raises(NoSuchView, match="no view 'secret'"):  # a catalog view or nothing
        run_query(con, "SELECT * FROM secret").fetchall()


def test_check_statement_parse_error(con: duckdb.DuckDBPyConnection) -> None:
    with pytest.raises(QueryRefused, match="cannot parse"):
        check_statement(con, "SELEC 1")


def test_missing_datasets_have_no_view(tmp_path: Path) -> None:
    write_shard(_pairs("w", 1, "web"), tmp_path / "ingest/web" / shard_name(0), "pairs")
    (tmp_path / "ingest/web" / "part-00001.parquet.tmp").write_bytes(b"half")  # ignored
    (tmp_path / "ingest/web/_img2dataset").mkdir()
    (tmp_path / "ingest/web/_img2dataset" / "part-00000.parquet").write_bytes(b"not ours")  # ignored
    assert view_names(open_catalog(tmp_path)) == ["web"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert view_names(open_catalog(empty)) == []
    with pytest.raises(FileNotFoundError, match="no such run folder"):
        open_catalog(tmp_path / "nope")


def test_bad_shard_is_named(tmp_path: Path) -> None:
    path = tmp_path / "ingest/web" / shard_name(0)
    path.parent.mkdir(parents=True)
    pq.write_table(_pairs("w", 1, "web").drop_columns(["caption"]), path)
    with pytest.raises(SchemaError, match=r"part-00000.parquet.*'caption'"):
        open_catalog(tmp_path)


# ----------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def cli() -> typer.Typer:
    app = typer.Typer()
    query_commands.register(app)
    app.command("noop")(lambda: None)  # a second command keeps `query` a named subcommand
    return app


def _invoke(cli: typer.Typer, *args: str):
    return CliRunner().invoke(cli, ["query", *args])


def test_cli_table_hides_bytes(cli: typer.Typer, run: Path) -> None:
    result = _invoke(cli, str(run), "SELECT key, caption, jpg FROM human ORDER BY key")
    assert result.exit_code == 0, result.output
    assert "jpg_bytes" in result.output and "h0" in result.output and "(2 rows)" in result.output
    assert "PNG" not in result.output and "\\x" not in result.output
    result = _invoke(cli, str(run), "SELECT * FROM web", "--max-rows", "2")
    assert "(2 rows, more not shown" in result.output and "PNG" not in result.output


def test_cli_schema_lists_views(cli: typer.Typer, run: Path) -> None:
    result = _invoke(cli, str(run), "--schema")
    assert result.exit_code == 0, result.output
    for view in ("human (2 rows)", "web (6 rows)", "scored (6 rows)", "rejects (3 rows)", "stage_stats", "dataset"):
        assert view in result.output
    assert "outcome" in result.output and "BLOB" in result.output


def test_cli_writes_csv_json_parquet(cli: typer.Typer, run: Path, tmp_path: Path) -> None:
    sql = "SELECT key, jpg, itm_score FROM scored ORDER BY key"
    out = tmp_path / "q.csv"
    assert _invoke(cli, str(run), sql, "--format", "csv", "--output", str(out)).exit_code == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 6 and set(rows[0]) == {"key", "jpg_bytes", "itm_score"}
    result = _invoke(cli, str(run), sql, "--format", "json")
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == 6 and lines[0]["jpg_bytes"] > 0 and "jpg" not in lines[0]
    out = tmp_path / "q.parquet"
    assert _invoke(cli, str(run), sql, "--format", "parquet", "-o", str(out)).exit_code == 0
    table = pq.read_table(out)
    assert table.num_rows == 6 and table.column("jpg").to_pylist()[0].startswith(b"\x89PNG")  # bytes kept
    nested = _invoke(cli, str(run), "SELECT counts FROM stage_stats", "--format", "csv")
    assert nested.exit_code == 0 and '"input"' in nested.stdout
    assert not list(tmp_path.glob("*.tmp"))


def test_cli_refusals_exit_2(cli: typer.Typer, run: Path, tmp_path: Path) -> None:
    for sql in (f"COPY web TO '{tmp_path}/x.csv'", "SELECT * FROM read_csv('/etc/passwd')", "DROP VIEW web"):
        result = _invoke(cli, str(run), sql)
        assert result.exit_code == 2 and "refused" in result.output
    result = _invoke(cli, str(run), "SELECT 1", "--format", "parquet")
    assert result.exit_code == 2 and "--output" in result.output
    result = _invoke(cli, str(run), "SELECT nope FROM web")
    assert result.exit_code == 1 and "nope" in result.output
    assert list(tmp_path.iterdir()) == []


def test_several_unrecorded_settings_folders_are_refused_by_name(tmp_path: Path) -> None:
    for digest in ("aaaa00000000", "bbbb00000000"):
        write_shard(_pairs(digest[:2], 2, "synthetic"), tmp_path / "caption" / digest / shard_name(0), "pairs")
    with pytest.raises(LayoutError, match=r"caption holds 2 settings folders \(aaaa00000000, bbbb00000000\)"):
        open_catalog(tmp_path)
    RunLayout(tmp_path).mark_current("caption", tmp_path / "caption" / "bbbb00000000")
    con = open_catalog(tmp_path)
    assert _one(con, "SELECT DISTINCT settings_hash FROM synthetic") == [("bbbb00000000",)]


# ----------------------------------------------------------------------------- hostile (issue 23)


def _capfilt_query(*args: str):  # noqa: ANN202 (a click Result)
    from flows.cli import app

    return CliRunner().invoke(app, ["query", *args])


def test_a_runaway_query_stops_at_its_timeout_in_one_line(run: Path) -> None:
    import time

    start = time.monotonic()
    result = _capfilt_query(str(run), "SELECT count(*) FROM range(100000000000) a", "--timeout", "1")
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert lines[0].startswith("capfilt query: the query ran past its time limit of 1 s") and "--timeout" in lines[0]
    assert time.monotonic() - start < 20
    assert _capfilt_query(str(run), "SELECT count(*) FROM web", "--timeout", "30").exit_code == 0  # a quick one is not hit
    assert "--timeout" in _capfilt_query("--help").output


@pytest.mark.parametrize("planted", ["a shard", "a folder"])
def test_a_link_planted_in_the_run_folder_cannot_make_a_view_read_outside_it(run: Path, tmp_path: Path,
                                                                            planted: str) -> None:  # fmt: skip
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    secret = tmp_path / "elsewhere" / shard_name(0)
    write_shard(_pairs("secret", 2, "web"), secret, "pairs")
    link = copy / "ingest/web" / shard_name(1) if planted == "a shard" else copy / "ingest/test"
    shutil.rmtree(link) if link.is_dir() else link.unlink()
    link.symlink_to(secret if planted == "a shard" else secret.parent)
    result = _capfilt_query(str(copy), "SELECT key FROM web UNION ALL SELECT key FROM test")
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "leads outside the run folder" in lines[0], result.output
    assert "secret0" not in result.output and str(link.name) in lines[0]
    link.unlink()
    if planted == "a shard":  # a link that stays inside the run folder is fine
        link.symlink_to(copy / "ingest/human" / shard_name(0))
    assert _capfilt_query(str(copy), "SELECT count(*) FROM web").exit_code == 0


def test_web_read_in_place_has_a_web_view_and_a_missing_view_is_one_line(run: Path, tmp_path: Path) -> None:
    import shutil

    from data.schema import schema_for

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "ingest/web")  # data.web read in place: the run never wrote RUN/ingest/web
    result = _capfilt_query(str(copy), "SELECT count(*) AS n, count(DISTINCT status) AS s FROM web", "-f", "csv")
    assert result.exit_code == 0 and result.output.split() == ['"n","s"', "6,2"], result.output  # every row the filter read
    con = open_catalog(copy)
    assert [c for c, _ in describe(con)["web"]] == schema_for("pairs").names
    con.close()
    shutil.rmtree(copy / "filter")  # before the filter has read them: one line saying why and what to do
    result = _capfilt_query(str(copy), "SELECT count(*) FROM web")
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert lines[0].startswith("capfilt query: no view 'web' in this run folder: ingest/web holds no shards")
    assert "data.web" in lines[0] and "capfilt ingest img2dataset" in lines[0] and "pg_enum" not in lines[0]
    assert "views here: dataset, human, stage_stats, synthetic, test" in lines[0]
    shutil.rmtree(copy / "assemble")
    assert "no D' yet" in _capfilt_query(str(copy), "SELECT * FROM dataset").output
    assert "no dataset of that name" in _capfilt_query(str(copy), "SELECT * FROM nope").output
