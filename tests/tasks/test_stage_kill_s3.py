"""SIGKILL a real `capfilt caption` whose inputs, model and output are on S3 (a moto server
on 127.0.0.1) mid-stage, rerun it: the dead holder's lease refuses the rerun by name
until it expires, then the rerun skips the finished shards and the output equals an
uninterrupted run's byte for byte."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from stage_helpers import tiny_model, web_shards

from data.run_lock import RunLockedError, run_lock
from data.shards import DONE_SUFFIX, list_shards
from data.storage import list_files, location

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
SHARDS = 8
LEASE_S = 3


def _upload(local: Path, target) -> None:
    for path in sorted(local.rglob("*")):
        if path.is_file():
            (target / path.relative_to(local).as_posix()).upload(path)


def _command(web: str, model: str, out: str) -> list[str]:
    return [sys.executable, "-m", "flows.commands.stages", "caption", "--model", model, "--input", web, "--output", out,
            "--batch-size", "3", "--workers", "0", "--no-progress", "--max-length", "14", "--min-length", "3",
            "--num-captions", "2"]  # fmt: skip


def _env(tmp: Path) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "CAPFILT_LEASE_SECONDS": str(LEASE_S),
            "CAPFILT_MODEL_CACHE": str(tmp / "cache")}  # fmt: skip


def _run(cmd: list[str], tmp: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=_env(tmp), capture_output=True, text=True, timeout=180)


def _records(out: str) -> int:
    return len(list_files(location(out), f"**/*{DONE_SUFFIX}"))


def test_sigkilled_caption_on_s3_reruns_to_the_same_bytes(s3: str, tmp_path: Path) -> None:
    web_shards(tmp_path / "web", (8,) * SHARDS, failed=(2,), garbage=(5,))
    tiny_model(tmp_path / "model")
    bucket = location(s3)
    _upload(tmp_path / "web", bucket / "web")
    _upload(tmp_path / "model", bucket / "model")
    web, model, out = f"{s3}/web", f"{s3}/model", f"{s3}/run/caption"

    reference = _run(_command(str(tmp_path / "web"), str(tmp_path / "model"), str(tmp_path / "reference")), tmp_path)
    assert reference.returncode == 0, reference.stderr[-2000:]
    expected = json.loads(reference.stdout)

    proc = subprocess.Popen(_command(web, model, out), cwd=ROOT, env=_env(tmp_path), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 180
    try:
        while _records(out) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done = _records(out)
    assert 1 <= done < SHARDS, "the stage finished before it could be killed; make it longer"

    with pytest.raises(RunLockedError, match=f"pid {proc.pid}"):  # the dead holder's lease is still live
        with run_lock(out):
            pass
    time.sleep(LEASE_S + 0.5)  # then it expires and the rerun takes it over
    resumed = _run(_command(web, model, out), tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    got = json.loads(resumed.stdout)
    assert got["skipped"] >= done and got["settings_hash"] == expected["settings_hash"]
    assert got["totals"] == expected["totals"]
    ours = {p.name: p.read_bytes() for p in list_shards(location(got["output"]))}
    theirs = {p.name: p.read_bytes() for p in list_shards(Path(expected["output"]))}
    assert ours == theirs and len(ours) == SHARDS
