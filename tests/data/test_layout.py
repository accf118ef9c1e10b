"""The run layout: paths, round naming, and the current-outputs record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data.layout import LayoutError, RunLayout, model_name, stage_layout


def test_record_is_relative_and_survives_a_move(tmp_path: Path) -> None:
    layout = RunLayout(tmp_path / "run")
    (layout.stage("filter") / "abc123def456").mkdir(parents=True)
    outside = tmp_path / "elsewhere" / "model"
    layout.write_current({"filter": layout.stage("filter") / "abc123def456", "model/final": outside})
    stored = json.loads(layout.current_file.read_text())["current"]
    assert stored == {"filter": "filter/abc123def456", "model/final": str(outside)}  # inside: relative
    moved = RunLayout(tmp_path / "moved")
    layout.root.rename(moved.root)
    assert moved.current_stage("filter") == moved.root / "filter" / "abc123def456"


def test_mark_current_keeps_other_entries(tmp_path: Path) -> None:
    layout = RunLayout(tmp_path)
    layout.write_current({"caption": tmp_path / "caption" / "a"})
    layout.mark_current("filter", tmp_path / "filter" / "b")
    assert layout.read_current() == {"caption": "caption/a", "filter": "filter/b"}


def test_current_stage_without_a_record(tmp_path: Path) -> None:
    layout = RunLayout(tmp_path)
    assert layout.current_stage("assemble") is None
    (layout.stage("assemble") / "one").mkdir(parents=True)
    assert layout.current_stage("assemble") == layout.stage("assemble") / "one"  # one folder: no doubt
    (layout.stage("assemble") / "two").mkdir()
    with pytest.raises(LayoutError, match=r"2 settings folders \(one, two\).*capfilt assemble --output"):
        layout.current_stage("assemble")


def test_a_broken_record_is_named(tmp_path: Path) -> None:
    layout = RunLayout(tmp_path)
    layout.current_file.write_text("{not json")
    with pytest.raises(LayoutError, match="current.json: unreadable"):
        layout.read_current()


def test_names() -> None:
    assert model_name("filter") == "filter" and model_name("final", 3) == "round-3/final"
    with pytest.raises(ValueError):
        model_name("final", 0)
    with pytest.raises(ValueError, match="unknown shard stage"):
        RunLayout(Path("r")).stage("pretrain")
    assert stage_layout(Path("runs/x/filter"), "filter") == RunLayout(Path("runs/x"))
    assert stage_layout(Path("out/somewhere"), "filter") is None
