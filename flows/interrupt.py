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
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from types import FrameType

INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, what shells report for Ctrl-C
CHILD_GRACE_S = 3.0  # how long children get to exit on SIGTERM before SIGKILL

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
    for child in children:
        try:
            child.terminate()
        except psutil.Error:
            pass  # already gone
    _, alive = psutil.wait_procs(children, timeout=grace_s)
    for child in alive:
        try:
            child.kill()
        except psutil.Error:
            pass
