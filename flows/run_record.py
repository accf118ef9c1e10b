"""A finished run's record (``RUN/run.json``): rerunning the same command on an unchanged
folder returns at once, without starting Prefect.

A rerun of a finished run would skip every stage anyway, but only after importing the
model code, starting Prefect's temporary server and opening a flow run and a task run per
stage (about 25 s on 2 cores, all of it deciding that nothing is left to do). The flow
writes this record last, under the run folder's lock, after a run that ended normally:

- ``config``: a hash of the typed run config (every setting, the run folder included) and
  of capfilt's own source and presets, so an upgrade or any edited setting runs the flow;
- ``files``: size and mtime of every file in the run folder (not Prefect's own folder or
  the lock) and of every local input the config names;
- ``summary``: what the flow returned.

`finished_summary` returns that summary only when all of it still holds; anything else
(a changed setting, a shard deleted or rewritten, an input touched, an input on object
storage, whose stamps would cost a listing) runs the flow as usual, and the flow removes
the record before it writes anything. A run folder on object storage gets no record
(its stamps would cost a listing of the whole run, and the fast path exists to skip
work that costs less than that): every rerun goes through the flow, which skips
finished steps itself. Nothing here imports Prefect.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from data.layout import RunLayout
from data.shards import write_atomic
from data.storage import is_remote
from flows.config import RunConfig

RECORD_VERSION = 1
_SKIP_TOP = {".prefect", ".lock"}  # Prefect's own results, and the lock's holder text
_PACKAGES = ("blip_core", "data", "tasks", "flows")
_ROOT = Path(__file__).resolve().parents[1]


def finished_summary(config: RunConfig) -> dict[str, Any] | None:
    """The summary of the finished run `config` describes, if nothing has changed since; else None."""
    if is_remote(config.run_dir):
        return None
    path = RunLayout(Path(config.run_dir)).run_record
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if record.get("version") != RECORD_VERSION or record.get("config") != config_fingerprint(config):
        return None
    files = stamps(config)
    if files is None or files != record.get("files"):
        return None
    return record.get("summary")


def write_record(config: RunConfig, summary: dict[str, Any]) -> None:
    """Record a run that ended normally (the flow calls this last, holding the lock);
    nothing for a run folder on object storage."""
    if is_remote(config.run_dir):
        return
    files = stamps(config)
    if files is None:
        return  # inputs on object storage: every rerun goes through the flow
    record = {"version": RECORD_VERSION, "config": config_fingerprint(config), "files": files,
              "summary": json.loads(json.dumps(summary, default=str))}  # fmt: skip
    write_atomic(RunLayout(Path(config.run_dir)).run_record, json.dumps(record, indent=1).encode())


def forget_record(config: RunConfig) -> None:
    """Drop the record before a run writes anything (so a run that stops midway leaves none)."""
    if is_remote(config.run_dir):
        return  # never written there
    RunLayout(Path(config.run_dir)).run_record.unlink(missing_ok=True)


def config_fingerprint(config: RunConfig) -> str:
    """sha256 of the typed config and of capfilt's source files and presets."""
    digest = hashlib.sha256(config.model_dump_json().encode())
    sources = [p for name in _PACKAGES for p in (_ROOT / name).rglob("*.py")]
    sources += list((_ROOT / "presets").glob("*")) if (_ROOT / "presets").is_dir() else []
    for source in sorted(sources):
        digest.update(source.relative_to(_ROOT).as_posix().encode())
        digest.update(source.read_bytes())
    return digest.hexdigest()


def stamps(config: RunConfig) -> dict[str, list[int]] | None:
    """``{path: [size, mtime_ns]}`` of the run folder's files (relative) and of the local
    inputs the config names (absolute); None when an input is a URL."""
    root = Path(config.run_dir)
    found: dict[str, list[int]] = {}
    for top in sorted(root.iterdir()) if root.is_dir() else []:
        if top.name in _SKIP_TOP or top.name == RunLayout(root).run_record.name:
            continue
        for path in _files(top):
            found[path.relative_to(root).as_posix()] = _stamp(path)
    for item in _inputs(config):
        if "://" in item:
            return None
        for path in _files_named(item):
            found[str(path.resolve())] = _stamp(path)
    return found


def _inputs(config: RunConfig) -> list[str]:
    data, model = config.data, config.model
    named = [*data.human, *data.web, *data.test, data.truth, data.web_urls, model.pretrained, model.filter,
             model.captioner]  # fmt: skip
    return [str(item) for item in named if item]


def _files_named(item: str) -> list[Path]:
    """The files an input names: a file, a folder's files, or a glob's matches."""
    if any(c in item for c in "*?[") and not Path(item).exists():
        return sorted(p for match in glob.glob(item) for p in _files(Path(match)))
    return _files(Path(item))


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(Path(d) / f for d, _, names in os.walk(path) for f in names)


def _stamp(path: Path) -> list[int]:
    info = path.stat()
    return [info.st_size, info.st_mtime_ns]
