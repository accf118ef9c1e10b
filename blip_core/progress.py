"""Progress of long loops, one way for the whole project: a tqdm bar on a terminal, plain lines elsewhere.

`progress_bar(total, desc, unit)` is used by the trainer and (through
`tasks.execution.progress_bar`) by every stage. Both forms write to stderr, so a command's
stdout (JSON summaries, query results) stays clean, and stderr decides which form:

- stderr is a terminal: a live tqdm bar (done/total, rate, ETA, postfix such as loss);
- otherwise (CI, log files, Prefect or Dask workers): a line when the loop starts, then the
  same text, tqdm's own meter, as a plain line every ~10 s or 5 % of the total (and once at
  the end), with no carriage returns; so a log shows each stage as it begins.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any, TextIO

LINE_EVERY_S = 10.0  # a plain line at least this often while the loop moves ...
LINE_EVERY_FRACTION = 0.05  # ... or when this much more of the total is done ...
LINE_MIN_GAP_S = 1.0  # ... but never more often than this (except the last line)


def is_terminal(stream: TextIO | None = None) -> bool:
    """Whether progress is drawn as a live bar: `stream` (default stderr) is a terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False


def progress_bar(total: int | None, desc: str, unit: str = "it", enabled: bool = True, initial: int = 0,
                 leave: bool = False) -> Any:  # fmt: skip
    """A progress counter with tqdm's interface (`update`, `set_postfix`, `close`, ``with``).

    A tqdm bar when stderr is a terminal, `PlainProgress` lines otherwise; a no-op when
    not `enabled`.
    """
    from tqdm.auto import tqdm

    if not enabled:
        return tqdm(total=total, disable=True)
    if is_terminal():
        sized = _terminal_sized()  # else tqdm follows a 0x0 size and hides every bar
        return tqdm(total=total, desc=desc, unit=unit, initial=initial, leave=leave, dynamic_ncols=sized,
                    nrows=None if sized else 20)  # fmt: skip
    return PlainProgress(total, desc, unit, initial)


def _terminal_sized() -> bool:
    """Whether stderr's terminal reports its size (a fresh pseudo-terminal reports 0 x 0)."""
    try:
        size = os.get_terminal_size(sys.stderr.fileno())
    except (AttributeError, OSError, ValueError):
        return False
    return size.lines > 0 and size.columns > 0


class PlainProgress:
    """tqdm's meter as plain lines: ``desc: started`` at once, then every ~10 s or 5 %, and a
    last one on close (thread-safe). `total` may be None until known (set it before updates)."""

    def __init__(self, total: int | None, desc: str, unit: str = "it", initial: int = 0,
                 file: TextIO | None = None) -> None:  # fmt: skip
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.file = file
        self.postfix = ""
        self._start = self._last_time = time.monotonic()
        self._last_n = initial
        self._initial = initial
        self._lock = threading.Lock()
        self._closed = False
        self._print(f"{desc}: started" + (f" ({total} {unit})" if total else ""))

    def update(self, n: int = 1) -> None:
        with self._lock:
            self.n += n
            now = time.monotonic()
            since = now - self._last_time
            step = LINE_EVERY_FRACTION * self.total if self.total else float("inf")
            if since >= LINE_EVERY_S or (since >= LINE_MIN_GAP_S and self.n - self._last_n >= step):
                self._write(now)

    def set_postfix(self, values: dict[str, Any] | None = None, refresh: bool = True, **kwargs: Any) -> None:
        items = {**(values or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def close(self) -> None:
        with self._lock:
            if not self._closed and self.n > self._last_n:
                self._write(time.monotonic())
            self._closed = True

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def line(self, now: float | None = None) -> str:
        """The meter as tqdm draws it, without the bar: ``desc: 40%| 4/10 [00:02<00:03, 2.0img/s, loss=1.2]``."""
        from tqdm import tqdm

        elapsed = (time.monotonic() if now is None else now) - self._start
        rate = (self.n - self._initial) / elapsed if elapsed > 0 else None
        return tqdm.format_meter(self.n, self.total, elapsed, ncols=0, prefix=self.desc, unit=self.unit,
                                 rate=rate, postfix=self.postfix or None)  # fmt: skip

    def _write(self, now: float) -> None:
        self._print(self.line(now))
        self._last_time, self._last_n = now, self.n

    def _print(self, text: str) -> None:
        file = sys.stderr if self.file is None else self.file
        file.write(text + "\n")
        file.flush()


class Advance:
    """A callback ``advance(n, total)`` for code that knows its total only once it runs
    (``with Advance("export", "row") as advance: export(..., on_shard=advance)``): the bar
    opens at the first call; plain lines (no terminal) say at once, on entering, that it started."""

    def __init__(self, desc: str, unit: str = "it", enabled: bool = True) -> None:
        self.desc, self.unit, self.enabled = desc, unit, enabled
        self.bar: Any = None

    def __call__(self, n: int, total: int | None) -> None:
        if self.bar is None:
            self.bar = progress_bar(total, self.desc, self.unit, self.enabled)
        elif isinstance(self.bar, PlainProgress) and self.bar.total is None:
            self.bar.total = total
        self.bar.update(n)

    def __enter__(self) -> Advance:
        if self.enabled and not is_terminal():
            self.bar = PlainProgress(None, self.desc, self.unit)  # its start line now; the total at the first call
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()
