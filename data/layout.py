"""The run folder's layout: every path in a run, and the record of which outputs are current.

One owner for what lies where in ``runs/<run>/`` (the flow, the stage commands, the
catalog, the report and the evaluation all ask `RunLayout`), and for ``current.json``:
the settings-hash folder of each stage (and the model of each role) that the latest run
used. A stage folder keeps one ``<settings-hash>/`` sub-folder per settings ever run, so
"which one is current" is a fact the writer records, never a guess from file times.

Paths stored in the record are relative to the run folder, so a run folder that is
moved or copied elsewhere still reads, and resumes, as it was. The root may be a local
path or a URL (``s3://bucket/run``, `data.storage`): every path below is of the same kind.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from data.shards import write_atomic
from data.storage import Location, RemotePath, is_url, location

CURRENT_FILE = "current.json"
_RECORD_VERSION = 1
SHARD_STAGES = ("caption", "filter", "assemble")  # stages with <settings-hash>/ output folders
INGEST_SPLITS = ("human", "web", "test")
FILTER_OUTCOMES = ("kept", "rejected", "failed")
MODEL_ENTRY = "model/"  # record entries of trained models: ``model/pretrain``, ``model/round-2/final``


class LayoutError(ValueError):
    """A run folder whose current outputs cannot be told (the message names the fix)."""


@dataclass(frozen=True)
class RunLayout:
    """Where everything of one run lives, under `root`."""

    root: Location

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", location(self.root))

    # ------------------------------------------------------------------ inputs

    @property
    def world(self) -> Location:
        """The synthetic world the demo generates (``capfilt synth`` layout)."""
        return self.root / "world"

    def ingest(self, split: str) -> Location:
        """``ingest/<split>``: the pair shards a split was brought in as."""
        if split not in INGEST_SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {INGEST_SPLITS}")
        return self.root / "ingest" / split

    @property
    def truth(self) -> Location:
        """The synthetic world's truth (read by evaluation only)."""
        return self.root / "truth"

    def truth_dir(self) -> Location | None:
        """The truth folder when the run has one (``truth/``, else ``world/truth/``)."""
        for candidate in (self.truth, self.world / "truth"):
            if candidate.is_dir():
                return candidate
        return None

    # ------------------------------------------------------------------ models

    @property
    def models(self) -> Location:
        return self.root / "models"

    @property
    def tokenizer(self) -> Location:
        """The vocabulary every scratch model of the run shares."""
        return self.models / "tokenizer"

    def model_dir(self, role: str, round_index: int = 1) -> Location:
        """A training stage's folder: ``models/<role>`` in round 1, ``models/round-<r>/<role>`` after."""
        return self.models / model_name(role, round_index)

    # ------------------------------------------------------------------ stage outputs

    def stage(self, stage: str) -> Location:
        """A shard stage's folder, holding one ``<settings-hash>/`` per settings run."""
        if stage not in SHARD_STAGES:
            raise ValueError(f"unknown shard stage {stage!r}; expected one of {SHARD_STAGES}")
        return self.root / stage

    @property
    def eval_dir(self) -> Location:
        return self.root / "eval"

    @property
    def metrics(self) -> Location:
        return self.eval_dir / "metrics.json"

    @property
    def video_metrics(self) -> Location:
        """The zero-shot video evaluation (final and pretrain models on synthetic clips)."""
        return self.eval_dir / "video.json"

    @property
    def report_md(self) -> Location:
        return self.root / "report.md"

    def gallery(self, name: str) -> Location:
        """``gallery-<name>.html``: a `capfilt browse` page written next to the report."""
        return self.root / f"gallery-{name}.html"

    @property
    def stages_log(self) -> Location:
        """``stages.jsonl``: one line per stage that did work (wall times for the report)."""
        return self.root / "stages.jsonl"

    @property
    def run_record(self) -> Location:
        """``run.json``: the record of a run that ended normally (`flows.run_record`)."""
        return self.root / "run.json"

    @property
    def prefect(self) -> Location:
        """Prefect's persisted results and output records for this run."""
        return self.root / ".prefect"

    # ------------------------------------------------------------------ the current record

    @property
    def current_file(self) -> Location:
        return self.root / CURRENT_FILE

    def relative(self, path: str | Path | RemotePath) -> str:
        """`path` relative to the run folder when it lies inside it, else as given (absolute)."""
        path = location(path)
        if isinstance(path, RemotePath) != isinstance(self.root, RemotePath):
            return str(path)
        try:
            return path.resolve().relative_to(self.root.resolve()).as_posix()
        except ValueError:
            return str(path)

    def resolve(self, stored: str) -> Location:
        """A path as stored in the record -> a path to open (relative ones are under `root`)."""
        if is_url(stored):
            return location(stored)
        path = Path(stored)
        return path if path.is_absolute() else self.root / path.as_posix()

    def read_current(self) -> dict[str, str]:
        """The record's entries (name -> stored path); empty when there is no record yet."""
        try:
            raw = json.loads(self.current_file.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise LayoutError(f"{self.current_file}: unreadable ({exc}); delete it and rerun the run") from exc
        entries = raw.get("current") if isinstance(raw, dict) else None
        if not isinstance(entries, dict):
            raise LayoutError(f"{self.current_file}: no 'current' mapping; delete it and rerun the run")
        return {str(k): str(v) for k, v in entries.items()}

    def write_current(self, entries: dict[str, str | Path]) -> None:
        """Replace the record with `entries` (name -> path), atomically; paths stored relative."""
        stored = {name: self.relative(path) for name, path in sorted(entries.items())}
        self.root.mkdir(parents=True, exist_ok=True)
        write_atomic(self.current_file, json.dumps({"version": _RECORD_VERSION, "current": stored}, indent=2) + "\n")

    def mark_current(self, name: str, path: str | Path) -> None:
        """Record `path` as the current output `name` (``caption``, ``filter``, ``model/final`` ...),
        keeping the other entries: what a standalone stage command does."""
        self.write_current({**self.read_current(), name: path})

    def current(self, name: str) -> Location | None:
        """The recorded output `name`, or None when the record has no such entry."""
        stored = self.read_current().get(name)
        return self.resolve(stored) if stored is not None else None

    def current_stage(self, stage: str) -> Location | None:
        """The settings-hash folder of `stage` that the latest run used.

        From the record; a run folder without one (made by hand, or by an older version)
        is read only when the stage holds a single settings folder. Several, unrecorded,
        raise LayoutError naming them: which is current cannot be told.
        """
        recorded = self.current(stage)
        if recorded is not None:
            return recorded if recorded.is_dir() else None
        folder = self.stage(stage)
        hashes = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))) if folder.is_dir() else []
        if len(hashes) <= 1:
            return hashes[0] if hashes else None
        raise LayoutError(
            f"{folder} holds {len(hashes)} settings folders ({', '.join(p.name for p in hashes)}) and "
            f"{self.current_file} does not say which is current; rerun `capfilt run` on this folder, or "
            f"record one with `capfilt {stage} --output {folder}`"
        )


def model_name(role: str, round_index: int = 1) -> str:
    """``filter`` in round 1, ``round-2/filter`` after: the name of a model under ``models/``."""
    if round_index < 1:
        raise ValueError(f"rounds count from 1, got {round_index}")
    return role if round_index == 1 else f"round-{round_index}/{role}"


def stage_layout(output: str | Path | RemotePath, stage: str) -> RunLayout | None:
    """The run whose `stage` folder is `output` (``RUN/filter`` -> RUN), or None for a folder
    outside any run layout (a standalone stage command writing elsewhere)."""
    output = location(output)
    return RunLayout(output.parent) if output.name == stage else None
