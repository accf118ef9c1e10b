"""Ctrl-C ends a capfilt command at once, at any moment; finished work stays and a rerun resumes it.

Left to Python and Prefect, a SIGINT from the terminal stops the temporary API server (it
shares the terminal's process group) but not the flow's worker threads, which go on
training and filtering for minutes while every API call fails; and a SIGINT that lands
while the main thread waits inside C code (a lock, a socket, a long tensor op) is only
noticed when that call returns. Every stage writes atomically and records completion last,
so ending the process outright is exactly the SIGKILL that the kill-and-rerun tests cover:
the rerun skips what finished and redoes the rest.

`install` (called first thing by the `capfilt` entry point, before the heavy imports) makes
the first SIGINT do three things, wherever the process is:

1. print one line on stderr: interrupted, and the command that resumes;
2. stop every process this one started (Prefect's temporary server, DataLoader and Dask
   workers, torchrun ranks): SIGTERM, then SIGKILL for any still alive after a grace period;
3. end the process with exit status 130 (128 + SIGINT, what shells report for Ctrl-C).

It is noticed twice over: by the Python-level handler (main thread, between bytecodes) and by
a watcher thread reading the signal wake-up pipe, which the C-level handler writes at once
even while the main thread is blocked; whichever comes first acts.

A SIGKILL (`kill -9`, the OOM killer) runs no handler: the children would be orphaned and go
on (Prefect's temporary server for minutes, Dask workers, img2dataset). `start_guardian`
forks, before anything else starts, a small process that notes this one's descendants every
half second and, once this one is gone, stops the ones it last saw (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType

INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, what shells report for Ctrl-C
CHILD_GRACE_S = 3.0  # how long children get to exit on SIGTERM before SIGKILL
GUARD_EVERY_S = 0.5  # how often the guardian notes the command's descendants

_stopping = threading.Lock()  # taken once, by whichever path notices the signal first; never released


def install(resume_command: str | None) -> None:
    """From now on the first SIGINT stops this process and its children (exit 130).

    `resume_command` is printed as the way to resume; None for commands with nothing to
    resume (queries). Call from the main thread; elsewhere this does nothing (only the main
    thread may install signal handlers).
    """
    if threading.current_thread() is not threading.main_thread():
        return
    message = "\ncapfilt: interrupted."
    if resume_command:
        message += f" Finished shards, checkpoints and models are kept; resume with: {resume_command}"

    def stop() -> None:
        _stopping.acquire()  # a second caller waits here until the first ends the process
        try:
            os.write(2, (message + "\n").encode())
            stop_children()
        finally:
            os._exit(INTERRUPTED_EXIT_CODE)

    def handler(signum: int, frame: FrameType | None) -> None:
        stop()

    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    signal.signal(signal.SIGINT, handler)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    threading.Thread(target=_watch, args=(read_fd, stop), name="capfilt-interrupt", daemon=True).start()


def _watch(read_fd: int, stop: Callable[[], None]) -> None:
    """Block on the wake-up pipe; the C-level handler writes each signal's number there."""
    while True:
        data = os.read(read_fd, 64)
        if not data:
            return
        if signal.SIGINT in data:  # bytes: each item is one signal number
            stop()


def stop_children(grace_s: float = CHILD_GRACE_S) -> None:
    """SIGTERM every descendant of this process, then SIGKILL those still alive after `grace_s`."""
    import psutil

    try:
        children = psutil.Process().children(recursive=True)
    except psutil.Error:
        return
    _stop(children, grace_s)


def start_guardian() -> int | None:
    """Fork the guardian of this process's children (see the module doc); returns its pid (None
    where there is no fork). Call before any thread starts. The guardian ignores Ctrl-C (the
    command handles it), holds none of the command's pipes, and exits with the command."""
    if not hasattr(os, "fork"):
        return None
    import psutil  # noqa: F401  (imported before the fork: the guardian imports nothing)

    command = os.getpid()
    pid = os.fork()
    if pid:
        return pid
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        _guard(command)
    finally:
        os._exit(0)


def _guard(command: int) -> None:
    """Note `command`'s descendants until it is gone (this process is then re-parented), then
    stop the ones last seen. psutil checks each one's start time, so a reused pid is spared."""
    import psutil

    me, seen = os.getpid(), []
    while os.getppid() == command:
        try:
            seen = [p for p in psutil.Process(command).children(recursive=True) if p.pid != me]
        except psutil.Error:
            pass  # exiting: keep the last list
        time.sleep(GUARD_EVERY_S)
    _stop(seen, CHILD_GRACE_S)


def _stop(processes: list, grace_s: float) -> None:
    """SIGTERM `processes` (psutil), then SIGKILL those still alive after `grace_s`."""
    import psutil

    for process in processes:
        try:
            process.terminate()
        except psutil.Error:
            pass  # already gone
    _, alive = psutil.wait_procs(processes, timeout=grace_s)
    for process in alive:
        try:
            process.kill()
        except psutil.Error:
            pass
