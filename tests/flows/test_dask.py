"""The task runner is one setting: a shard stage on a 2-worker Dask LocalCluster writes
exactly what it writes on threads."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.flows.conftest import small_world_config

pytestmark = pytest.mark.slow


def _tables(folder: Path) -> dict[str, list[dict]]:
    return {p.name: pq.read_table(p).to_pylist() for p in sorted(folder.glob("part-*.parquet"))}


def test_dask_local_cluster_matches_threads(tmp_path: Path, prefect_harness, random_tiny_model) -> None:
    from flows.bootstrap import bootstrap

    stop = {"stop_after": "caption"}
    threads = bootstrap(config=small_world_config(tmp_path / "threads", random_tiny_model, stages=stop))
    dask = bootstrap(config=small_world_config(tmp_path / "dask", random_tiny_model, stages=stop,
                                               runner={"kind": "dask", "dask_workers": 2}))  # fmt: skip
    got, want = Path(dask["caption_dir"]), Path(threads["caption_dir"])
    assert got.name == want.name
    tables = _tables(got)
    assert len(tables) == 5 and tables == _tables(want)
    row = {r["stage"]: r for r in dask["stages"]}["caption"]
    assert row["runner"] == "dask" and row["shards"] == 5 and row["input"] == 150
