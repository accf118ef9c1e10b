"""SIGKILL every stage at seeded rename points (temporary file whole, renamed, or cut in
half), rerun it, and compare with an uninterrupted run: identical outputs, no lost or
duplicated keys, no temporary file left. bench/faults.py runs the larger sweep."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import SEED
from reliability_harness import KILLED, kill_at, plan_faults, stage_cases, sweep

STAGES = ("synth", "ingest-human", "caption", "filter", "assemble", "train")


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_sigkill_at_a_seeded_rename_then_rerun_is_exact(stage: str, world: dict[str, Path], tmp_path: Path) -> None:
    result = sweep(stage_cases(world)[stage], tmp_path, faults=1, seed=SEED + STAGES.index(stage))
    assert result.kill_points >= 3, "too few renames to place a kill"
    assert result.faults == 1, "the injected SIGKILL did not land"
    assert result.problems == []
    assert result.rows_lost == 0
    assert stage == "train" or result.rows_checked > 0


def test_the_kill_hook_really_kills_and_plans_are_seeded(world: dict[str, Path], tmp_path: Path) -> None:
    argv = stage_cases(world)["ingest-human"].argv(tmp_path / "out")
    assert kill_at(argv, 1, "torn") == KILLED
    assert not list((tmp_path / "out").glob("part-*.done.json"))  # died before anything was complete
    assert plan_faults(50, 4, seed=1) == plan_faults(50, 4, seed=1) != plan_faults(50, 4, seed=2)
