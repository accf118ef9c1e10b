"""Resume: a stage fails partway (injected fault), the rerun recomputes only what was missing,
and the result equals an uninterrupted run."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.flows.conftest import small_world_config

pytestmark = pytest.mark.slow
_VOLATILE = {".lock", "stages.jsonl", "current.json"}  # the run's own records, rewritten each run


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime_ns) of every data file a stage wrote (Prefect's own bookkeeping excluded)."""
    out = {}
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        if path.is_file() and rel.parts[0] != ".prefect" and rel.name not in _VOLATILE:
            stat = path.stat()
            out[str(rel)] = (stat.st_ino, stat.st_mtime_ns)
    return out


def _tables(folder: Path) -> dict[str, list[dict]]:
    return {p.name: pq.read_table(p).to_pylist() for p in sorted(folder.glob("part-*.parquet"))}


def test_fault_then_rerun_resumes_and_matches(tmp_path: Path, prefect_harness, random_tiny_model, monkeypatch) -> None:
    from flows.bootstrap import bootstrap

    broken = small_world_config(tmp_path / "broken", random_tiny_model)
    monkeypatch.setenv("CAPFILT_FAULT", "filter:2")
    with pytest.raises(Exception, match="injected fault in filter shard 2"):
        bootstrap(config=broken)
    before = _snapshot(broken.root)
    filter_dirs = list((broken.root / "filter").glob("*/kept"))
    assert len(filter_dirs) == 1
    done = sorted(p.name for p in filter_dirs[0].glob("part-*.parquet"))
    assert "part-00002.parquet" not in done and len(done) == 4  # the other shards finished
    assert not (broken.root / "assemble").exists()

    monkeypatch.delenv("CAPFILT_FAULT")  # the fix
    summary = bootstrap(config=broken)
    after = _snapshot(broken.root)
    changed = sorted(k for k, v in before.items() if after.get(k) != v)
    assert changed == [], f"finished outputs were rewritten: {changed}"
    new = sorted(set(after) - set(before))
    assert any(k.endswith("kept/part-00002.parquet") for k in new)
    assert not any(k.startswith("caption/") and k.endswith(".parquet") for k in new)  # captions were complete
    rows = {r["stage"]: r for r in summary["stages"]}
    assert rows["filter"]["skipped_shards"] == 4 and rows["caption"]["skipped_shards"] == 5

    clean = small_world_config(tmp_path / "clean", random_tiny_model)
    reference = bootstrap(config=clean)
    for stage in ("caption_dir", "dataset_dir"):
        got, want = Path(summary[stage]), Path(reference[stage])
        assert got.name == want.name  # same settings hash
        assert _tables(got) == _tables(want) and _tables(got)
    got_kept = Path(summary["filter_dir"]) / "kept"
    assert _tables(got_kept) == _tables(Path(reference["filter_dir"]) / "kept")
    assert os.environ.get("CAPFILT_FAULT") is None
