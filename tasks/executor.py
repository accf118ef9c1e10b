"""The shard-stage executor: a few long-lived workers, each loading its stage's model once
and streaming its share of the stage's shards through one image loader.

A stage's plan is a file (``plan.arrow`` in the stage's settings-hash folder): one row
per output shard (its index, input, output name and, for the filter, caption shard).
Worker `rank` of `world` takes every `world`-th row (datatrove's rank split), so what a
scheduler tracks grows with workers, never with shards. What is done is decided by the
shards' completion records alone: a rerun, or a worker started again after a crash or a
lost machine, skips finished shards and redoes the rest (the rerun is the resume), and a
worker whose shards are all complete never loads its model.

A stage module supplies only its own work, as a `StageRunner` (`tasks.caption`,
`tasks.filter`); `stream_shards` runs its jobs through one `ImageStream` and the
lifecycle (`tasks.lifecycle.run_stage`), the same for the stage commands and the flow.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

import pyarrow as pa

from data.shards import write_if_changed
from data.storage import Location, location
from tasks.lifecycle import ShardJob, ShardOutput, ShardStats, StageIncompleteError, StageStats, run_shard, run_stage

PLAN_FILE = "plan.arrow"  # not *.parquet: globs for shards and data files never pick it up
MAX_REPORTED_FAILURES = 20  # failures named in a worker's result; the count is always exact

_PLAN_SCHEMA = pa.schema([("index", pa.int64()), ("src", pa.string()), ("name", pa.string()), ("captions", pa.string())])


@dataclass(frozen=True)
class PlanItem:
    """One output shard of a stage: its position in the plan, input, output name and
    (filter only) the caption shard scored with it."""

    index: int
    src: str
    name: str
    captions: str | None = None


def write_plan(folder: Location, items: Sequence[PlanItem]) -> Location:
    """Write the stage's plan into `folder` (atomically; the same items give the same bytes,
    and a plan already there with them is left as it is: a rerun rewrites nothing)."""
    table = pa.table({name: [getattr(item, name) for item in items] for name in _PLAN_SCHEMA.names}, schema=_PLAN_SCHEMA)
    sink = io.BytesIO()
    with pa.ipc.new_file(sink, _PLAN_SCHEMA) as writer:
        writer.write_table(table)
    path = location(folder) / PLAN_FILE
    write_if_changed(path, sink.getvalue())
    return path


def read_plan(path: Location | str, rank: int = 0, world: int = 1) -> list[PlanItem]:
    """Worker `rank`'s share of the plan at `path`: every `world`-th item from `rank`."""
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, {world}), got {rank}")
    table = pa.ipc.open_file(pa.BufferReader(location(path).read_bytes())).read_all()
    return [PlanItem(**row) for row in table.to_pylist()[rank::world]]


class StageRunner(Protocol):
    """A stage's own part of the work, built once per worker (model loaded on its device)."""

    resolved: Any  # tasks.execution.Resolved: batch size and loader workers chosen

    def read(self, item: PlanItem) -> Any:  # -> tasks.image_batches.Planned
        """Read one shard and plan its batches."""

    def work(self, state: Any, images: Any) -> ShardOutput:
        """The shard's outputs from its planned state and its image batches."""

    def stream(self, plans: list[Callable[[], Any]], pending: Callable[[int], bool]) -> Any:
        """The stage's one `ImageStream` over `plans`."""


JobFactory = Callable[[PlanItem, Location, str, Callable[[], ShardOutput]], ShardJob]


def stream_shards(runner: StageRunner, job: JobFactory, stats: StageStats, items: Sequence[PlanItem],
                  before: Callable[[int], None] | None = None,
                  on_done: Callable[[int], None] | None = None) -> StageStats:  # fmt: skip
    """Every item through the lifecycle, their images through one loader; `before(index)`
    runs as a shard's work starts (fault injection), `on_done(index)` after each shard.
    Raises StageIncompleteError naming the failed inputs after the others completed."""
    jobs: list[ShardJob] = []

    def work(i: int) -> ShardOutput:
        if before is not None:
            before(items[i].index)
        return runner.work(*stream.take(i))

    plans = [partial(runner.read, item) for item in items]
    with runner.stream(plans, lambda i: not jobs[i].complete()) as stream:
        for i, item in enumerate(items):
            jobs.append(job(item, stats.output, stats.settings_hash, partial(work, i)))
        stats.execution = runner.resolved.why
        done = iter(items)
        return run_stage(stats, jobs, on_done=(lambda: on_done(next(done).index)) if on_done else None)


@dataclass
class WorkerSpec:
    """What one worker runs: its share (`rank` of `world`) of the plan of a stage folder."""

    stage: str  # a name in `tasks.shard_stages.STAGES`
    plan: str  # the plan file
    folder: str  # the stage's settings-hash folder
    digest: str  # the stage's settings hash
    model: str  # the stage model's folder or URL
    config: Any  # the stage's config (CaptionConfig / FilterConfig), its execution resolved
    rank: int = 0
    world: int = 1


@dataclass
class WorkerResult:
    """What one worker did: counts summed over its shards, and the shards that failed."""

    rank: int
    shards: int = 0
    skipped: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0  # time in shard work (skipped shards cost none)
    images: int = 0
    failed: int = 0
    failures: dict[str, str] = field(default_factory=dict)  # input -> error, the first MAX_REPORTED_FAILURES
    execution: str = ""
    worker: str | None = None  # the Dask worker's address, when on Dask

    def add(self, shard: ShardStats) -> None:
        self.shards += 1
        self.skipped += shard.skipped
        self.seconds += shard.seconds
        self.images += shard.images
        for name, value in shard.counts.items():
            self.counts[name] = self.counts.get(name, 0) + int(value)


def run_worker(spec: WorkerSpec, build: Callable[[str, Any], StageRunner], job: JobFactory,
               before: Callable[[int], None] | None = None,
               on_done: Callable[[int], None] | None = None) -> WorkerResult:  # fmt: skip
    """Run worker `spec.rank`'s shards with the stage's runner `build(model, config)` and its
    `job` factory (`tasks.shard_stages` finds both by name): complete shards are counted from
    their records, the rest go through one model and one loader. Shard failures are
    returned, not raised, so the other workers' shards and this worker's others complete."""
    folder = location(spec.folder)
    result = WorkerResult(rank=spec.rank)
    todo: dict[int, ShardJob] = {}  # plan index -> its job (inputs fingerprinted once)
    items = read_plan(spec.plan, spec.rank, spec.world)
    for item in items:
        planned = job(item, folder, spec.digest, _never)
        if planned.complete():
            result.add(run_shard(planned))  # reads the record: counts, skipped
            if on_done is not None:
                on_done(item.index)
        else:
            todo[item.index] = planned
    if not todo:
        return result
    stats = StageStats(stage=spec.stage, output=folder, settings_hash=spec.digest)
    with_work = lambda item, _folder, _digest, work: dataclasses.replace(todo[item.index], work=work)  # noqa: E731
    try:
        stream_shards(build(spec.model, spec.config), with_work, stats, [i for i in items if i.index in todo], before, on_done)
    except StageIncompleteError as exc:
        result.failed = len(exc.failures)
        result.failures = dict(list(exc.failures.items())[:MAX_REPORTED_FAILURES])
    for shard in stats.shards:
        result.add(shard)
    result.execution = stats.execution
    return result


def _never() -> ShardOutput:
    raise AssertionError("a complete shard's work never runs")
