"""Ctrl-C ends a flow run at once; finished work stays on disk and a rerun resumes it.

Left to Prefect, a SIGINT from the terminal stops the temporary API server (it shares the
terminal's process group) but not the flow's worker threads, which go on training and
filtering for minutes while every API call fails. Every stage writes atomically and
records completion last, so ending the process outright is exactly the SIGKILL that the
kill-and-rerun tests cover: the rerun skips what finished and redoes the rest.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, what shells report for Ctrl-C


@contextmanager
def exit_on_interrupt(resume_command: str) -> Iterator[None]:
    """Within the block, the first SIGINT prints how to resume and ends the process (exit 130).

    Only the main thread can install signal handlers; elsewhere the block changes nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        message = (
            "\ncapfilt: interrupted. Finished shards, checkpoints and models are kept; "
            f"resume with: {resume_command}\n"
        )
        os.write(2, message.encode())
        os._exit(INTERRUPTED_EXIT_CODE)  # threads and children (Dask, torchrun) end with us

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
