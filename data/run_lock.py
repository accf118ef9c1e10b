"""One writer per run folder: an advisory `flock` on `<run>/.lock`, or on object storage
a lease object at the same place (`data.lease`).

Local folders: the kernel drops a `flock` when its process dies, however it dies
(SIGKILL included), so a crashed run never holds the folder; the file's text (pid,
host, start time) is only there to make the refusal message useful.

A run folder that is a URL (``s3://bucket/run``) has no flock: `run_lock` takes a lease
there instead (owner, expiry, renewed while held; see `data.lease` for what each store
guarantees). Either way a second writer is refused with an error naming the holder.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from data.lease import LOCK_NAME, RunLockedError, hold_lease, holder_record
from data.storage import Location, RemotePath, location

__all__ = ["LOCK_NAME", "RunLockedError", "ensure_free", "lock_scope", "run_lock"]


@contextmanager
def run_lock(run_dir: str | Path | RemotePath) -> Iterator[Location]:
    """Hold the run folder's lock for the `with` block; refuse at once if another process holds it."""
    run_dir = location(run_dir)
    if isinstance(run_dir, RemotePath):
        with hold_lease(run_dir / LOCK_NAME):
            yield run_dir / LOCK_NAME
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            raise RunLockedError(
                f"{run_dir} is in use by another capfilt process ({holder}); wait for it to finish "
                f"or stop it. The lock frees itself when that process exits."
            ) from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        yield path
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def lock_scope(output: str | Path | RemotePath) -> Location:
    """The folder whose lock a writer of `output` must hold: the nearest folder at or above
    `output` that is a run folder (it has a `.lock` written by `run_lock`, as every flow
    run leaves), else `output` itself. So a standalone stage writing inside a run folder
    and a flow running on that folder hold the same lock and exclude each other."""
    output = location(output).resolve()
    for folder in (output, *output.parents):
        if _written_by_run_lock(folder / LOCK_NAME):
            return folder
    return output


def _written_by_run_lock(path: Location) -> bool:
    """True for a lock file holding our holder record (other tools' `.lock` files, such as
    pytest's, are not run folders)."""
    try:
        return _holder(path.read_bytes()[:4096]) is not None
    except OSError:
        return False


def _read_holder(fd: int) -> str:
    info = _holder(os.pread(fd, 4096, 0))
    return f"pid {info['pid']} on {info['host']} since {info['since']}" if info else "holder unknown"


def _holder(raw: bytes) -> dict | None:
    """The holder record `run_lock` writes ({pid, host, since}), or None for anything else."""
    return holder_record(raw)


def ensure_free(run_dir: str | Path | RemotePath) -> None:
    """Refuse at once (`RunLockedError`, naming the holder) when another process is writing
    `run_dir`; nothing is held afterwards. A check before a slow start-up (Prefect's
    temporary server), so a second run is turned away in a moment; the run then takes the
    lock itself."""
    with run_lock(run_dir):
        pass
