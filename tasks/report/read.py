"""What the report reads from a run folder: stage outputs, their completion records,
stage times, training metrics, the filter's scored rows and the captions.

Only files the stages already wrote are read (completion records ``*.done.json``,
``stages.jsonl``, ``models/**/metrics.jsonl``, the filter, caption and ingest shards,
``eval/metrics.json``, a stage folder's ``stage.json``, the synthetic world's truth);
which outputs count is what the latest run used (``current.json``).
A missing input reads as empty, never as an error, so a report can be written mid-run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from data.layout import FILTER_OUTCOMES, INGEST_SPLITS, MODEL_ENTRY, SHARD_STAGES, RunLayout
from data.shards import DONE_SUFFIX, list_shards, read_completion, read_table
from data.storage import location
from data.synth import load_truth
from tasks.lifecycle import STAGE_FILE

# Keys a stage may use in a completion record's `extra` (or a ``stages.jsonl`` line) for its
# wall time in seconds.
TIME_KEYS = ("seconds", "wall_s", "elapsed_s", "duration_s", "time_s")
# Filter subfolders whose rows were scored (failed rows have no score).
SCORED_PARTS = ("kept", "rejected")
_SCORE_COLUMNS = ["key", "image_id", "source", "caption", "itm_score", "keep", "reject_reason", "threshold"]


def stage_folders(run_dir: Path) -> dict[str, Path]:
    """Stage name -> the output folder the latest run used (its ``current.json``), for what exists.

    Names: ``ingest/human``, ``ingest/web``, ``ingest/test``, ``caption``, ``filter``,
    ``assemble``.
    """
    layout = RunLayout(run_dir)
    out: dict[str, Path] = {}
    for split in INGEST_SPLITS:
        if layout.ingest(split).is_dir():
            out[f"ingest/{split}"] = layout.ingest(split)
    for stage in SHARD_STAGES:
        current = layout.current_stage(stage)
        if current is not None:
            out[stage] = current
    return out


@dataclass
class StageAccount:
    """One stage's totals over its completion records."""

    stage: str
    shards: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    seconds: float | None = None


def _record_seconds(extra: dict[str, Any]) -> float | None:
    for key in TIME_KEYS:
        if isinstance(extra.get(key), (int, float)):
            return float(extra[key])
    return None


def stage_accounting(run_dir: Path) -> list[StageAccount]:
    """Sum counts and wall time of every completion record, stage by stage.

    A filter's kept / rejected / failed subfolders count as one stage; a record that
    appears in several of them (same shard name) is counted once.
    """
    accounts: list[StageAccount] = []
    for stage, folder in stage_folders(run_dir).items():
        acc = StageAccount(stage=stage)
        seen: set[str] = set()
        parts = [folder] + [folder / p for p in FILTER_OUTCOMES]
        for part in parts:
            for done in sorted(part.glob("*" + DONE_SUFFIX)) if part.is_dir() else []:
                record = read_completion(done)
                if record is None or done.name in seen:
                    continue
                seen.add(done.name)
                acc.shards += 1
                for k, v in record.counts.items():
                    acc.counts[k] = acc.counts.get(k, 0) + int(v)
                secs = _record_seconds(record.extra)
                if secs is not None:
                    acc.seconds = (acc.seconds or 0.0) + secs
        if acc.shards:
            accounts.append(acc)
    return accounts


def read_stage_times(run_dir: Path) -> dict[str, float]:
    """Stage -> seconds from ``stages.jsonl`` (last line per stage wins; torn lines skipped).

    The file is optional: one JSON object per line ``{"stage": ..., "seconds": ...}`` (a
    flow's stage rows), used for stages whose completion records carry no time.
    """
    path = RunLayout(run_dir).stages_log
    out: dict[str, float] = {}
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("stage"), str):
            secs = _record_seconds(row)
            if secs is not None:
                out[row["stage"]] = secs
    return out


def read_training_metrics(run_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """Model name (``pretrain``, ``filter``, ``round-2/final`` ...) -> its ``metrics.jsonl`` lines.

    The models are those the latest run used (``current.json``); a run folder without a
    record (made by hand) shows every ``models/**/metrics.jsonl``. Lines that are not JSON
    objects (a half-written last line after a crash) are skipped.
    """
    layout = RunLayout(run_dir)
    recorded = {name.removeprefix(MODEL_ENTRY): layout.resolve(path).parent / "metrics.jsonl"
                for name, path in layout.read_current().items() if name.startswith(MODEL_ENTRY)}  # fmt: skip
    if not recorded:
        recorded = {p.parent.relative_to(layout.models).as_posix(): p for p in sorted(layout.models.glob("**/metrics.jsonl"))}
    out: dict[str, list[dict[str, Any]]] = {}
    for name, path in recorded.items():
        rows = []
        for line in path.read_text().splitlines() if path.is_file() else []:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                rows.append(row)
        if rows:
            out[name] = rows
    return out


def read_scored(filter_dir: Path) -> pa.Table | None:
    """The filter's kept + rejected rows (no image bytes) with a `shard` column; None when there are none."""
    tables = []
    for part in SCORED_PARTS:
        for path in list_shards(filter_dir / part):
            t = read_table(path, "scored", columns=_SCORE_COLUMNS)
            tables.append(t.append_column("shard", pa.array([path.name] * t.num_rows, pa.string())))
    return pa.concat_tables(tables) if tables else None


def read_image_bytes(filter_dir: Path, image_ids: set[str]) -> dict[str, bytes]:
    """Image id -> the encoded image of its first scored row in the filter output, for `image_ids`."""
    out: dict[str, bytes] = {}
    for part in SCORED_PARTS:
        for path in list_shards(filter_dir / part):
            t = read_table(path, "scored", columns=["image_id", "jpg"])
            mask = pc.is_in(t["image_id"], pa.array(sorted(image_ids), pa.string()))
            for img, data in zip(*(t.filter(mask)[c].to_pylist() for c in ("image_id", "jpg")), strict=True):
                if data is not None and img not in out:
                    out[img] = data
    return out


def read_ok_captions(folder: Path | None, kind: str) -> list[str]:
    """Captions of the ok rows of every shard in `folder` (of dataset `kind`); [] without a folder."""
    if folder is None:
        return []
    out: list[str] = []
    for path in list_shards(folder):
        t = read_table(path, kind, columns=["caption", "status"])
        ok = pc.equal(t["status"], "ok")
        out += [c for c in t.filter(ok)["caption"].to_pylist() if c is not None]
    return out


def read_web_noise(run_dir: Path) -> dict[str, bool] | None:
    """Web key -> whether its caption is noise (swapped or junk) in the synthetic world's
    truth (`RunLayout.truth_dir`); None for a run without truth."""
    folder = RunLayout(run_dir).truth_dir()
    if folder is None:
        return None
    truth = load_truth(folder)
    return {key: truth.is_noisy(key) for key in truth.web_kinds}


def read_stage_settings(folder: Path | None) -> dict[str, Any]:
    """The settings a stage folder was made with (its ``stage.json``); {} without one."""
    path = location(folder) / STAGE_FILE if folder is not None else None
    if path is None or not path.is_file():
        return {}
    try:
        return dict(json.loads(path.read_text()).get("settings", {}))
    except (json.JSONDecodeError, AttributeError):
        return {}


def read_eval_metrics(run_dir: Path) -> dict[str, Any] | None:
    """The run's ``eval/metrics.json`` as a dict, or None before any evaluation."""
    path = RunLayout(run_dir).metrics
    return json.loads(path.read_text()) if path.is_file() else None


def read_video_metrics(run_dir: Path) -> dict[str, Any] | None:
    """The run's ``eval/video.json`` (zero-shot video, per model) as a dict, or None."""
    path = RunLayout(run_dir).video_metrics
    return json.loads(path.read_text()) if path.is_file() else None
