"""`current.json` across commands: a `capfilt run` that stops before a stage keeps what a
standalone stage command made current there (issue 23)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
from typer.testing import CliRunner

from data.layout import RunLayout
from data.shards import shard_name, write_shard


def _pairs(n: int) -> pa.Table:
    return pa.table({"key": [f"w{i}" for i in range(n)], "image_id": [f"i{i}" for i in range(n)], "source": ["web"] * n,
                     "caption": ["a caption"] * n, "jpg": pa.array([b"x"] * n, pa.binary()), "status": ["ok"] * n})  # fmt: skip


def test_a_run_that_stops_before_assemble_keeps_a_standalone_assemble_current(tmp_path: Path, prefect_harness) -> None:
    from flows.cli import app

    write_shard(_pairs(3), tmp_path / "web" / shard_name(0), "pairs")
    run = tmp_path / "run"
    layout = RunLayout(run)
    for stage in ("filter", "assemble"):  # as `capfilt filter` / `capfilt assemble --threshold 0.3` left them
        (layout.stage(stage) / f"{stage}0000000").mkdir(parents=True)
        layout.mark_current(stage, layout.stage(stage) / f"{stage}0000000")
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps({"run_dir": str(run), "data": {"web": [str(tmp_path / "web")]},
                                  "stages": {"stop_after": "ingest"}}))  # fmt: skip
    result = CliRunner().invoke(app, ["run", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert layout.read_current() == {"filter": "filter/filter0000000", "assemble": "assemble/assemble0000000"}
    assert layout.current_stage("assemble") == run / "assemble/assemble0000000"  # so export, browse, query see it


def test_a_kept_entry_is_dropped_once_the_run_changes_what_it_was_made_from(tmp_path: Path) -> None:
    from flows.bootstrap import _Run
    from flows.config import load_yaml

    run = tmp_path / "run"
    layout = RunLayout(run)
    for stage in ("filter", "assemble"):
        layout.mark_current(stage, layout.stage(stage) / f"{stage}0000000")
    write_shard(_pairs(1), tmp_path / "web" / shard_name(0), "pairs")
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps({"run_dir": str(run), "data": {"web": [str(tmp_path / "web")]},
                                  "stages": {"stop_after": "ingest"}}))  # fmt: skip
    flow_run = _Run(load_yaml(config))
    flow_run.use("filter", str(run / "filter/filter0000000"))  # the same filter: its D' stays current
    assert layout.read_current() == {"filter": "filter/filter0000000", "assemble": "assemble/assemble0000000"}
    flow_run.use("filter", str(run / "filter/other000000"))  # another filter output: the old D' is not its D'
    assert layout.read_current() == {"filter": "filter/other000000"}
