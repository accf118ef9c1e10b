"""The task runner is one setting: shard stages on Dask write exactly what they write on
threads, on ONE cluster per flow run (a LocalCluster the flow starts and closes, or an
existing scheduler the config names, left running), and the workers report their task
runs to the flow's own Prefect API instead of starting temporary servers of their own."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.flows._dask_run import shard_task_runs
from tests.flows.conftest import small_world_config

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
STOP = {"stop_after": "filter"}


def _tables(folder: Path) -> dict[str, list[dict]]:
    return {str(p.relative_to(folder)): pq.read_table(p).to_pylist() for p in sorted(folder.rglob("part-*.parquet"))}


def _assert_same_rows(got: Path, want: Path) -> None:
    """Same shards, same rows, same decisions; ITM scores equal up to float rounding (a Dask
    worker runs torch on `threads_per_worker` threads, the flow process on all cores)."""
    a, b = _tables(got), _tables(want)
    assert len(a) >= 5 and a.keys() == b.keys()
    for name in a:
        assert len(a[name]) == len(b[name]), name
        for x, y in zip(a[name], b[name]):
            sx, sy = x.pop("itm_score", None), y.pop("itm_score", None)
            assert x == y, name
            assert (sx is None) == (sy is None) and (sx is None or abs(sx - sy) < 1e-5), (name, x["key"], sx, sy)


def _rows(summary: dict) -> dict[str, dict]:
    return {r["stage"]: r for r in summary["stages"]}


def _assert_reported(task_runs: dict[str, list[dict]]) -> None:
    """Each shard stage is one task run in the flow's API, completed: what Prefect tracks
    does not grow with the number of shards."""
    for stage in ("caption", "filter"):
        assert task_runs[stage] == [{"name": stage, "state": "COMPLETED"}], task_runs


def test_dask_local_cluster_matches_threads(tmp_path: Path, prefect_harness, random_tiny_model) -> None:
    """One LocalCluster serves caption and filter (the same scheduler, the same workers), each
    worker decoding in a loader process of its own (the workers are not daemonic: a
    daemonic one may have no children); outputs equal the threads run's; each stage is one
    task run in the flow's API."""
    from distributed import Client

    from flows.bootstrap import bootstrap

    threads = bootstrap(config=small_world_config(tmp_path / "threads", random_tiny_model, stages=STOP))
    state = bootstrap(config=small_world_config(tmp_path / "dask", random_tiny_model, stages=STOP, loader_workers=1,
                                                runner={"kind": "dask", "dask_workers": 2}), return_state=True)  # fmt: skip
    dask = state.result()
    for stage in ("caption_dir", "filter_dir"):
        got, want = Path(dask[stage]), Path(threads[stage])
        assert got.name == want.name
        _assert_same_rows(got, want)
    rows = _rows(dask)
    caption, filtered = rows["caption"], rows["filter"]
    assert caption["runner"] == filtered["runner"] == "dask" and caption["shards"] == 5 and caption["input"] == 150
    assert caption["dask_scheduler"] == filtered["dask_scheduler"]  # one cluster for the whole run
    assert caption["dask_workers"] and set(filtered["dask_workers"]) <= set(caption["dask_workers"])
    assert "num_workers 1 (set)" in caption["execution"] and "num_workers 1 (set)" in filtered["execution"]
    _assert_reported(shard_task_runs(state.state_details.flow_run_id))
    with pytest.raises(OSError):  # the run's own cluster is closed when the flow ends
        Client(caption["dask_scheduler"], timeout=2)


def _worker_processes() -> list:
    """Dask worker processes (multiprocessing spawn children) still under this process."""
    import psutil

    procs = psutil.Process().children(recursive=True)
    return [p for p in procs if p.is_running() and any("spawn_main" in part for part in p.cmdline())]


def test_run_cluster_closed_when_a_stage_fails(tmp_path: Path, prefect_harness, random_tiny_model, monkeypatch) -> None:
    """A shard that fails ends the flow in error; the run's LocalCluster is closed all the
    same: its scheduler refuses connections and no worker process is left."""
    from distributed import Client

    from flows.bootstrap import bootstrap
    monkeypatch.setenv("CAPFILT_FAULT", "filter:1")  # the workers start with this environment
    config = small_world_config(tmp_path / "run", random_tiny_model, stages=STOP, runner={"kind": "dask", "dask_workers": 2})
    with pytest.raises(Exception, match="injected fault in filter shard 1"):
        bootstrap(config=config)
    rows = [json.loads(line) for line in (tmp_path / "run" / "stages.jsonl").read_text().splitlines()]
    scheduler = {r["stage"]: r for r in rows}["caption"]["dask_scheduler"]
    with pytest.raises(OSError):
        Client(scheduler, timeout=2)
    assert _worker_processes() == []


def test_existing_cluster_by_address(tmp_path: Path, prefect_harness, random_tiny_model) -> None:
    """`runner.dask_address`: the run's tasks run on the given cluster's workers, and the
    cluster is left running (with all its workers) for the next run."""
    from distributed import Client, LocalCluster

    from flows.bootstrap import bootstrap

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        address = cluster.scheduler_address
        with Client(address) as client:
            workers = set(client.scheduler_info()["workers"])
            config = small_world_config(tmp_path / "run", random_tiny_model, stages=STOP,
                                        runner={"kind": "dask", "dask_address": address})  # fmt: skip
            state = bootstrap(config=config, return_state=True)
            rows = _rows(state.result())
            for stage in ("caption", "filter"):
                assert rows[stage]["dask_scheduler"] == address
                assert rows[stage]["dask_workers"] and set(rows[stage]["dask_workers"]) <= workers
            _assert_reported(shard_task_runs(state.state_details.flow_run_id))
            assert set(client.scheduler_info()["workers"]) == workers  # still up, the same workers
            assert client.submit(sum, [1, 2, 3]).result() == 6


def test_dask_run_on_its_own_temporary_server(tmp_path: Path, random_tiny_model) -> None:
    """As a new user runs it (no PREFECT_API_URL): one temporary Prefect server for the
    whole run (the flow's; none per worker), each shard stage's task run reported to it, and a
    clean log: no traceback, no CommClosedError, no closed stream."""
    config = small_world_config(tmp_path / "run", random_tiny_model, stages=STOP, runner={"kind": "dask", "dask_workers": 2})
    config_path, out_path = tmp_path / "config.json", tmp_path / "out.json"
    config_path.write_text(config.model_dump_json())
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PYTHONPATH=str(ROOT), PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180", NO_ALBUMENTATIONS_UPDATE="1",
               PREFECT_LOGGING_LEVEL="INFO")  # its server's start line is counted (a CLI test may have quieted it in os.environ)
    done = subprocess.run([sys.executable, str(ROOT / "tests/flows/_dask_run.py"), str(config_path), str(out_path)],
                          env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    assert log.count("Starting temporary server") == 1, log[-4000:]
    for bad in ("Traceback", "CommClosedError", "Stream is closed"):
        at = log.find(bad)
        assert at < 0, log[max(0, at - 1500):at + 3000]
    result = json.loads(out_path.read_text())
    _assert_reported(result["task_runs"])
    rows = _rows(result["summary"])
    assert rows["caption"]["dask_scheduler"] == rows["filter"]["dask_scheduler"]


def test_ctrl_c_leaves_no_cluster_behind(tmp_path: Path, random_tiny_model) -> None:
    """Ctrl-C in `capfilt run` (SIGINT to the terminal's process group) during the caption
    stage on Dask: exit 130 with the resume hint, and no worker, nanny or server process
    of the run is left running."""
    import signal
    import time

    import psutil
    import yaml

    config = small_world_config(tmp_path / "run", random_tiny_model, stages=STOP, runner={"kind": "dask", "dask_workers": 2},
                                data={"world": {"n_human": 60, "n_web": 900, "n_test": 20, "shard_rows": 30}, "serve_local": False})  # fmt: skip
    config_path = tmp_path / "run.yaml"
    config_path.write_text(yaml.safe_dump(json.loads(config.model_dump_json())))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PYTHONPATH=str(ROOT), PREFECT_HOME=str(tmp_path / "prefect-home"))
    log_path = tmp_path / "log.txt"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "flows.entry", "run", "--verbose", "--config", str(config_path)], env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not re.search(r"^caption: .* [1-9]\d*/30 ", log_path.read_text(), re.M):  # shards done: the stage is under way
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.2)
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len([c for c in children if "spawn_main" in " ".join(c.cmdline())]) >= 2  # the workers
        os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
        assert proc.wait(timeout=60) == 130
        _, alive = psutil.wait_procs(children, timeout=30)
        assert alive == [], [" ".join(p.cmdline())[:120] for p in alive]
        assert "interrupted" in log_path.read_text()
    finally:  # whatever happened, nothing this test started stays (the group outlives its leader)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
