"""SIGKILL a real `capfilt caption` / `capfilt filter` process mid-stage, twice, rerun it,
and compare with an uninterrupted run: the same rows, captions and scores, no duplicates,
no temporary files left, and the resumed runs really skipped finished shards."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest
from stage_helpers import tiny_model, web_shards

from data.shards import list_shards, read_completion, read_table
from tasks.caption import CaptionConfig, run_caption
from tasks.execution import ExecutionConfig

ROOT = Path(__file__).resolve().parents[2]
SHARDS = 8
POLL_S = 0.005
START_TIMEOUT_S = 120
CAPTION_ARGS = ["--max-length", "14", "--min-length", "3", "--num-captions", "2"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("kill")
    model = tiny_model(root / "model")
    (root / "web").mkdir()
    web_shards(root / "web", (8,) * SHARDS, failed=(2,), garbage=(5,))
    captions = run_caption(
        [root / "web"], root / "caption-src", model,
        CaptionConfig(max_length=14, min_length=3, execution=ExecutionConfig(num_workers=0, progress=False)),
    )
    return {"root": root, "model": model, "web": root / "web", "captions": captions.output}


def _command(stage: str, world: dict[str, Path], out: Path) -> list[str]:
    base = [sys.executable, "-m", "flows.commands.stages", stage, "--model", str(world["model"]),
            "--input", str(world["web"]), "--output", str(out), "--batch-size", "3", "--workers", "1", "--no-progress"]
    if stage == "caption":
        return base + CAPTION_ARGS
    return base + ["--captions", str(world["captions"])]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _done(out: Path) -> int:
    return sum(1 for _ in out.rglob("*.done.json"))


def _run(cmd: list[str]) -> dict:
    result = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=START_TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)


def _run_and_kill(cmd: list[str], out: Path, after_done: int) -> int:
    """Start the stage, SIGKILL its process group once `after_done` records exist; records then."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while _done(out) < after_done and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(POLL_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return _done(out)


def _snapshot(folder: Path) -> dict[str, tuple[pa.Table, dict]]:
    kind = "pairs" if (folder / "stage.json").is_file() and not (folder / "kept").exists() else "scored"
    subfolders = [folder] if kind == "pairs" else [folder / o for o in ("kept", "rejected", "failed")]
    return {
        str(p.relative_to(folder)): (read_table(p, kind), read_completion(p).counts)
        for sub in subfolders
        for p in list_shards(sub)
    }


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["caption", "filter"])
def test_sigkill_and_rerun_is_exact(tmp_path: Path, world: dict[str, Path], stage: str) -> None:
    reference = _run(_command(stage, world, tmp_path / "reference"))
    out = tmp_path / "killed"
    records_per_shard = 1 if stage == "caption" else 3
    first = _run_and_kill(_command(stage, world, out), out, after_done=1)
    second = _run_and_kill(_command(stage, world, out), out, after_done=first + 2 * records_per_shard)
    assert second < SHARDS * records_per_shard, "the stage finished before it could be killed; make it longer"
    resumed = _run(_command(stage, world, out))
    assert resumed["skipped"] >= 1 and resumed["output"].endswith(reference["settings_hash"])
    assert resumed["totals"] == reference["totals"]
    expected = _snapshot(Path(reference["output"]))
    got = _snapshot(Path(resumed["output"]))
    assert got.keys() == expected.keys() and len(got) == SHARDS * records_per_shard
    for name, (table, counts) in expected.items():
        assert got[name][0].equals(table), name
        assert got[name][1] == counts
        assert counts["kept"] + counts["rejected"] + counts["failed"] == counts["input"]
    keys = [k for table, _ in got.values() for k in table.column("key").to_pylist()]
    assert len(keys) == len(set(keys))
    assert not list(out.rglob("*.tmp"))
