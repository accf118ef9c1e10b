"""`capfilt demo/run` keep Prefect's INFO lines out of the way of the progress unless --verbose."""

from __future__ import annotations

import json

import pytest

from flows.commands.run import _offline_env


@pytest.mark.parametrize(("verbose", "level"), [(False, "WARNING"), (True, None)])
def test_prefect_logs_warnings_only_unless_verbose(monkeypatch, verbose: bool, level: str | None) -> None:
    monkeypatch.delenv("PREFECT_LOGGING_LEVEL", raising=False)
    _offline_env(verbose)
    import os

    assert os.environ.get("PREFECT_LOGGING_LEVEL") == level
    monkeypatch.delenv("PREFECT_LOGGING_LEVEL", raising=False)


def test_an_explicit_level_wins(monkeypatch) -> None:
    monkeypatch.setenv("PREFECT_LOGGING_LEVEL", "DEBUG")
    _offline_env(False)
    import os

    assert os.environ["PREFECT_LOGGING_LEVEL"] == "DEBUG"


def test_a_dask_run_keeps_distributed_info_lines_out_unless_verbose(monkeypatch) -> None:
    import os

    monkeypatch.delenv("DASK_LOGGING__DISTRIBUTED", raising=False)
    _offline_env(False)
    assert os.environ["DASK_LOGGING__DISTRIBUTED"] == "warning"  # read by Dask at import, workers inherit it
    monkeypatch.delenv("DASK_LOGGING__DISTRIBUTED", raising=False)
    _offline_env(True)
    assert "DASK_LOGGING__DISTRIBUTED" not in os.environ


def _capfilt(*args: str, cwd=None):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "flows.entry", *args], capture_output=True, text=True, timeout=1800,
                          cwd=cwd)  # fmt: skip


@pytest.mark.slow
def test_the_shipped_preset_runs_here_on_dask_with_one_line_per_stage_start(tmp_path, random_tiny_model) -> None:
    """`--config capfilt-on-img2dataset` (a preset's name) as shipped, only its paths pointed
    here, on this CPU machine (`device: auto`), with its Dask runner of 4 workers (loader
    processes inside Dask workers: `test_dask.py::test_dask_local_cluster_matches_threads`):
    it finishes, says at once that it starts, prints each stage's start and end, but none of
    Dask's ~60 `distributed` INFO lines."""
    from data.synth import SynthConfig, generate_world

    generate_world(tmp_path / "world", SynthConfig(human_images=4, web_images=12, test_images=2, rows_per_shard=6))
    done = _capfilt("run", "--config", "capfilt-on-img2dataset", "--run-dir", str(tmp_path / "run"),
                    "--set", f"data.web=[{tmp_path / 'world' / 'web'}]", "--set", f"model.captioner={random_tiny_model}",
                    "--set", f"model.filter={random_tiny_model}")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stderr.splitlines()
    assert lines[0].startswith(f"capfilt run: starting the run in {tmp_path / 'run'}"), lines[:3]
    assert "caption: started (2 shard)" in lines and "filter: started (2 shard)" in lines, lines
    assert any(line.startswith("filter: 100% 2/2 ") for line in lines), lines
    rows = {r["stage"]: r for r in json.loads(done.stdout)["stages"]}
    assert rows["caption"]["runner"] == rows["filter"]["runner"] == "dask" and len(rows["caption"]["dask_workers"]) >= 1
    assert not [line for line in lines if "distributed." in line], done.stderr[-3000:]
    assert json.loads(done.stdout)["stages"] and list((tmp_path / "run" / "filter").glob("*/kept/part-*.parquet"))


@pytest.mark.slow
def test_demo_says_it_starts_before_anything_else_when_stderr_is_a_file(tmp_path) -> None:
    """Piped or logged, `capfilt demo` used to print nothing for its first minute (Prefect's
    server, the world, img2dataset); its first line now says it started and where."""
    import os
    import signal
    import subprocess
    import sys
    import time

    log = tmp_path / "stderr.log"
    with log.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "flows.entry", "demo", "--quick", "--out", str(tmp_path / "demo")],
                                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)  # fmt: skip
        try:
            while not log.read_text().strip() and proc.poll() is None:
                time.sleep(0.2)
        finally:
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the demo stops its children and exits 130
            proc.wait(timeout=600)
    first = log.read_text().splitlines()[0]
    assert first.startswith(f"capfilt demo: starting the run in {tmp_path / 'demo'}"), log.read_text()[-2000:]
