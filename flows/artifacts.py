"""Prefect artifacts for a run: one table per stage, progress of shard stages, a summary.

Artifacts need a flow or task run; outside one (plain Python calls, `.fn()` in unit
tests) these helpers do nothing, so stage code never depends on them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
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
    """One table row for a stage: summed counts, shards done / skipped, time and images/s."""
    totals = dict.fromkeys(COUNT_COLUMNS, 0)
    shards = skipped = cached = images = 0
    for stats in shard_stats:
        shards += 1
        skipped += bool(stats.get("skipped"))
        cached += bool(stats.get("cached"))
        images += int(stats.get("images", 0))
        for name in COUNT_COLUMNS:
            totals[name] += int(stats.get("counts", {}).get(name, 0))
    return {
        "stage": stage,
        **totals,
        "shards": shards,
        "skipped_shards": skipped,  # complete before: the stage function skipped them
        "cached_shards": cached,  # Prefect returned the earlier result without running the task
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


class Progress:
    """A progress artifact for a long stage, updated as shards finish (at most ~20 updates)."""

    def __init__(self, stage: str, total: int) -> None:
        self.total = max(total, 1)
        self.done = 0
        self.step = max(1, self.total // 20)
        self.artifact_id: UUID | None = None
        if _in_run():
            from prefect.artifacts import create_progress_artifact

            self.artifact_id = create_progress_artifact(0.0, description=f"capfilt {stage}: shards done")

    def advance(self) -> None:
        """One more shard finished."""
        self.done += 1
        if self.artifact_id is None or (self.done % self.step and self.done != self.total):
            return
        from prefect.artifacts import update_progress_artifact

        update_progress_artifact(self.artifact_id, 100.0 * self.done / self.total)
