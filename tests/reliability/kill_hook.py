"""Run a Python module as a program and SIGKILL it at its K-th file rename.

    python kill_hook.py MODULE ARGS...        (environment: KILL_AT, KILL_PHASE)

Every result file in capfilt is written to a temporary name and renamed into place
(`os.replace` / `os.rename`), so renames are the points where a crash can leave a
half-finished state. The hook wraps both functions:

- ``KILL_AT=K`` (1-based) picks the rename to die at; ``KILL_PHASE`` says how:
  ``before`` (the temporary file is whole but not yet renamed), ``after`` (renamed, the
  next step, e.g. the completion record, not yet written) or ``torn`` (the temporary
  file is cut to half its size first: a kill in the middle of writing it).

The kill is a real ``SIGKILL`` of the process itself: no handler, `finally` or atexit runs.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

PHASES = ("before", "after", "torn")


def _tear(path: Path) -> None:
    """Cut `path` (or the biggest file inside a folder) to half its size."""
    target = path
    if path.is_dir():
        files = [p for p in path.rglob("*") if p.is_file()]
        if not files:
            return
        target = max(files, key=lambda p: p.stat().st_size)
    if target.is_file():
        with open(target, "r+b") as f:
            f.truncate(target.stat().st_size // 2)


def install(kill_at: int, phase: str) -> None:
    """Wrap os.replace / os.rename as described in the module docstring."""
    if phase not in PHASES:
        raise ValueError(f"KILL_PHASE must be one of {PHASES}, got {phase!r}")
    done = [0]

    def wrap(real: Callable[..., Any]) -> Callable[..., Any]:
        def renamed(src: Any, dst: Any, *args: Any, **kwargs: Any) -> Any:
            done[0] += 1
            hit = done[0] == kill_at
            if hit and phase == "torn":
                _tear(Path(os.fsdecode(src)))
            if hit and phase in ("before", "torn"):
                os.kill(os.getpid(), signal.SIGKILL)
            result = real(src, dst, *args, **kwargs)
            if hit:
                os.kill(os.getpid(), signal.SIGKILL)
            return result

        return renamed

    os.replace = wrap(os.replace)
    os.rename = wrap(os.rename)


def main() -> None:
    module, args = sys.argv[1], sys.argv[2:]
    install(int(os.environ.get("KILL_AT", "0")), os.environ.get("KILL_PHASE", "before"))
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
