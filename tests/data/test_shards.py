"""Shard IO: atomic writes, completion records, schema errors, streaming reads, hashes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.schema import SchemaError
from data.shards import (
    CompletionRecord,
    completion_path,
    file_fingerprint,
    is_complete,
    iter_batches,
    list_shards,
    read_completion,
    read_row_group,
    read_table,
    row_group_sizes,
    settings_hash,
    shard_name,
    write_completion,
    write_shard,
)


def _pairs(n: int, start: int = 0) -> pa.Table:
    keys = [f"k{start + i:04d}" for i in range(n)]
    return pa.table(
        {
            "key": pa.array(keys, pa.string()),
            "image_id": pa.array([f"img{start + i}" for i in range(n)], pa.string()),
            "source": pa.array(["web"] * n, pa.string()),
            "caption": pa.array([f"caption {i}" for i in range(n)], pa.string()),
            "jpg": pa.array([bytes([i % 256]) * 10 for i in range(n)], pa.binary()),
            "status": pa.array(["ok"] * n, pa.string()),
        }
    )


def _record(path: Path, fp: str = "fp", sh: str = "abc") -> CompletionRecord:
    return CompletionRecord(
        shard=path.name, kind="pairs", counts={"input": 3, "ok": 3}, input_fingerprint=fp, settings_hash=sh
    )


def test_shard_name_is_zero_padded() -> None:
    assert shard_name(42) == "part-00042.parquet"
    assert completion_path(Path("x") / shard_name(42)) == Path("x/part-00042.done.json")
    with pytest.raises(ValueError):
        shard_name(-1)


def test_write_conforms_and_reads_back(tmp_path: Path) -> None:
    path = tmp_path / "web" / shard_name(0)
    write_shard(_pairs(5), path, "pairs")
    assert not (tmp_path / "web" / "part-00000.parquet.tmp").exists()
    table = read_table(path, "pairs")
    assert table.num_rows == 5
    assert table.column("url").null_count == 5  # absent optional column filled with nulls
    assert read_table(path, "pairs", columns=["key"]).column_names == ["key"]


def test_missing_required_column_is_refused_on_write(tmp_path: Path) -> None:
    with pytest.raises(SchemaError, match="image_id"):
        write_shard(_pairs(2).drop_columns(["image_id"]), tmp_path / shard_name(0), "pairs")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("mutate", "column"),
    [
        (lambda t: t.drop_columns(["caption"]), "caption"),
        (lambda t: t.set_column(t.schema.get_field_index("width"), "width", pa.array(["a"] * 3)), "width"),
    ],
)
def test_schema_error_names_file_and_column(tmp_path: Path, mutate, column: str) -> None:
    path = tmp_path / shard_name(1)
    write_shard(_pairs(3), path, "pairs")
    pq.write_table(mutate(read_table(path, "pairs")), path)  # a foreign writer breaks it
    for read in (lambda: read_table(path, "pairs"), lambda: list(iter_batches(path, "pairs", 2))):
        with pytest.raises(SchemaError) as info:
            read()
        assert str(path) in str(info.value) and repr(column) in str(info.value)


def test_not_parquet_is_a_schema_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / shard_name(0)
    path.write_bytes(b"garbage")
    with pytest.raises(SchemaError, match="part-00000.parquet"):
        read_table(path, "pairs")


def test_scored_shard_needs_score_columns(tmp_path: Path) -> None:
    path = tmp_path / shard_name(0)
    write_shard(_pairs(2), path, "pairs")
    with pytest.raises(SchemaError, match="itm_score"):
        read_table(path, "scored")


def test_iter_batches_streams_row_groups(tmp_path: Path) -> None:
    path = tmp_path / shard_name(0)
    write_shard(_pairs(25), path, "pairs", row_group_size=10)
    assert row_group_sizes(path, "pairs") == [10, 10, 5]
    batches = list(iter_batches(path, "pairs", batch_size=4, columns=["key", "caption"]))
    assert all(b.num_rows <= 4 for b in batches)
    assert [k for b in batches for k in b.column("key").to_pylist()] == [f"k{i:04d}" for i in range(25)]
    assert read_row_group(path, "pairs", 2).column("key").to_pylist()[-1] == "k0024"


def test_completion_record_roundtrip_and_is_complete(tmp_path: Path) -> None:
    path = tmp_path / shard_name(3)
    assert not is_complete(path, "fp", "abc")
    with pytest.raises(FileNotFoundError):
        write_completion(path, _record(path))  # never a record without data
    write_shard(_pairs(3), path, "pairs")
    assert not is_complete(path, "fp", "abc")  # data without record
    done = write_completion(path, _record(path))
    assert done.name == "part-00003.done.json"
    record = read_completion(path)
    assert record is not None and record.counts == {"input": 3, "ok": 3}
    assert record.output_bytes == path.stat().st_size
    assert read_completion(done) == record
    assert is_complete(path, "fp", "abc")
    assert not is_complete(path, "other-fp", "abc")
    assert not is_complete(path, "fp", "changed")


def test_rewrite_invalidates_record_and_tampering_is_detected(tmp_path: Path) -> None:
    path = tmp_path / shard_name(0)
    write_shard(_pairs(3), path, "pairs")
    write_completion(path, _record(path))
    write_shard(_pairs(4), path, "pairs")  # a rewrite drops the old record first
    assert read_completion(path) is None and not is_complete(path, "fp", "abc")
    write_completion(path, _record(path))
    path.write_bytes(path.read_bytes()[:-10])  # truncated after completion
    assert not is_complete(path, "fp", "abc")


def test_corrupt_record_is_not_complete(tmp_path: Path) -> None:
    path = tmp_path / shard_name(0)
    write_shard(_pairs(1), path, "pairs")
    completion_path(path).write_text("{not json")
    assert not is_complete(path, "fp", "abc")
    with pytest.raises(ValueError, match="done.json"):
        read_completion(path)


def test_list_shards_sorted_ignoring_tmp(tmp_path: Path) -> None:
    assert list_shards(tmp_path / "missing") == []
    for i in (2, 0, 1):
        write_shard(_pairs(1, start=i), tmp_path / shard_name(i), "pairs")
    (tmp_path / "part-00009.parquet.tmp").write_bytes(b"half")
    (tmp_path / "notes.parquet").write_bytes(b"x")
    assert [p.name for p in list_shards(tmp_path)] == [shard_name(i) for i in range(3)]


def test_file_fingerprint_tracks_content(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"hello")
    b.write_bytes(b"hello")
    assert file_fingerprint(a) == file_fingerprint(b)
    assert file_fingerprint(a).startswith("5-")
    b.write_bytes(b"hellp")
    assert file_fingerprint(a) != file_fingerprint(b)


def test_settings_hash_is_canonical() -> None:
    @dataclass
    class Cfg:
        threshold: float
        path: Path

    h = settings_hash({"a": 1, "b": [1, 2]})
    assert len(h) == 12 and h == settings_hash({"b": [1, 2], "a": 1})
    assert h != settings_hash({"a": 2, "b": [1, 2]})
    assert settings_hash(Cfg(0.5, Path("m"))) == settings_hash({"threshold": 0.5, "path": "m"})
    with pytest.raises(TypeError, match="object"):
        settings_hash({"x": object()})


def test_write_atomic_replaces_whole_and_leaves_no_temporary(tmp_path: Path) -> None:
    from data.shards import write_atomic

    target = tmp_path / "stage.json"
    write_atomic(target, "old")
    write_atomic(target, b"new bytes")
    assert target.read_bytes() == b"new bytes"
    assert [p.name for p in tmp_path.iterdir()] == ["stage.json"]


def test_another_tools_shard_reads_in_our_fields_and_nulls_in_a_required_column_are_named(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data.schema import PAIRS, SchemaError
    from data.shards import read_table

    columns = {f.name: pa.nulls(2, f.type) for f in PAIRS}
    columns.update(key=pa.array(["a", "b"]), image_id=pa.array(["a", "b"]), source=pa.array(["web", "web"]),
                   status=pa.array(["ok", "ok"]))  # fmt: skip
    loose = pa.table(columns).select(list(reversed(PAIRS.names)))  # pa.table: every field nullable
    pq.write_table(loose, tmp_path / "part-00000.parquet")
    table = read_table(tmp_path / "part-00000.parquet", "pairs")
    assert table.schema.names == PAIRS.names and not table.schema.field("key").nullable
    columns["key"] = pa.array(["a", None])
    pq.write_table(pa.table(columns), tmp_path / "part-00001.parquet")
    with pytest.raises(SchemaError, match=r"part-00001\.parquet: column 'key' has 1 nulls \(first at row 1\)"):
        read_table(tmp_path / "part-00001.parquet", "pairs")
