"""A finished run's record answers a rerun only while nothing it depends on has changed."""

from __future__ import annotations

import os
from pathlib import Path

from flows.config import preset
from flows.run_record import finished_summary, forget_record, write_record

SUMMARY = {"run_dir": "x", "report": "x/report.md", "stages": [{"stage": "caption", "seconds": 1.5}]}


def _finished_run(tmp_path: Path, **overrides: object):
    run = tmp_path / "run"
    (run / "caption" / "abc").mkdir(parents=True, exist_ok=True)
    (run / "caption" / "abc" / "part-00000.parquet").write_bytes(b"rows")
    (run / "report.md").write_text("# report")
    config = preset("demo-quick", run_dir=str(run), **overrides)
    write_record(config, SUMMARY)
    return config, run


def test_an_unchanged_run_is_answered_from_its_record(tmp_path: Path) -> None:
    config, run = _finished_run(tmp_path)
    assert finished_summary(config) == SUMMARY
    (run / ".lock").write_text("pid 1")  # the lock's text and Prefect's own folder do not count
    (run / ".prefect").mkdir()
    (run / ".prefect" / "result").write_text("{}")
    assert finished_summary(config) == SUMMARY


def test_a_changed_file_setting_or_missing_record_runs_the_flow(tmp_path: Path) -> None:
    config, run = _finished_run(tmp_path)
    shard = run / "caption" / "abc" / "part-00000.parquet"
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 1_000_000))
    assert finished_summary(config) is None  # rewritten (same size, new mtime)
    config, run = _finished_run(tmp_path)
    (run / "caption" / "abc" / "part-00000.parquet").unlink()
    assert finished_summary(config) is None  # deleted
    config, run = _finished_run(tmp_path)
    assert finished_summary(preset("demo-quick", run_dir=str(run), filter={"threshold": 0.3})) is None
    forget_record(config)
    assert finished_summary(config) is None


def test_local_inputs_count_and_inputs_on_object_storage_are_never_recorded(tmp_path: Path) -> None:
    web, human = tmp_path / "web", tmp_path / "human"
    for folder in (web, human):
        folder.mkdir()
        (folder / "00000.parquet").write_bytes(b"rows")
    data = {"web": [str(web / "*.parquet")], "human": [str(human)], "test": [str(human)], "world": None}
    config, _ = _finished_run(tmp_path, data=data)
    assert finished_summary(config) == SUMMARY
    (web / "00001.parquet").write_bytes(b"more web rows")  # a new shard matches the glob
    assert finished_summary(config) is None
    config, _ = _finished_run(tmp_path, data={**data, "web": ["s3://bucket/web"]})
    assert finished_summary(config) is None
