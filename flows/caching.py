"""Prefect result caching that agrees with the run folder's completion records.

Every step task gets a `StepJob`: its name, the files and folders it reads, and the
semantic settings that shape its output. Its cache key is
``<step id>-<hash of input fingerprints>`` where the step id hashes name + settings:
no flow-run id, so a new run, a `prefect flow-run retry` or a rerun of the same
config on the same folder finds the results of the steps that finished. Results are
persisted as JSON under ``RUN/.prefect/results`` (next to the data they describe).

The run folder stays the source of truth: after a step finishes it records the
outputs it wrote (``RUN/.prefect/outputs/<step id>.json``); before a cached result is
used, `step_cache_key` checks those outputs are still complete (shard + valid
completion record, or a saved model) and drops the cached result when they are not,
so a deleted or damaged output is recomputed instead of trusted.

Nothing sent to Prefect grows with the number of shards: a list of shards travels as a
list file (`write_list`: ``.prefect/lists/<hash of the list>.shards.json``, named by its
content), and a job's `inputs` name the list file, whose identity is its shards'.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from data.inputs import input_fingerprint
from data.layout import RunLayout
from data.shards import file_fingerprint, read_completion, settings_hash, write_atomic
from data.storage import is_remote, location

# Bump when a step's meaning changes in a way its settings do not show.
CACHE_VERSION = 2
_FINGERPRINT_PATTERNS = ("*.parquet", "*.tar", "*.safetensors", "*.json", "*.txt", "*.png")
LIST_SUFFIX = ".shards.json"


class StepJob(BaseModel):
    """One unit of work for a step task: what it reads, how, and where it writes."""

    step: str  # e.g. "caption" or "pretrain"
    index: int | None = None  # shard index for shard stages
    run_dir: str
    inputs: list[str] = Field(default_factory=list)  # files / folders whose bytes it reads
    settings: dict[str, Any] = Field(default_factory=dict)  # semantic settings (JSON-able)
    params: dict[str, Any] = Field(default_factory=dict)  # paths and execution settings

    @property
    def label(self) -> str:
        """`caption-00003` or `pretrain`: the task-run name."""
        return self.step if self.index is None else f"{self.step}-{self.index:05d}"

    @property
    def step_id(self) -> str:
        """Step identity without inputs: label + settings hash."""
        return f"{self.label}-{settings_hash({'settings': self.settings, 'v': CACHE_VERSION})}"


def results_dir(run_dir: str | Path) -> Path:
    """Where Prefect's persisted results for this run live (`run_dir`: the run's local
    working folder, `flows.bootstrap.work_dir`; never a URL)."""
    if is_remote(run_dir):
        raise ValueError(f"{run_dir}: Prefect's results live on a local disk; pass the run's local working folder")
    return RunLayout(Path(run_dir)).prefect / "results"


def result_storage(run_dir: str | Path) -> Path:
    """The result storage for a run's tasks: a local folder (Prefect makes it a
    LocalFileSystem block; a Path needs no block saved on the server)."""
    folder = results_dir(run_dir).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _outputs_file(job: StepJob) -> Path:
    return RunLayout(Path(job.run_dir)).prefect / "outputs" / f"{job.step_id}.json"


def fingerprint_path(path: str | Path) -> str:
    """The identity of an input: a file's fingerprint (a webdataset tar's with its sidecar's,
    `data.inputs.input_fingerprint`); a folder's top-level data files'.

    Folders are fingerprinted by their Parquet, weights and JSON files (not recursing,
    so checkpoint sub-folders do not count); temporary files are ignored.
    """
    if str(path).endswith(LIST_SUFFIX):
        return settings_hash({p: fingerprint_path(p) for p in read_list(str(path))})
    path = location(path)
    if path.is_file():
        return input_fingerprint(path)
    if path.is_dir():
        files = sorted({p for pattern in _FINGERPRINT_PATTERNS for p in path.glob(pattern) if p.is_file()})
        return settings_hash({p.name: file_fingerprint(p) for p in files})
    return "missing"


def write_list(run_dir: str | Path, paths: list[str]) -> str:
    """`paths` as a list file in the run's local working folder `run_dir`, named by its
    content (the same list is the same file); pass its path where a task takes shards."""
    text = json.dumps([str(p) for p in paths])
    target = RunLayout(Path(run_dir)).prefect / "lists" / f"{settings_hash(text)}{LIST_SUFFIX}"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(target, text)
    return str(target)


def read_list(path: str) -> list[str]:
    """The shards of a list file made by `write_list`."""
    return json.loads(Path(path).read_text())


def job_cache_key(job: StepJob) -> str:
    """``<step id>-<inputs hash>``: stable across flow runs, changes with inputs or settings."""
    inputs = {str(location(p)): fingerprint_path(p) for p in job.inputs}
    return f"{job.step_id}-{settings_hash(inputs)}"


def output_complete(path: str | Path) -> bool:
    """A shard (``part-*.parquet``) with a completion record whose byte count matches, a
    saved model folder (config.json + weights), or any other existing file."""
    path = location(path)
    if path.suffix == ".parquet" and path.name.startswith("part-"):
        try:
            record = read_completion(path)
        except ValueError:
            return False
        if record is None or not path.is_file():
            return False
        return record.output_bytes is None or record.output_bytes == path.stat().st_size
    if path.is_dir():
        return (path / "config.json").is_file() and any(path.glob("*.safetensors"))
    return path.is_file()


def output_stamp(path: str | Path) -> str | None:
    """What an output is now, cheaply: size and mtime of a file, of a model folder's weights;
    None when it is missing. Any rewrite changes it (a rename, as a moved run, does not)."""
    path = location(path)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path] if path.is_file() else []
    if not files:
        return None
    return ",".join(f"{p.stat().st_size}-{p.stat().st_mtime_ns}" for p in files)


def record_outputs(job: StepJob, outputs: list[str]) -> None:
    """After a step succeeded: note its outputs and their stamps, so a later cache hit can
    tell they are still the ones this step wrote (not rewritten by a run with other settings)."""
    target = _outputs_file(job)
    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(target, json.dumps({"outputs": {p: output_stamp(p) for p in outputs}}, indent=1))


def outputs_still_complete(job: StepJob) -> bool:
    """True when the step's recorded outputs all exist, are complete and unchanged since."""
    target = _outputs_file(job)
    try:
        outputs = json.loads(target.read_text())["outputs"]
    except (OSError, ValueError, KeyError):
        return False
    if not isinstance(outputs, dict):  # an older record without stamps: trust nothing
        return False
    return all(output_complete(p) and output_stamp(p) == stamp for p, stamp in outputs.items())


def step_cache_key(context: Any, parameters: dict[str, Any]) -> str:
    """Prefect `cache_key_fn`: the job's key; drops a cached result whose outputs are gone."""
    job: StepJob = parameters["job"]
    key = job_cache_key(job)
    if not outputs_still_complete(job):
        (results_dir(job.run_dir) / key).unlink(missing_ok=True)
    return key


__all__ = [
    "StepJob",
    "job_cache_key",
    "read_list",
    "write_list",
    "output_complete",
    "output_stamp",
    "record_outputs",
    "result_storage",
    "results_dir",
    "step_cache_key",
]
