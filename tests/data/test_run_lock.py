import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from data.run_lock import RunLockedError, lock_scope, run_lock

HOLD = """
import sys, time
from data.run_lock import run_lock
with run_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(60)
"""


def _hold_in_subprocess(run_dir: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def test_second_writer_is_refused_with_the_holder_named(tmp_path: Path) -> None:
    proc = _hold_in_subprocess(tmp_path)
    try:
        with pytest.raises(RunLockedError, match=f"pid {proc.pid}"):
            with run_lock(tmp_path):
                pass
    finally:
        proc.kill()
        proc.wait()


def test_a_killed_holder_does_not_keep_the_lock(tmp_path: Path) -> None:
    proc = _hold_in_subprocess(tmp_path)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with run_lock(tmp_path) as path:
        assert str(os.getpid()) in path.read_text()


def test_lock_can_be_taken_again_after_release(tmp_path: Path) -> None:
    with run_lock(tmp_path):
        pass
    with run_lock(tmp_path) as path:
        assert path.exists()


def test_a_writer_inside_a_run_folder_takes_the_run_folders_lock(tmp_path: Path) -> None:
    run = tmp_path / "run"
    output = run / "caption" / "mine"
    assert lock_scope(output) == output.resolve()  # no run folder yet: the output's own lock
    with run_lock(run):  # what a flow run does; it leaves run/.lock behind
        pass
    assert lock_scope(output) == run.resolve()
    proc = _hold_in_subprocess(run)  # a flow is running on the folder
    try:
        with pytest.raises(RunLockedError, match=f"pid {proc.pid}"):
            with run_lock(lock_scope(output)):
                pass
    finally:
        proc.kill()
        proc.wait()
