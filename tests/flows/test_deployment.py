"""End to end through a real Prefect server: serve the demo deployment, trigger it with
`prefect deployment run`; the run fails partway on an injected fault, the fault is
fixed, `prefect flow-run retry` resumes it to Completed without touching what had
finished; every process this test starts is stopped at the end."""

from __future__ import annotations

import json
import os
import re
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


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime_ns) of the stage outputs (shards, records, model weights)."""
    out = {}
    for path in root.rglob("*"):
        if path.is_file() and path.suffix in (".parquet", ".json", ".safetensors") and ".prefect" not in path.parts \
                and path.name != "current.json":  # the run's record of what it used, written by every run
            out[str(path.relative_to(root))] = (path.stat().st_ino, path.stat().st_mtime_ns)
    return out


def test_served_demo_deployment_fails_then_retry_completes(tmp_path: Path) -> None:
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    fault = tmp_path / "fault.txt"
    fault.write_text("filter:1")
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "NO_ALBUMENTATIONS_UPDATE": "1",
           "TOKENIZERS_PARALLELISM": "false", "CAPFILT_FAULT_FILE": str(fault)}  # fmt: skip
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
        assert "Failed" in output and result.returncode != 0, f"{output[-3000:]}\n{serve_log.read_text()[-5000:]}"
        flow_run = re.search(r"UUID: ([0-9a-f-]{36})", output)
        assert flow_run, output[-3000:]
        before = _snapshot(run_dir)
        assert any(k.endswith("kept/part-00000.parquet") for k in before)
        assert not any(k.endswith("kept/part-00001.parquet") for k in before)

        fault.unlink()  # the fix; then retry the same failed flow run
        retry = subprocess.run([str(BIN / "prefect"), "flow-run", "retry", flow_run.group(1)], env=env,
                               capture_output=True, text=True, timeout=120)  # fmt: skip
        assert retry.returncode == 0, retry.stdout + retry.stderr
        deadline, state = time.monotonic() + RUN_TIMEOUT_S, "SCHEDULED"
        while state not in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") and time.monotonic() < deadline:
            time.sleep(2)
            inspect = subprocess.run([str(BIN / "prefect"), "flow-run", "inspect", flow_run.group(1), "-o", "json"],
                                     env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
            state = json.loads(inspect.stdout)["state"]["type"]
        output = retry.stdout + retry.stderr
        assert state == "COMPLETED", f"{state}\n{output[-3000:]}\n--- serve log ---\n{serve_log.read_text()[-5000:]}"
    finally:
        for proc in reversed(procs):
            _stop(proc)
    assert (run_dir / "report.md").is_file() and (run_dir / "eval" / "metrics.json").is_file()
    assert list((run_dir / "ingest" / "web").glob("part-*.parquet")), "web images came through img2dataset"
    assert list((run_dir / "assemble").glob("*/part-*.parquet"))
    assert all(proc.poll() is not None for proc in procs)
    after = _snapshot(run_dir)
    changed = sorted(k for k, v in before.items() if after.get(k) != v and not k.startswith("eval"))
    assert changed == [], f"the retry rewrote finished outputs: {changed}"
    assert any(k.endswith("kept/part-00001.parquet") for k in after)
