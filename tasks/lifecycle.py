"""The per-shard lifecycle every shard stage shares, written once.

A stage plans `ShardJob`s (what one output shard reads, where it goes, the identity of
its inputs and settings) and supplies only its own work: caption generates, filter
scores and decides, assemble selects. `run_shard` does the rest, the same way for all:

1. skip: every output of the job has a completion record for these inputs and settings;
2. work: the stage's function returns one table per output and the row counts;
3. account: kept + rejected + failed = input, or the shard fails loudly;
4. write: each data file atomically (`data.shards.write_shard`), then the completion
   records, the job's primary output last (it is what a skip reads first).

So a rerun after a crash (SIGKILL included) is the resume: a shard whose records are
missing is redone whole, and nothing half-written is ever mistaken for a result.
`run_stage` runs a stage's jobs, letting a failed shard not stop the others.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from data.shards import CompletionRecord, is_complete, read_completion, settings_hash, write_atomic, write_completion, write_shard
from data.storage import Location, location

STAGE_FILE = "stage.json"


@dataclass
class ShardStats:
    """What one stage call did for one output shard."""

    shard: str  # output shard name (part-NNNNN.parquet)
    source: str  # the input file
    counts: dict[str, int]  # input = kept + rejected + failed (plus stage-specific detail)
    skipped: bool = False  # complete already for these inputs and settings
    seconds: float = 0.0
    images: int = 0  # images that went through the model


@dataclass
class StageStats:
    """What one stage run did over all its shards; `output` is the settings-hash folder."""

    stage: str
    output: Location  # a local path or a URL (`data.storage`)
    settings_hash: str
    shards: list[ShardStats] = field(default_factory=list)
    execution: str = ""  # the batch size and workers the run chose, and why (`tasks.execution.resolve_execution`)

    @property
    def totals(self) -> dict[str, int]:
        """Counts summed over shards (skipped shards included: they are part of the output)."""
        out: dict[str, int] = {}
        for shard in self.shards:
            for name, value in shard.counts.items():
                out[name] = out.get(name, 0) + int(value)
        return out

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.shards)

    @property
    def images(self) -> int:
        return sum(s.images for s in self.shards)

    @property
    def images_per_second(self) -> float:
        """Model throughput over the shards processed in this run (0 when all were skipped)."""
        return self.images / self.seconds if self.seconds > 0 else 0.0


class StageIncompleteError(RuntimeError):
    """Some input shards of a stage failed; every other shard was completed.

    `failures` maps each failed input file to its error; `stats` holds the shards that
    completed (or were complete already). Rerunning after fixing or removing the named
    inputs finishes the stage: complete shards are skipped.
    """

    def __init__(self, stats: StageStats, failures: dict[str, str]) -> None:
        self.stats = stats
        self.failures = failures
        lines = "\n".join(f"  {src}: {error}" for src, error in failures.items())
        super().__init__(
            f"{stats.stage}: {len(failures)} of {len(failures) + len(stats.shards)} input shards did not complete "
            f"(the other {len(stats.shards)} did, in {stats.output}):\n{lines}\n"
            "Fix or remove these inputs and rerun; complete shards are skipped."
        )


@dataclass
class ShardOutput:
    """What a stage's work made for one job: a table per output, and the row counts."""

    tables: dict[str, pa.Table]  # keyed as the job's `outputs`
    counts: dict[str, int]  # input, kept, rejected, failed (+ stage detail)
    extra: dict[str, Any] = field(default_factory=dict)  # provenance for the records
    images: int = 0  # images the model saw


@dataclass
class ShardJob:
    """One output shard of a stage: what it reads, where it writes, and its identity.

    `outputs` maps output name -> path (the filter's kept / rejected / failed; one entry
    elsewhere); the LAST entry is the primary one, whose record is written last.
    """

    name: str  # output shard name, part-NNNNN.parquet
    source: str  # what it reads, for messages and records
    outputs: dict[str, Location]
    kind: str  # schema kind of every output
    fingerprint: str  # identity of the input bytes
    digest: str  # the stage's settings hash
    work: Callable[[], ShardOutput]  # the stage's own work

    @property
    def primary(self) -> Location:
        return list(self.outputs.values())[-1]

    def complete(self) -> bool:
        return all(is_complete(path, self.fingerprint, self.digest) for path in self.outputs.values())


def check_accounting(counts: dict[str, int], where: str) -> None:
    """Raise when kept + rejected + failed != input: every input row must be accounted for."""
    total = counts["kept"] + counts["rejected"] + counts["failed"]
    if total != counts["input"]:
        raise AssertionError(
            f"{where}: accounting broken, kept {counts['kept']} + rejected {counts['rejected']} + "
            f"failed {counts['failed']} = {total} != input {counts['input']}"
        )


def run_shard(job: ShardJob) -> ShardStats:
    """Skip, or do the job's work, check its accounting and write it (data first, records last)."""
    if job.complete():
        record = read_completion(job.primary)
        return ShardStats(shard=job.name, source=job.source, counts=dict(record.counts), skipped=True)
    start = time.perf_counter()
    made = job.work()
    check_accounting(made.counts, job.source)
    for output, path in job.outputs.items():
        write_shard(made.tables[output], path, kind=job.kind)
    for output, path in job.outputs.items():  # the primary output's record last
        extra = {**made.extra, "outcome": output} if len(job.outputs) > 1 else made.extra
        record = CompletionRecord(shard=job.name, kind=job.kind, counts=made.counts, input_fingerprint=job.fingerprint,
                                  settings_hash=job.digest, extra=extra)  # fmt: skip
        write_completion(path, record)
    seconds = time.perf_counter() - start
    return ShardStats(shard=job.name, source=job.source, counts=made.counts, seconds=seconds, images=made.images)


def run_stage(stats: StageStats, jobs: Sequence[ShardJob], on_done: Callable[[], None] | None = None) -> StageStats:
    """Run every job, appending each result to `stats`; a job that raises does not stop the
    others (`on_done` is called after each, e.g. to advance a progress bar). Raises
    StageIncompleteError naming the failed inputs at the end."""
    failures: dict[str, str] = {}
    for job in jobs:
        try:
            stats.shards.append(run_shard(job))
        except Exception as exc:  # noqa: BLE001 - reported below, with the file, after the other shards
            failures[job.source] = f"{type(exc).__name__}: {exc}"
        if on_done is not None:
            on_done()
    if failures:
        raise StageIncompleteError(stats, failures)
    return stats


def stage_dir(out_dir: Location | str, settings: dict[str, Any]) -> tuple[Location, str]:
    """The output folder for these semantic settings, ``out_dir/<hash>``, and the hash.

    Writes ``stage.json`` (the settings in plain JSON) into it, so a reader can tell what
    produced a folder; rewriting it is harmless because its content is a function of the hash.
    """
    digest = settings_hash(settings)
    folder = location(out_dir) / digest
    folder.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"settings_hash": digest, "settings": settings}, indent=2, sort_keys=True, default=str)
    target = folder / STAGE_FILE
    if not target.is_file() or target.read_text() != text:  # its content is a function of the hash
        write_atomic(target, text)
    return folder, digest
