"""A hostile web corpus (tests/reliability/hostile_corpus.py) through real img2dataset
ingestion (local HTTP server), caption, filter and assemble with a tiny random model.

Every URL-list row ends exactly once as kept, rejected with a reason, or failed with an
error; the counts add up to the input at every stage; `capfilt query` shows the reasons;
a `file://` URL never reads the local file."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest
from hostile_corpus import Case
from reliability_harness import run_hostile_pipeline
from typer.testing import CliRunner

from data.catalog import open_catalog, run_query
from data.shards import list_shards, read_completion, read_table

EMPTY_CAPTIONS = {"cap-null", "cap-empty", "cap-whitespace"}


@pytest.fixture(scope="module")
def hostile_run(world: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    return run_hostile_pipeline(tmp_path_factory.mktemp("hostile"), world["model"])


def _rows(folder: Path, kind: str) -> list[dict]:
    return [row for path in list_shards(folder) for row in read_table(path, kind).to_pylist()]


def test_every_url_row_is_ingested_once_ok_or_failed_with_an_error(hostile_run: dict) -> None:
    cases: list[Case] = hostile_run["cases"]
    rows = {r["key"]: r for r in _rows(hostile_run["run"] / "ingest" / "web", "pairs")}
    assert sorted(rows) == sorted(c.key for c in cases)
    for case in cases:
        row = rows[case.key]
        assert row["status"] == ("ok" if case.expect == "ok" else "failed"), (case.what, row["error"])
        assert (row["error"] is None) == (row["status"] == "ok"), case.what
        assert (row["jpg"] is not None) == (row["status"] == "ok"), case.what
    stats = hostile_run["ingest"]
    assert stats.input == len(cases) == stats.ok + stats.failed


def test_non_http_urls_are_never_fetched(hostile_run: dict) -> None:
    rows = {r["key"]: r for r in _rows(hostile_run["run"] / "ingest" / "web", "pairs")}
    for key in ("url-empty", "url-blank", "url-file", "url-ftp", "url-js", "url-data", "url-relative"):
        assert rows[key]["error"].startswith("bad_url:"), rows[key]["error"]
    secret = hashlib.sha256((hostile_run["root"] / "corpus" / "secret.png").read_bytes()).hexdigest()
    assert secret not in {r["sha256"] for r in rows.values()}


def test_every_row_ends_kept_rejected_with_a_reason_or_failed_with_an_error(hostile_run: dict) -> None:
    cases = {c.key: c for c in hostile_run["cases"]}
    folder = hostile_run["filter"].output
    outcome: dict[str, tuple[str, dict]] = {}
    for name in ("kept", "rejected", "failed"):
        for row in _rows(folder / name, "scored"):
            assert row["key"] not in outcome, f"{row['key']} ends twice"
            outcome[row["key"]] = (name, row)
            if name == "kept":
                assert row["keep"] and row["reject_reason"] is None and row["error"] is None
            elif name == "rejected":
                assert not row["keep"] and row["reject_reason"] in ("itm_below_threshold", "empty_caption")
            else:
                assert row["status"] == "failed" and row["error"]
    web = {k: v for k, v in outcome.items() if v[1]["source"] == "web"}
    assert sorted(web) == sorted(cases)
    for key, case in cases.items():
        where, row = web[key]
        if case.expect == "failed":
            assert where == "failed", (case.what, where)
        elif key in EMPTY_CAPTIONS:
            assert (where, row["reject_reason"]) == ("rejected", "empty_caption"), case.what
        else:
            assert where in ("kept", "rejected"), (case.what, row["error"])
    synthetic = [v for v in outcome.values() if v[1]["source"] == "synthetic"]
    assert len(synthetic) == sum(1 for c in cases.values() if c.expect == "ok")  # one caption per readable image


def test_counts_add_up_at_every_stage(hostile_run: dict) -> None:
    n = len(hostile_run["cases"])
    ok = hostile_run["ingest"].ok
    caption = hostile_run["captions"].totals
    assert caption["input"] == n and caption["kept"] == ok and caption["kept"] + caption["failed"] == n
    scored = hostile_run["filter"].totals
    assert scored["web_input"] == n and scored["synthetic_input"] == caption["captions"]
    assert scored["kept"] + scored["rejected"] + scored["failed"] == scored["input"] == n + caption["captions"]
    assemble = hostile_run["assemble"].totals
    assert assemble["input"] == scored["kept"]
    dataset = _rows(hostile_run["assemble"].output, "dataset")
    assert assemble["kept"] + assemble["rejected"] + assemble["failed"] == assemble["input"]
    assert len(dataset) == assemble["kept"] == assemble["input"] - assemble["duplicate"]
    assert assemble["duplicate"] >= 1  # the same image with the same caption at two URLs
    assert len({r["key"] for r in dataset}) == len(dataset)
    records = [read_completion(p) for p in list_shards(hostile_run["assemble"].output)]
    assert sum(r.counts["kept"] for r in records) == len(dataset)


def test_capfilt_query_shows_the_reasons(hostile_run: dict) -> None:
    from flows.cli import app

    run = hostile_run["run"]
    sql = "SELECT outcome, coalesce(reject_reason, split_part(error, ':', 1)) AS why, count(*) AS n FROM scored GROUP BY ALL ORDER BY ALL"
    result = CliRunner().invoke(app, ["query", str(run), sql, "--format", "json"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.output.splitlines() if line.strip()]
    by_reason = Counter({(r["outcome"], r["why"]): r["n"] for r in rows})
    assert by_reason[("rejected", "empty_caption")] == len(EMPTY_CAPTIONS)
    assert by_reason[("failed", "bad_url")] == 7 and by_reason[("failed", "undecodable")] >= 6
    assert sum(by_reason.values()) == hostile_run["filter"].totals["input"]
    con = open_catalog(run)
    table: pa.Table = run_query(con, "SELECT count(*) AS n FROM rejects").to_arrow_table()
    assert table.column("n")[0].as_py() == sum(n for (outcome, _), n in by_reason.items() if outcome != "kept")
