"""The shard stages the executor runs, by name: a `WorkerSpec` names its stage (it travels
to Dask workers as data), and `run_stage_worker` finds that stage's runner and jobs here.
Adding a shard stage: its module supplies a `StageRunner` and a job factory, and one line here."""

from __future__ import annotations

from collections.abc import Callable

from tasks.caption import Captioner, caption_job
from tasks.executor import WorkerResult, WorkerSpec, run_worker
from tasks.filter import Judge, filter_job

STAGES = {"caption": (Captioner.build, caption_job), "filter": (Judge.build, filter_job)}


def run_stage_worker(spec: WorkerSpec, before: Callable[[int], None] | None = None,
                     on_done: Callable[[int], None] | None = None) -> WorkerResult:  # fmt: skip
    """`tasks.executor.run_worker` for the stage `spec` names."""
    if spec.stage not in STAGES:
        raise ValueError(f"no shard stage named {spec.stage!r}; expected one of {sorted(STAGES)}")
    build, job = STAGES[spec.stage]
    return run_worker(spec, build, job, before, on_done)
