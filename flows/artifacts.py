"""Prefect artifacts for a run: one table per stage, progress of shard stages and of
training stages, a summary.

Artifacts need a flow or task run; outside one (plain Python calls, `.fn()` in unit
tests) these helpers do nothing, so stage code never depends on them.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect.context import FlowRunContext, TaskRunContext

COUNT_COLUMNS = ("input", "kept", "rejected", "failed")


def _in_run() -> bool:
    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def artifact_key(*parts: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")


def stage_row(stage: str, shard_stats: Iterable[dict[str, Any]], wall_seconds: float) -> dict[str, Any]:
    """One table row for a stage: summed counts, shards done / skipped, time and images/s.

    Each item of `shard_stats` is one shard's stats (``skipped`` a bool) or one worker's
    (``shards`` and ``skipped`` counts, `tasks.executor.WorkerResult`)."""
    totals = dict.fromkeys(COUNT_COLUMNS, 0)
    shards = skipped = images = 0
    for stats in shard_stats:
        shards += int(stats.get("shards", 1))
        skipped += int(stats.get("skipped") or 0)
        images += int(stats.get("images", 0))
        for name in COUNT_COLUMNS:
            totals[name] += int(stats.get("counts", {}).get(name, 0))
    return {
        "stage": stage,
        **totals,
        "shards": shards,
        "skipped_shards": skipped,  # complete before: their completion records matched
        "seconds": round(wall_seconds, 2),
        "images_per_s": round(images / wall_seconds, 1) if wall_seconds > 0 and images else 0.0,
    }


def publish_stage_table(run_name: str, row: dict[str, Any]) -> None:
    """A table artifact for one stage (rows in / kept / rejected / failed, time, images/s)."""
    if not _in_run():
        return
    from prefect.artifacts import create_table_artifact

    create_table_artifact(
        key=artifact_key("capfilt", run_name, row["stage"]),
        table=[row],
        description=f"capfilt {row['stage']}: rows by outcome, shards done / skipped, wall time, images/s",
    )


def publish_summary(run_name: str, rows: list[dict[str, Any]]) -> None:
    """All stages' rows in one table artifact."""
    if not _in_run() or not rows:
        return
    from prefect.artifacts import create_table_artifact

    columns = sorted({k for row in rows for k in row}, key=lambda k: (k != "stage", k))
    table = [{k: row.get(k, "") for k in columns} for row in rows]
    create_table_artifact(key=artifact_key("capfilt", run_name, "stages"), table=table, description="capfilt: every stage")


def publish_report(run_name: str, markdown: str, run_dir: str) -> None:
    """The run's report as a Markdown artifact (Prefect's UI shows no local images, so
    `markdown` links the figures as files)."""
    if not _in_run():
        return
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(key="capfilt-report", markdown=markdown, description=f"capfilt run report {run_dir}")


class WatchedProgress:
    """A Prefect progress artifact that a daemon thread moves to `percent()` every `every`
    seconds while the block runs, so the work it shows never waits on the API; leaving the
    block sets the final figure. Outside a flow or task run it does nothing. Subclasses say
    what the percentage is (shards done, training steps done)."""

    def __init__(self, description: str, every: float) -> None:
        self.every = every
        self.shown = -1.0
        self.artifact_id: UUID | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if _in_run():
            from prefect.artifacts import create_progress_artifact

            self.artifact_id = create_progress_artifact(self.percent(), description=description)

    def percent(self) -> float:
        raise NotImplementedError

    def update(self) -> None:
        """Move the artifact to `percent()` (no call when unchanged)."""
        percent = self.percent()
        if self.artifact_id is None or percent == self.shown:
            return
        from prefect.artifacts import update_progress_artifact

        update_progress_artifact(self.artifact_id, percent)
        self.shown = percent

    def _watch(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self.update()
            except Exception:  # noqa: BLE001 - a progress display must never fail the work it shows
                continue

    def __enter__(self) -> WatchedProgress:
        if self.artifact_id is not None:
            self._thread = threading.Thread(target=self._watch, name="capfilt-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.artifact_id is not None:
            self.update()


class ShardProgress(WatchedProgress):
    """Shards done of a shard stage, on any runner: ``with ShardProgress(stage, total) as p:``
    and `p.done(index)` (the shard's plan index) from any thread as each shard finishes (a
    shard reported twice, by a worker run again after a crash, counts once). Drawn as the
    stage's bar too (a terminal bar, plain lines in logs: `blip_core.progress`)."""

    def __init__(self, stage: str, total: int, enabled: bool = True, every: float = 2.0) -> None:
        from blip_core.progress import progress_bar

        self.total = max(total, 1)
        self.seen: set[int] = set()
        self._lock = threading.Lock()
        self._bar = progress_bar(total, stage, unit="shard", enabled=enabled)
        super().__init__(f"capfilt {stage}: shards done", every)

    def percent(self) -> float:
        return 100.0 * len(self.seen) / self.total

    def done(self, index: int) -> None:
        """Shard `index` of the plan finished, or was found complete."""
        with self._lock:
            if index in self.seen:
                return
            self.seen.add(index)
            self._bar.update(1)

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        self._bar.close()


def last_step(metrics: Path) -> int:
    """The step of the last complete line of a trainer's ``metrics.jsonl`` (0 when none yet)."""
    try:
        with open(metrics, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 4096))
            lines = f.read().splitlines()
    except OSError:
        return 0
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue  # a line still being written, or a torn first line of the window
    return 0


class TrainingProgress(WatchedProgress):
    """A progress artifact for a training stage: ``with TrainingProgress(label, metrics, steps):``.

    The trainer (in this process or under torchrun) appends a line to `metrics` every few
    steps; the watcher reads the last one, so the model code knows nothing of Prefect.
    """

    def __init__(self, label: str, metrics: Path, steps: int, every: float = 10.0) -> None:
        self.metrics, self.steps = Path(metrics), max(steps, 1)
        super().__init__(f"capfilt {label}: training steps done", every)

    def percent(self) -> float:
        return min(100.0, 100.0 * last_step(self.metrics) / self.steps)

