"""Run a Python module as a program and press Ctrl-C at a named moment of its run.

    python interrupt_hook.py MODULE ARGS...      (environment: INTERRUPT_AT, INTERRUPT_MARK)

The press is what a terminal does: SIGINT to the whole process group (the program, its
temporary Prefect server, its loader workers). ``INTERRUPT_AT`` names the moment:

- ``start-up``: not armed; the test presses from outside, a moment into the start;
- ``server``: right after Prefect's temporary API server process is started, while it is
  still starting up;
- ``progress:PREFIX:N``: at the N-th update of a progress counter whose label starts with
  PREFIX (``progress:ingest:1``, ``progress:pretrain:5``, ``progress:caption:1``), i.e.
  in the middle of that loop, on whichever thread runs it;
- ``report``: when the run report saves its first figure.

Before pressing, the hook writes JSON to ``INTERRUPT_MARK``: the moment, and the pids of
every process the program has started, so a test can check that none is left behind. A
moment that never comes leaves no mark.
"""

from __future__ import annotations

import json
import os
import runpy
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

_pressed = threading.Event()


def press(moment: str) -> None:
    """Record the moment and the children, then SIGINT the process group (once)."""
    if _pressed.is_set():
        return
    _pressed.set()
    import psutil

    children = [p.pid for p in psutil.Process().children(recursive=True)]
    with open(os.environ["INTERRUPT_MARK"], "w") as f:
        json.dump({"moment": moment, "children": children}, f)
    os.killpg(os.getpgrp(), signal.SIGINT)


def _after(owner: Any, name: str, moment: str, when: Callable[..., bool] = lambda *a, **k: True) -> None:
    """Wrap ``owner.name`` so that the press comes right after a call for which `when` holds."""
    real = getattr(owner, name)

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        result = real(*args, **kwargs)
        if when(*args, **kwargs):
            press(moment)
        return result

    setattr(owner, name, wrapped)


def install(moment: str) -> None:
    """Arm the hook for `moment` (see the module docstring)."""
    if moment == "start-up":
        return  # the test presses from outside, while the program imports
    if moment == "server":
        from prefect.server.api.server import SubprocessASGIServer

        _after(SubprocessASGIServer, "_run_uvicorn_command", moment)
    elif moment.startswith("progress:"):
        _, prefix, count = moment.split(":")
        from blip_core.progress import PlainProgress

        _after(PlainProgress, "update", moment,
               lambda bar, n=1: bar.desc.startswith(prefix) and bar.n >= int(count))  # fmt: skip
    elif moment == "report":
        import tasks.report.sections as sections  # where the report's figures are saved from

        _after(sections, "save_figure", moment)
    else:
        raise ValueError(f"INTERRUPT_AT={moment!r}: expected start-up, server, progress:PREFIX:N or report")


def main() -> None:
    module, args = sys.argv[1], sys.argv[2:]
    install(os.environ["INTERRUPT_AT"])
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
