"""The installed `capfilt` entry point: Ctrl-C made safe first, then the command line.

`flows.interrupt.install` runs before typer, Prefect or torch is imported, so a Ctrl-C
during start-up ends the command as cleanly as one during a stage (exit 130, children
stopped, no traceback).
"""

from __future__ import annotations

import shlex
import sys

from flows import interrupt

# Commands whose rerun resumes the interrupted work (the others have nothing to resume).
RESUMABLE = frozenset({"demo", "run", "train", "caption", "filter", "assemble", "ingest", "evaluate", "ablation",
                       "export"})  # fmt: skip


def main() -> None:
    """`capfilt ...`: the typer app, with the first Ctrl-C ending it at once."""
    args = sys.argv[1:]
    long_running = bool(args) and args[0] in RESUMABLE and "--help" not in args
    if long_running:
        interrupt.start_guardian()  # a kill -9 of this process stops its children too
    interrupt.install(shlex.join(["capfilt", *args]) if args and args[0] in RESUMABLE else None)
    from flows.cli import app

    app()


if __name__ == "__main__":
    main()
