"""Shard stages on a Dask cluster of machines that share no disk: a `dask scheduler` and two
`dask worker` processes started on their own, each with its own temporary, model-cache and
working folders; the run folder and the models reachable only through S3 (a moto server
on 127.0.0.1). One worker dies by SIGKILL in the middle of the caption stage (a lost
machine): its share is run again on the other, which skips the shards already complete,
and the outputs equal a threads run's, every shard once."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import s3_env

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SHARDS, ROWS = 12, 3


def _upload(local: Path, target) -> None:
    for path in sorted(local.rglob("*")):
        if path.is_file():
            (target / path.relative_to(local).as_posix()).upload(path)


def _config(run_dir: str, web: str, model: str, **runner):
    from flows.config import load_config

    return load_config({
        "run_dir": run_dir, "device": "cpu", "loader_workers": 1,
        "data": {"web": [web]}, "model": {"filter": model, "captioner": model},
        "caption": {"max_length": 8}, "stages": {"stop_after": "filter"}, "runner": runner,
    })  # fmt: skip


def _machine(tmp: Path, name: str, endpoint: str, **env: str) -> dict[str, str]:
    """The environment of one 'machine': its own temporary, cache and working folders (short
    paths: the image loader's processes talk over AF_UNIX sockets under TMPDIR)."""
    home = tmp / name
    for sub in ("tmp", "cache", "work"):
        (home / sub).mkdir(parents=True, exist_ok=True)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "CAPFILT_"))}
    return {**base, **s3_env(endpoint), "PYTHONPATH": str(ROOT), "TMPDIR": str(home / "tmp"),
            "CAPFILT_MODEL_CACHE": str(home / "cache"), "CAPFILT_WORK_DIR": str(home / "work"),
            "OMP_NUM_THREADS": "1", "NO_ALBUMENTATIONS_UPDATE": "1", **env}  # fmt: skip


@contextlib.contextmanager
def _cluster(tmp: Path, endpoint: str) -> Iterator[tuple[str, list[subprocess.Popen], dict[str, str]]]:
    """A scheduler and two no-nanny workers, each in its own process group; the first worker
    dies by SIGKILL at caption shard 6 or 7 (the fourth shard of whichever half it runs)."""
    dask = str(Path(sys.executable).with_name("dask"))
    scheduler_file = tmp / "scheduler.json"
    procs = [subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", "0", "--dashboard-address", ":0",
                               "--scheduler-file", str(scheduler_file)], env=_machine(tmp, "scheduler", endpoint),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)]  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not scheduler_file.is_file():
            assert time.monotonic() < deadline and procs[0].poll() is None, "the scheduler did not start"
            time.sleep(0.2)
        for name, fault in (("doomed", "caption:6:sigkill,caption:7:sigkill"), ("steady", "")):
            env = _machine(tmp, name, endpoint, CAPFILT_FAULT=fault)
            procs.append(subprocess.Popen([dask, "worker", "--scheduler-file", str(scheduler_file), "--nthreads", "1",
                                           "--no-nanny", "--name", name, "--local-directory", str(tmp / name / "tmp")],
                                          env=env, cwd=tmp / name, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                          start_new_session=True))  # fmt: skip
        address = json.loads(scheduler_file.read_text())["address"]
        from distributed import Client

        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=180)
            names = {info["name"]: worker for worker, info in client.scheduler_info()["workers"].items()}
        yield address, procs, names
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def _tables(folder) -> dict[str, list[dict]]:
    return {p.relative_to(folder).as_posix(): pq.read_table(p.open("rb")).to_pylist() for p in sorted(folder.rglob("part-*.parquet"))}


def _same_rows(got, want) -> None:
    """Same shards, rows and decisions; ITM scores equal up to float rounding."""
    a, b = _tables(got), _tables(want)
    assert a.keys() == b.keys() and len(a) >= SHARDS
    for name in a:
        assert len(a[name]) == len(b[name]), name
        for x, y in zip(a[name], b[name]):
            sx, sy = x.pop("itm_score", None), y.pop("itm_score", None)
            assert x == y, name
            assert (sx is None) == (sy is None) and (sx is None or abs(sx - sy) < 1e-5), (name, x["key"])


def test_a_lost_worker_loses_nothing(s3: str, s3_server: str, tmp_path: Path, prefect_harness, monkeypatch) -> None:
    from stage_helpers import tiny_model, web_shards

    from data.storage import location
    from flows.bootstrap import WORK_DIR_ENV, bootstrap

    web_shards(tmp_path / "web", (ROWS,) * SHARDS, failed=(1,))
    bucket = location(s3)
    _upload(tmp_path / "web", bucket / "web")
    _upload(tiny_model(tmp_path / "model"), bucket / "models" / "tiny")
    web, model = f"{s3}/web", f"{s3}/models/tiny"
    monkeypatch.setenv("CAPFILT_MODEL_CACHE", str(tmp_path / "flow-cache"))
    monkeypatch.setenv(WORK_DIR_ENV, str(tmp_path / "flow-work"))

    threads = bootstrap(config=_config(f"{s3}/run-threads", web, model))
    machines = Path(tempfile.mkdtemp(prefix="cf-", dir="/tmp"))  # short: see `_machine`
    try:
        with _cluster(machines, s3_server) as (address, procs, names):
            dask = bootstrap(config=_config(f"{s3}/run-dask", web, model, kind="dask", dask_address=address))
            doomed, steady = procs[1], procs[2]
            assert doomed.wait(timeout=60) == -signal.SIGKILL and steady.poll() is None  # one machine lost, one left
    finally:
        shutil.rmtree(machines, ignore_errors=True)
    for stage in ("caption_dir", "filter_dir"):
        assert location(dask[stage]).name == location(threads[stage]).name
        _same_rows(location(dask[stage]), location(threads[stage]))
    rows = {r["stage"]: r for r in dask["stages"]}
    for stage, total in (("caption", SHARDS * ROWS), ("filter", None)):
        row = rows[stage]
        assert row["shards"] == SHARDS and row["input"] == (total or row["input"]) and row["failed"] >= 1
        assert row["kept"] + row["rejected"] + row["failed"] == row["input"]
    assert rows["filter"]["input"] == SHARDS * ROWS + rows["caption"]["kept"]  # web + one synthetic per captioned image
    # each caption shard has one record, written once: the survivor skipped what the lost worker had finished
    caption = location(dask["caption_dir"])
    records = sorted(p.name for p in caption.glob("*.done.json"))
    assert len(records) == SHARDS
    assert rows["caption"]["dask_workers"] == [names["steady"]]  # the lost worker returned nothing
