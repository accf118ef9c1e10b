"""Progress artifacts: training (read from the trainer's metrics file) and shard stages (shards done), shown in Prefect."""

from __future__ import annotations

import json
import time
from pathlib import Path

from flows.artifacts import TrainingProgress, last_step


def test_last_step_skips_torn_and_foreign_lines(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.jsonl"
    assert last_step(metrics) == 0  # not written yet
    metrics.write_text(json.dumps({"step": 10}) + "\n" + json.dumps({"step": 20}) + '\n{"step": 3')  # 30 half-written
    assert last_step(metrics) == 20
    metrics.write_text("x" * 10_000 + "\n" + json.dumps({"step": 7, "loss": 1.0}) + "\n")
    assert last_step(metrics) == 7
    outside = TrainingProgress("train", metrics, steps=10)  # no flow run: a silent no-op
    with outside:
        pass
    assert outside.artifact_id is None


def test_progress_follows_the_metrics_file_in_a_flow_run(prefect_harness, tmp_path: Path) -> None:
    from prefect import flow, task
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterId

    metrics = tmp_path / "metrics.jsonl"

    @task
    def fake_training() -> tuple[str, list[float]]:
        seen = []
        with TrainingProgress("pretrain", metrics, steps=40, every=0.05) as progress:
            for step in (10, 20, 30):
                with open(metrics, "a") as f:
                    f.write(json.dumps({"step": step}) + "\n")
                deadline = time.monotonic() + 20
                while progress.shown != 100 * step / 40 and time.monotonic() < deadline:
                    time.sleep(0.02)
                seen.append(progress.shown)
        return str(progress.artifact_id), seen

    @flow
    def run() -> tuple[str, list[float]]:
        return fake_training()

    artifact_id, seen = run()
    assert seen == [25.0, 50.0, 75.0]  # the watcher thread moved it while "training" went on

    async def read() -> list:
        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(id=ArtifactFilterId(any_=[artifact_id])))

    import asyncio

    (artifact,) = asyncio.run(read())
    assert artifact.type == "progress" and artifact.data == 75.0
    assert "pretrain" in artifact.description


def test_shard_progress_counts_each_shard_once_from_any_thread(prefect_harness, capsys) -> None:
    """Workers report shards done from their threads (a shard reported again, by a worker
    run a second time after a crash, counts once); the artifact moves while they work."""
    import threading

    from prefect import flow, task
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterId

    from flows.artifacts import ShardProgress

    @task
    def stage() -> tuple[str, float, int]:
        with ShardProgress("caption", total=8, every=0.05) as progress:
            threads = [threading.Thread(target=lambda r=r: [progress.done(i) for i in range(r, 8, 2)]) for r in (0, 1)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            progress.done(3)  # again
            deadline = time.monotonic() + 20
            while progress.shown != 100.0 and time.monotonic() < deadline:
                time.sleep(0.02)
            return str(progress.artifact_id), progress.shown, len(progress.seen)

    @flow
    def run() -> tuple[str, float, int]:
        return stage()

    artifact_id, shown, seen = run()
    assert (shown, seen) == (100.0, 8)
    assert "caption: 100% 8/8" in capsys.readouterr().err  # the stage's bar, plain lines off a terminal

    async def read() -> list:
        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(id=ArtifactFilterId(any_=[artifact_id])))

    import asyncio

    (artifact,) = asyncio.run(read())
    assert artifact.type == "progress" and artifact.data == 100.0 and "caption: shards done" in artifact.description
