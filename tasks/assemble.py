"""The assemble stage: D' = human pairs + kept web pairs + kept synthetic pairs.

Inputs are read in the order given (human first, so a human pair wins a tie), each a
``pairs`` shard (human, or any pairs taken as they are) or a ``scored`` shard from the
filter (rows with keep = false are dropped as rejected). Failed rows are dropped as
failed; exact duplicate pairs (same image sha256 and the same caption after lowercasing
and collapsing whitespace) are dropped after their first occurrence and counted.

The survivors are resharded to `rows_per_shard` rows into
``<out>/<hash>/part-NNNNN.parquet`` (kind ``dataset``, provenance columns kept: source,
itm_score, judge, threshold, producer, candidate). The folder hash covers the settings
AND the input bytes, since every output shard depends on every input. Each input row is
attributed to the output shard that was filling when it was read, so every completion
record holds input = kept + rejected + failed for its shard, and the sums over shards
are the totals. A rerun recomputes the plan (cheap, no model) and rewrites only shards
whose record is missing.

With `sources` set, the dataset takes those sources one after another, each over all
inputs in order (so every kept web pair comes before any synthetic one, and a source
listed earlier wins a duplicate tie); rows of other sources are rejected as
``excluded_source`` and counted in the last shard.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data.inputs import expand_item, read_pairs
from data.schema import SCORED, SchemaError, conform
from data.shards import combine_fingerprints, file_fingerprint, is_complete, read_completion, read_table, shard_name
from tasks.execution import ExecutionConfig, progress_bar, require, semantic_settings
from tasks.lifecycle import ShardJob, ShardOutput, ShardStats, StageStats, check_accounting, run_stage, stage_dir

# Outcome codes per input row.
KEPT, DUPLICATE, REJECTED, FAILED, EXCLUDED = 0, 1, 2, 3, 4
_DEDUPE_READ = ["key", "status", "caption", "sha256", "jpg"]


@dataclass
class AssembleConfig:
    """Assemble settings; all but `execution` enter the output folder's hash. The run
    config's `assemble:` block is this class (`flows.config.RunConfig`)."""

    __pydantic_config__ = {"extra": "forbid"}  # a misspelt field in a run config is an error

    rows_per_shard: int = 10_000  # rows per output shard of D'
    dedupe: bool = True  # drop exact duplicate (image sha256, normalised caption) pairs
    sources: tuple[str, ...] = ()  # only these row sources, one after another (see module doc); () = all, in input order
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)

    def __post_init__(self) -> None:
        require(self.rows_per_shard >= 1, f"rows_per_shard must be >= 1, got {self.rows_per_shard}")


@dataclass
class _Plan:
    """Per segment (an input file, or with `sources` the rows of one source in one file),
    the outcome of each of its rows and the output shard it is attributed to."""

    files: list[Path]  # per segment, its file (a file recurs with `sources`)
    rows: list[np.ndarray]  # per segment (n_i,) row indices in its file
    outcome: list[np.ndarray]  # per segment (n_i,) int8 codes
    shard: list[np.ndarray]  # per segment (n_i,) output shard index
    n_shards: int


def _is_scored(path: Path) -> bool:
    try:
        names = set(pq.read_schema(path).names)
    except (OSError, pa.ArrowException) as exc:
        raise SchemaError(f"{path}: not a readable Parquet file ({exc})") from exc
    return {f.name for f in SCORED} <= names


def _read(path: Path, columns: list[str] | None = None) -> pa.Table:
    """A pairs or scored shard as a `dataset`-shaped table (pairs rows count as kept)."""
    if _is_scored(path):
        return read_table(path, "scored", columns=columns + ["keep"] if columns else None)
    table = read_pairs(path, columns=columns)
    return table.append_column("keep", pa.array(np.ones(table.num_rows, dtype=bool)))


def normalised_caption(captions: pa.ChunkedArray | pa.Array) -> pa.Array:
    """Lowercase, whitespace runs collapsed to one space, trimmed; null -> ""."""
    text = pc.utf8_lower(pc.fill_null(captions, ""))
    return pc.utf8_trim_whitespace(pc.replace_substring_regex(text, r"\s+", " "))


def image_sha256(table: pa.Table) -> pa.Array:
    """The sha256 column, computed from the image bytes where it is missing."""
    sha = table.column("sha256").combine_chunks()
    missing = np.flatnonzero(pc.and_(pc.is_null(sha), pc.is_valid(table.column("jpg"))).to_numpy(zero_copy_only=False))
    if len(missing) == 0:
        return sha
    values = sha.to_pylist()
    jpg = table.column("jpg")
    for i in missing:  # only rows whose producer did not hash them
        values[i] = hashlib.sha256(jpg[int(i)].as_py()).hexdigest()
    return pa.array(values, pa.string())


def _outcomes(table: pa.Table, seen: set[bytes], dedupe: bool) -> np.ndarray:
    """Outcome code per row; `seen` (pair digests) carries across files."""
    failed = ~np.asarray(
        pc.fill_null(pc.and_(pc.equal(table.column("status"), "ok"), pc.is_valid(table.column("jpg"))), False)
        .to_numpy(zero_copy_only=False), dtype=bool,
    )
    keep = np.asarray(pc.fill_null(table.column("keep"), False).to_numpy(zero_copy_only=False), dtype=bool)
    outcome = np.where(failed, FAILED, np.where(keep, KEPT, REJECTED)).astype(np.int8)
    if dedupe:
        pairs = pc.binary_join_element_wise(image_sha256(table).cast(pa.string()), normalised_caption(table.column("caption")), "\x00")
        for i in np.flatnonzero(outcome == KEPT):
            digest = hashlib.blake2b(pairs[int(i)].as_py().encode(), digest_size=16).digest()
            if digest in seen:
                outcome[i] = DUPLICATE
            else:
                seen.add(digest)
    return outcome


def _segments(files: list[Path], cfg: AssembleConfig) -> list[tuple[Path, np.ndarray | None, bool]]:
    """(file, row indices or None for all, excluded) in reading order: each file whole, or with
    `sources` the rows of each source over all files, then each file's other rows (excluded)."""
    if not cfg.sources:
        return [(f, None, False) for f in files]
    source = {f: _read(f, ["source"]).column("source") for f in files}
    wanted = pa.array(cfg.sources, pa.string())

    def where(mask: pa.ChunkedArray) -> np.ndarray:
        return np.flatnonzero(pc.fill_null(mask, False).to_numpy(zero_copy_only=False))

    taken = [(f, where(pc.equal(source[f], s)), False) for s in cfg.sources for f in files]
    return taken + [(f, where(pc.invert(pc.is_in(source[f], value_set=wanted))), True) for f in files]


def plan(files: list[Path], cfg: AssembleConfig) -> _Plan:
    """Read the dedupe columns of every input and decide each row's fate and shard."""
    seen: set[bytes] = set()
    read: list[Path] = []
    rows: list[np.ndarray] = []
    outcomes: list[np.ndarray] = []
    for f, segment, excluded in _segments(files, cfg):
        if excluded:
            outcome = np.full(len(segment), EXCLUDED, dtype=np.int8)
        else:
            table = _read(f, _DEDUPE_READ)
            if segment is None:
                segment = np.arange(table.num_rows)
            else:
                table = table.take(pa.array(segment, pa.int64()))
            outcome = _outcomes(table, seen, cfg.dedupe)
        read.append(f)
        rows.append(segment)
        outcomes.append(outcome)
    kept_total = sum(int((o == KEPT).sum()) for o in outcomes)
    n_shards = max(1, -(-kept_total // cfg.rows_per_shard))
    shards, before = [], 0
    for outcome in outcomes:
        kept = (outcome == KEPT).astype(np.int64)
        survivors_before = before + np.cumsum(kept) - kept  # kept rows read before this row
        shards.append(np.minimum(survivors_before // cfg.rows_per_shard, n_shards - 1))
        before += int(kept.sum())
    return _Plan(files=read, rows=rows, outcome=outcomes, shard=shards, n_shards=n_shards)


def _shard_counts(p: _Plan, j: int) -> dict[str, int]:
    codes = np.concatenate([o[s == j] for o, s in zip(p.outcome, p.shard)])
    counts = {
        "input": len(codes),
        "kept": int((codes == KEPT).sum()),
        "rejected": int(((codes == DUPLICATE) | (codes == REJECTED) | (codes == EXCLUDED)).sum()),
        "failed": int((codes == FAILED).sum()),
        "duplicate": int((codes == DUPLICATE).sum()),
        "rejected_by_filter": int((codes == REJECTED).sum()),
    }
    if (codes == EXCLUDED).any():
        counts["excluded_source"] = int((codes == EXCLUDED).sum())
    check_accounting(counts, f"assemble shard {j}")
    return counts


def _dataset_rows(table: pa.Table, rows: np.ndarray) -> pa.Table:
    """The chosen rows as `dataset` rows with their sha256 filled in."""
    part = table.take(pa.array(rows, pa.int64()))
    part = part.set_column(part.schema.get_field_index("sha256"), "sha256", image_sha256(part))
    return conform(part, "dataset")


def _select(p: _Plan, j: int, cache: dict[Path, pa.Table]) -> ShardOutput:
    """The stage's own work for output shard j: gather its kept rows from the inputs (one
    input file held at a time)."""
    parts = []
    for path, segment, outcome, shard in zip(p.files, p.rows, p.outcome, p.shard):
        rows = segment[(shard == j) & (outcome == KEPT)]
        if len(rows) == 0:
            continue
        if path not in cache:
            cache.clear()
            cache[path] = _read(path)
        parts.append(_dataset_rows(cache[path], rows))
    table = pa.concat_tables(parts) if parts else conform(_read(p.files[0]).slice(0, 0), "dataset")
    extra = {"shards": p.n_shards, "inputs": [str(f) for f in p.files]}
    return ShardOutput(tables={"dataset": table}, counts=_shard_counts(p, j), extra=extra)


def _complete(folder: Path, fingerprint: str, digest: str) -> int | None:
    """The shard count when every output shard is complete, else None."""
    first = folder / shard_name(0)
    record = read_completion(first) if first.is_file() else None
    if record is None:
        return None
    total = int(record.extra.get("shards", 0))
    ok = all(is_complete(folder / shard_name(j), fingerprint, digest) for j in range(total))
    return total if ok else None


def run_assemble(inputs: list[Path], out_dir: Path, cfg: AssembleConfig) -> StageStats:
    """Assemble D' from `inputs` (files, folders or globs, in priority order) into
    ``out_dir/<hash>/``; a rerun skips shards already complete (and, when all are, the plan)."""
    files = list(dict.fromkeys(p for item in inputs for p in expand_item(item)))
    fingerprint = combine_fingerprints([file_fingerprint(f) for f in files])
    settings: dict[str, Any] = {"stage": "assemble", **semantic_settings(cfg), "inputs": fingerprint}
    if not cfg.sources:
        settings.pop("sources")  # the option's default: the folders made before it keep their hash
    folder, digest = stage_dir(out_dir, settings)
    stats = StageStats(stage="assemble", output=folder, settings_hash=digest)
    total = _complete(folder, fingerprint, digest)
    if total is not None:
        for j in range(total):
            record = read_completion(folder / shard_name(j))
            stats.shards.append(ShardStats(shard=shard_name(j), source="", counts=dict(record.counts), skipped=True))
        return stats
    p = plan(files, cfg)
    cache: dict[Path, pa.Table] = {}
    jobs = [
        ShardJob(name=shard_name(j), source=f"assemble {shard_name(j)}", outputs={"dataset": folder / shard_name(j)},
                 kind="dataset", fingerprint=fingerprint, digest=digest, work=functools.partial(_select, p, j, cache))
        for j in range(p.n_shards)
    ]  # fmt: skip
    with progress_bar(p.n_shards, "assemble", cfg.execution.progress) as bar:
        return run_stage(stats, jobs, on_done=lambda: bar.update(1))
