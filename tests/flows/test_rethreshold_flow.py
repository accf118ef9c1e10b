"""A rerun with a new `assemble.threshold` re-decides from the stored scores: no new filter
folder, the scored shards untouched (same inode and mtime), a new D' next to the old one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from data.layout import RunLayout
from data.shards import list_shards, read_table
from tests.flows.conftest import small_world_config

pytestmark = pytest.mark.slow


def _stamps(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


def test_new_assemble_threshold_reuses_the_filter_output(tmp_path: Path, prefect_harness, random_tiny_model) -> None:
    from flows.bootstrap import bootstrap

    run = tmp_path / "run"
    first = bootstrap(config=small_world_config(run, random_tiny_model, assemble={"dedupe": False}))
    filter_dir = Path(first["filter_dir"])
    scored = [p for part in ("kept", "rejected") for p in list_shards(filter_dir / part)]
    scores = np.concatenate([read_table(p, "scored", columns=["itm_score"])["itm_score"].to_numpy() for p in scored])
    threshold = float(np.round(np.nanmedian(scores), 4))  # splits the random model's scores in two
    before = {"filter": _stamps(run / "filter"), "caption": _stamps(run / "caption")}

    again = bootstrap(config=small_world_config(run, random_tiny_model, assemble={"dedupe": False, "threshold": threshold}))
    assert again["filter_dir"] == first["filter_dir"] and [p.name for p in (run / "filter").iterdir()] == [filter_dir.name]
    assert {"filter": _stamps(run / "filter"), "caption": _stamps(run / "caption")} == before  # nothing rescored
    new_dir, old_dir = Path(again["dataset_dir"]), Path(first["dataset_dir"])
    assert new_dir != old_dir and old_dir.is_dir()  # the new D' next to the old one
    assert RunLayout(run).current_stage("assemble") == new_dir
    rows = [r for p in list_shards(new_dir) for r in read_table(p, "dataset", columns=["source", "threshold"]).to_pylist()]
    judged = [r for r in rows if r["source"] != "human"]
    assert len(judged) == int((scores >= np.float32(threshold)).sum()) > 0
    assert {r["threshold"] for r in judged} == {float(np.float32(threshold))}
