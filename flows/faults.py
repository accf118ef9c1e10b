"""Fault injection for resume tests: `CAPFILT_FAULT=caption:1,pretrain` fails those steps.

Each comma-separated item is `step` (fail that step) or `step:index` (fail only shard
`index` of a shard stage); `step:index:sigkill` instead kills the process running that
shard with SIGKILL, as a lost machine (a Dask worker started with it dies there). The check runs at the start of the Prefect task, before any
output is written, so it models a crash between finished and unfinished work; the
fault stays while the variable is set, so removing it (the "fix") is what lets a
rerun resume. `CAPFILT_FAULT_FILE=PATH` reads the same spec from a file at each check,
so a long-lived process (a served deployment) can be fixed by deleting the file.
"""

from __future__ import annotations

import os
import signal

FAULT_ENV = "CAPFILT_FAULT"
FAULT_FILE_ENV = "CAPFILT_FAULT_FILE"


class InjectedFault(RuntimeError):
    """Raised by `maybe_fault` where `CAPFILT_FAULT` asks for a failure."""


def maybe_fault(step: str, index: int | None = None) -> None:
    """Raise InjectedFault when `CAPFILT_FAULT` names `step` (or `step:index`)."""
    spec = os.environ.get(FAULT_ENV, "")
    fault_file = os.environ.get(FAULT_FILE_ENV)
    if fault_file and os.path.isfile(fault_file):
        with open(fault_file) as handle:
            spec = ",".join(filter(None, [spec, handle.read().strip()]))
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, where = item.partition(":")
        where, _, how = where.partition(":")
        if name != step:
            continue
        if not where or (index is not None and where.isdigit() and int(where) == index):
            if how == "sigkill":
                os.kill(os.getpid(), signal.SIGKILL)
            suffix = f" shard {index}" if index is not None else ""
            raise InjectedFault(f"injected fault in {step}{suffix} ({FAULT_ENV}={spec!r}); unset it to resume")
