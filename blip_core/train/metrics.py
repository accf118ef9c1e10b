"""`metrics.jsonl`: one JSON line per logging step, appended and flushed as training goes.

On resume, lines past the checkpoint's step are dropped first (they belong to steps
that will be run again), so the file reads as one uninterrupted run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from blip_core.atomic import atomic_path


def truncate_after(path: Path, step: int) -> None:
    """Keep only lines whose ``step`` is <= `step` (rewritten atomically); no file: nothing to do."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
    with atomic_path(path) as tmp:
        tmp.write_text("".join(f"{line}\n" for line in kept))


class MetricsWriter:
    """Appends one flushed JSON line per `write`; a no-op on ranks other than 0."""

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path = path
        self._file = open(path, "a", encoding="utf-8") if enabled else None  # noqa: SIM115 (closed in close)

    def write(self, record: dict[str, Any]) -> None:
        if self._file is None:
            return
        self._file.write(json.dumps(record, sort_keys=True) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All complete lines of a metrics file, in order."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out
