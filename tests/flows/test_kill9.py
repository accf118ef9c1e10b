"""`kill -9` of a capfilt command leaves nothing running (issue 23): its guardian
(`flows.interrupt.start_guardian`) stops the children a SIGKILL orphans, Prefect's
temporary server first among them (before, it ran on for minutes)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

ENV = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "NO_ALBUMENTATIONS_UPDATE": "1"}
WAIT_S = 900  # generous: Prefect's server starts in ~10 s idle, far slower on a loaded machine


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _server(command: psutil.Process) -> psutil.Process | None:
    """The command's Prefect temporary server (uvicorn serving prefect.server), once started."""
    try:
        children = command.children(recursive=True)
    except psutil.NoSuchProcess:
        return None
    for child in children:
        try:
            if "prefect.server.api.server:create_app" in " ".join(child.cmdline()):
                return child
        except psutil.Error:
            continue
    return None


@pytest.mark.slow
def test_kill_9_of_capfilt_demo_stops_prefects_server_and_every_child(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "flows.entry", "demo", "--quick", "--out", str(tmp_path / "demo")],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    command = psutil.Process(proc.pid)
    try:
        deadline = time.monotonic() + WAIT_S
        while _server(command) is None:
            assert proc.poll() is None and time.monotonic() < deadline, "the demo ended before Prefect's server started"
            time.sleep(0.2)
        time.sleep(1.5)  # the guardian notes the command's descendants every half second
        children = command.children(recursive=True)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 60  # the guardian: SIGTERM, then SIGKILL 3 s later
        while any(map(_alive, children)) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = [" ".join(c.cmdline()[:4]) for c in children if _alive(c)]
        assert not left, f"still running after kill -9 of capfilt demo: {left}"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# A command that starts its guardian, then a child that would run for 5 minutes.
_GUARDED = """
import subprocess, sys, time
from flows.interrupt import start_guardian
start_guardian()
child = subprocess.Popen(["sleep", "300"])
print(child.pid, flush=True)
time.sleep(300)
"""


def test_the_guardian_stops_the_children_of_a_killed_process() -> None:
    proc = subprocess.Popen([sys.executable, "-c", _GUARDED], stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        child = psutil.Process(int(proc.stdout.readline()))
        time.sleep(1.5)  # the guardian notes descendants every half second
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        child.wait(timeout=60)  # psutil.TimeoutExpired if the orphan lives on
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
