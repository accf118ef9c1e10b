"""Locations: local paths stay `pathlib.Path`; URLs are `RemotePath`s with the Path calls the
run code uses, on fsspec's in-memory filesystem; atomic writes there upload whole or nothing."""

from __future__ import annotations

import pickle
import uuid
from pathlib import Path

import pyarrow as pa
import pytest

from data.shards import atomic_path, list_shards, read_table, write_shard
from data.storage import RemotePath, StorageConfig, is_remote, list_files, location


def test_local_paths_and_file_urls_are_plain_paths(tmp_path: Path) -> None:
    assert location("runs/demo") == Path("runs/demo") and type(location("runs/demo")) is type(Path("x"))
    assert location(f"file://{tmp_path}") == tmp_path
    assert not is_remote(str(tmp_path)) and is_remote("s3://bucket/run")


def test_remote_path_api_on_memory() -> None:
    root = location(f"memory://capfilt-{uuid.uuid4().hex[:8]}/run")
    assert isinstance(root, RemotePath) and root.name == "run" and root.parent.name.startswith("capfilt-")
    shard = root / "caption" / "abc" / "part-00000.parquet"
    assert shard.with_name("x.json").name == "x.json" and shard.relative_to(root).as_posix() == "caption/abc/part-00000.parquet"
    assert not shard.exists() and not (root / "caption").is_dir()
    shard.write_bytes(b"12345")
    assert shard.is_file() and shard.stat().st_size == 5 and (root / "caption").is_dir()
    assert [p.name for p in (root / "caption").iterdir()] == ["abc"]
    assert list_files(root, "**/*.parquet") == [shard]
    with pytest.raises(ValueError):
        root.relative_to(shard)
    shard.unlink()
    shard.unlink(missing_ok=True)
    with pytest.raises(FileNotFoundError):
        shard.read_bytes()


def test_options_travel_in_pickles_but_never_in_text() -> None:
    path = RemotePath("s3://bucket/run", {"secret": "hunter2"})
    again = pickle.loads(pickle.dumps(path))
    assert again == path and again.options == {"secret": "hunter2"}
    assert "hunter2" not in str(path) and "hunter2" not in repr(path)


def test_atomic_path_on_object_storage_uploads_whole_or_nothing() -> None:
    folder = location(f"memory://capfilt-{uuid.uuid4().hex[:8]}")
    target = folder / "part-00000.parquet"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed mid-write")
    assert not target.exists()
    write_shard(pa.table({"key": ["a"], "image_id": ["i"], "source": ["web"], "caption": ["c"], "status": ["ok"]}), target, kind="pairs")
    assert list_shards(folder) == [target] and read_table(target, "pairs").column("key").to_pylist() == ["a"]


def test_storage_config_takes_secrets_only_as_env_references(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAPFILT_TEST_SECRET", "s3cr3t")
    cfg = StorageConfig({"s3": {"endpoint_url": "http://127.0.0.1:9", "secret": "${CAPFILT_TEST_SECRET}"}})
    assert cfg.resolved() == {"s3": {"endpoint_url": "http://127.0.0.1:9", "secret": "s3cr3t"}}
    with pytest.raises(ValueError, match="storage.options.s3.key: give a secret as an environment reference"):
        StorageConfig({"s3": {"key": "AKIA..."}})
    with pytest.raises(KeyError, match="CAPFILT_UNSET_VAR"):
        StorageConfig({"s3": {"token": "${CAPFILT_UNSET_VAR}"}}).resolved()
