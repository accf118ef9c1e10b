"""A full disk and an unwritable output, simulated without privileges (tests run as root,
so chmod stops nothing): RLIMIT_FSIZE makes writes past a size fail with EFBIG as a full
disk does; a folder where a shard file must go makes its rename fail. The stage names the
shard that failed, the completed shards stay valid, and a rerun finishes the job."""

from __future__ import annotations

import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from reliability_harness import ROOT, env
from stage_helpers import web_rows, write_pairs

from data.shards import is_complete, list_shards, read_completion
from tasks.caption import CaptionConfig, run_caption
from tasks.execution import ExecutionConfig
from tasks.lifecycle import StageIncompleteError
from tasks.filter import FilterConfig, run_filter

EXECUTION = ExecutionConfig(num_workers=0, progress=False, batch_size=4)
CAPTION = CaptionConfig(max_length=10, min_length=3, execution=EXECUTION)
FILE_LIMIT_BYTES = 48_000  # between a small shard's filter output (~8 kB) and the big one's (~100 kB)
BIG_ROWS = 80
# Every scored row lands in the kept shard, so the big input gives one big output file
# whatever the random model scores (a split over kept/rejected could stay under the limit).
KEEP_ALL = 0.0


def _limited(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def _filter_cli(world: dict[str, Path], web: Path, out: Path, limit: int | None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "flows.commands.stages", "filter", "--model", str(world["model"]), "--input", str(web),
           "--output", str(out), "--batch-size", "8", "--workers", "0", "--no-progress",
           "--threshold", str(KEEP_ALL)]  # fmt: skip
    return subprocess.run(cmd, cwd=ROOT, env=env(COLUMNS="500"), capture_output=True, text=True, timeout=300,
                          preexec_fn=_limited(limit) if limit else None)  # fmt: skip


def _tables(folder: Path) -> dict[str, object]:
    return {str(p.relative_to(folder)): pq.read_table(p) for p in sorted(folder.rglob("part-*.parquet"))}


def test_full_disk_fails_the_big_shard_by_name_and_keeps_the_others(world: dict[str, Path], tmp_path: Path) -> None:
    web = tmp_path / "web"
    web.mkdir()
    for name in ("part-00000.parquet", "part-00001.parquet", "part-00003.parquet"):
        shutil.copy(world["web"] / name, web / name)
    write_pairs(web / "part-00002.parquet", web_rows(900, BIG_ROWS))
    same = ExecutionConfig(num_workers=0, progress=False, batch_size=8)  # as the command below: scores depend on padding
    reference = run_filter([web], tmp_path / "reference", world["model"], FilterConfig(threshold=KEEP_ALL, execution=same))

    out = tmp_path / "filter"
    full = _filter_cli(world, web, out, FILE_LIMIT_BYTES)
    assert full.returncode == 1
    assert full.stderr.startswith("error: filter: 1 of 4 input shards did not complete"), full.stderr[-2000:]
    assert f"{web / 'part-00002.parquet'}:" in full.stderr and "File too large" in full.stderr
    folder = out / reference.output.name
    for outcome in ("kept", "rejected", "failed"):
        done = [p.name for p in list_shards(folder / outcome) if read_completion(p) is not None]
        assert done == ["part-00000.parquet", "part-00001.parquet", "part-00003.parquet"]
        for name in done:  # the completed shards are whole and exactly the reference's
            assert pq.read_table(folder / outcome / name).equals(pq.read_table(reference.output / outcome / name))
        assert read_completion(folder / outcome / "part-00002.parquet") is None

    rerun = _filter_cli(world, web, out, None)  # space freed
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert '"skipped": 3' in rerun.stdout
    got, want = _tables(folder), _tables(reference.output)
    assert got.keys() == want.keys() and all(got[name].equals(want[name]) for name in want)
    assert not list(folder.rglob("*.tmp"))


def test_a_folder_in_place_of_a_shard_fails_that_shard_only(world: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "caption"
    blocked = out / world["captions"].name / "part-00002.parquet"  # same settings -> same hash folder
    blocked.mkdir(parents=True)
    with pytest.raises(StageIncompleteError) as info:
        run_caption([world["web"]], out, world["model"], CAPTION)
    assert list(info.value.failures) == [str(world["web"] / "part-00002.parquet")]
    assert "IsADirectoryError" in info.value.failures[str(world["web"] / "part-00002.parquet")]
    folder = info.value.stats.output
    assert folder == blocked.parent
    for name in ("part-00000.parquet", "part-00001.parquet", "part-00003.parquet"):
        record = read_completion(world["captions"] / name)
        assert is_complete(folder / name, record.input_fingerprint, record.settings_hash)
        assert pq.read_table(folder / name).equals(pq.read_table(world["captions"] / name))
    blocked.rmdir()
    stats = run_caption([world["web"]], out, world["model"], CAPTION)
    assert [s.skipped for s in stats.shards] == [True, True, False, True]
    assert pq.read_table(folder / "part-00002.parquet").equals(pq.read_table(world["captions"] / "part-00002.parquet"))


def test_output_under_a_file_is_refused_naming_the_path(world: dict[str, Path], tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the output folder should be")
    with pytest.raises(OSError) as info:
        run_caption([world["web"]], blocker / "caption", world["model"], CAPTION)
    assert str(blocker) in str(info.value)
    assert blocker.read_text().startswith("a file")
