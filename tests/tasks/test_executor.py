"""The shard-stage executor (`tasks.executor`): the plan file, the rank split, workers whose
outputs equal the stage command's byte for byte, completion records deciding what is done
(a worker with nothing left never loads its model), and a failed shard costing only itself."""

from __future__ import annotations

from pathlib import Path

import pytest
from stage_helpers import tiny_model, web_shards

from tasks.caption import CaptionConfig, plan_caption, run_caption
from tasks.execution import ExecutionConfig
from tasks.executor import PLAN_FILE, PlanItem, WorkerSpec, read_plan, write_plan
from tasks.shard_stages import run_stage_worker
from tasks.filter import FilterConfig, plan_filter, run_filter

SIZES = (3, 2, 4, 1, 2, 3, 2)
EXEC = ExecutionConfig(batch_size=2, num_workers=0, progress=False)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("executor")
    web_shards(root / "web", SIZES, failed=(1,))
    return {"web": root / "web", "model": tiny_model(root / "model")}


def _files(folder: Path) -> dict[str, bytes]:
    """The shards under `folder` (their records name the caption folder, which differs)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("part-*.parquet"))}


def test_plan_file_round_trips_and_ranks_split_it(tmp_path: Path) -> None:
    items = [PlanItem(i, f"s3://bucket/web/{i:05d}.tar", f"part-{i:05d}.parquet", None if i % 2 else f"c/{i}") for i in range(10)]
    path = write_plan(tmp_path, items)
    assert path == tmp_path / PLAN_FILE and read_plan(path) == items
    shares = [read_plan(path, rank, 3) for rank in range(3)]
    assert sorted((i for share in shares for i in share), key=lambda i: i.index) == items  # each item once
    assert [len(share) for share in shares] == [4, 3, 3]
    with pytest.raises(ValueError, match="rank"):
        read_plan(path, 3, 3)


def _specs(stage: str, stats, items, model: Path, cfg, world: int) -> list[WorkerSpec]:
    plan = str(write_plan(stats.output, items))
    return [WorkerSpec(stage, plan, str(stats.output), stats.settings_hash, str(model), cfg, rank, world) for rank in range(world)]


def test_workers_write_what_the_stage_commands_write(tmp_path: Path, world) -> None:
    """Three workers over caption then filter: the same bytes as `run_caption` / `run_filter`,
    every shard once, the counts summed; a second pass skips everything."""
    caption_cfg, filter_cfg = CaptionConfig(max_length=8, execution=EXEC), FilterConfig(execution=EXEC)
    want_c = run_caption([world["web"]], tmp_path / "cmd" / "caption", world["model"], caption_cfg)
    want_f = run_filter([world["web"]], tmp_path / "cmd" / "filter", world["model"], filter_cfg, want_c.output)

    stats, items = plan_caption([world["web"]], tmp_path / "run" / "caption", world["model"], caption_cfg)
    done: list[int] = []
    results = [run_stage_worker(spec, on_done=done.append) for spec in _specs("caption", stats, items, world["model"], caption_cfg, 3)]
    assert sorted(done) == list(range(len(SIZES))) and sum(r.shards for r in results) == len(SIZES)
    assert sum(r.counts["input"] for r in results) == sum(SIZES) and not any(r.failed for r in results)
    fstats, fitems = plan_filter([world["web"]], tmp_path / "run" / "filter", world["model"], filter_cfg, stats.output)
    for spec in _specs("filter", fstats, fitems, world["model"], filter_cfg, 3):
        run_stage_worker(spec)
    assert _files(stats.output) == _files(want_c.output) and _files(stats.output)
    assert _files(fstats.output) == _files(want_f.output) and _files(fstats.output)

    # everything complete: a worker only reads records, never the model (it is gone now)
    gone = _specs("filter", fstats, fitems, tmp_path / "no-such-model", filter_cfg, 2)
    again = [run_stage_worker(spec) for spec in gone]
    assert [(r.shards, r.skipped) for r in again] == [(4, 4), (3, 3)]
    assert sum(r.counts["input"] for r in again) == want_f.totals["input"]


def test_a_failed_shard_costs_only_itself(tmp_path: Path, world) -> None:
    """A shard whose work raises is returned as a failure; the worker's other shards complete,
    and a rerun after the fix does that shard only."""
    cfg = CaptionConfig(max_length=8, execution=EXEC)
    stats, items = plan_caption([world["web"]], tmp_path / "caption", world["model"], cfg)
    [spec] = _specs("caption", stats, items, world["model"], cfg, 1)

    def fault(index: int) -> None:
        if index == 2:
            raise RuntimeError("injected")

    first = run_stage_worker(spec, before=fault)
    assert first.failed == 1 and list(first.failures) == [items[2].src] and "injected" in first.failures[items[2].src]
    assert first.shards == len(SIZES) - 1 and not (stats.output / items[2].name).exists()
    second = run_stage_worker(spec)
    assert (second.shards, second.skipped, second.failed) == (len(SIZES), len(SIZES) - 1, 0)
