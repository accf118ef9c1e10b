"""End to end through a real Prefect server: serve the demo deployment, trigger it with
`prefect deployment run`, wait for Completed, check the run folder; every process this
test starts is stopped at the end."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SERVER_START_S = 120
RUN_TIMEOUT_S = 600


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"prefect server exited early:\n{log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"prefect server not healthy after {SERVER_START_S} s:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen) -> None:
    """Stop a process group this test started: SIGTERM, then SIGKILL."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=20)


def test_served_demo_deployment_runs_to_completed(tmp_path: Path) -> None:
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "NO_ALBUMENTATIONS_UPDATE": "1",
           "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    run_dir = tmp_path / "run"
    config = {"preset": "demo-quick", "run_dir": str(run_dir),
              "data": {"world": {"n_human": 80, "n_web": 80, "n_test": 20, "shard_rows": 40}},
              "train": {"pretrain": {"steps": 4}, "finetune_filter": {"steps": 2},
                        "finetune_captioner": {"steps": 2}, "final": {"steps": 4}}}  # fmt: skip
    procs: list[subprocess.Popen] = []
    try:
        server_log = tmp_path / "server.log"
        procs.append(subprocess.Popen(
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env, stdout=server_log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
        ))  # fmt: skip
        _wait_healthy(api, procs[0], server_log)
        serve_log = tmp_path / "serve.log"
        procs.append(subprocess.Popen(
            [str(BIN / "capfilt"), "serve", "--quick"], cwd=ROOT, env=env,
            stdout=serve_log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
        ))  # fmt: skip
        command = [str(BIN / "prefect"), "deployment", "run", "capfilt-bootstrap/demo",
                   "--params", json.dumps({"config": config}), "--watch", "--watch-interval", "2",
                   "--watch-timeout", str(RUN_TIMEOUT_S)]  # fmt: skip
        deadline = time.monotonic() + SERVER_START_S
        while True:  # the deployment exists once `capfilt serve` has registered it
            result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S + 60)
            if "not found" not in (result.stdout + result.stderr).lower() or time.monotonic() > deadline:
                break
            assert procs[1].poll() is None, f"capfilt serve exited:\n{serve_log.read_text()[-3000:]}"
            time.sleep(1)
        output = result.stdout + result.stderr
        assert "Completed" in output, f"{output[-3000:]}\n--- serve log ---\n{serve_log.read_text()[-5000:]}"
        assert result.returncode == 0
    finally:
        for proc in reversed(procs):
            _stop(proc)
    assert (run_dir / "report.md").is_file() and (run_dir / "eval" / "metrics.json").is_file()
    assert list((run_dir / "ingest" / "web").glob("part-*.parquet")), "web images came through img2dataset"
    assert list((run_dir / "assemble").glob("*/part-*.parquet"))
    assert all(proc.poll() is not None for proc in procs)
