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

With `threshold` (or `top_k`) set, the scored inputs' keep is decided anew from their
stored ``itm_score`` by the filter's own rule (`tasks.decide`), over all scored inputs
together (top-k ranks an image's synthetic captions across files): a new threshold
re-decides in seconds and never runs a model. Pass the filter's ``rejected`` folders
too, since a row rejected at 0.5 may pass at 0.3. Failed rows stay failed, rows without
a score (empty caption) stay rejected, and the D' rows carry the threshold used. With
both unset the filter's stored verdicts are taken as they are (and the two fields stay
out of the folder's hash, so folders made before them keep their name).
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data.inputs import expand_item, input_fingerprint, read_pairs
from data.webdataset_input import is_webdataset_shard
from data.schema import SCORED, conform
from data.shards import combine_fingerprints, is_complete, parquet_schema, read_completion, read_table, shard_name
from data.storage import Location, location
from tasks.decide import DecisionRule, decide, nonempty_captions
from tasks.execution import progress_bar, semantic_settings
from tasks.stage_config import AssembleConfig
from tasks.lifecycle import ShardJob, ShardOutput, ShardStats, StageStats, check_accounting, run_stage, stage_dir

# Outcome codes per input row.
KEPT, DUPLICATE, REJECTED, FAILED, EXCLUDED = 0, 1, 2, 3, 4
_DEDUPE_READ = ["key", "status", "caption", "sha256", "jpg"]
_DECIDE_READ = ["image_id", "source", "status", "caption", "candidate", "itm_score", "threshold"]


@dataclass
class _Plan:
    """Per segment (an input file, or with `sources` the rows of one source in one file),
    the outcome of each of its rows and the output shard it is attributed to."""

    files: list[Location]  # per segment, its file (a file recurs with `sources`)
    rows: list[np.ndarray]  # per segment (n_i,) row indices in its file
    outcome: list[np.ndarray]  # per segment (n_i,) int8 codes
    shard: list[np.ndarray]  # per segment (n_i,) output shard index
    n_shards: int
    redecided: frozenset[Location] = frozenset()  # files whose verdicts were decided anew
    threshold: float | None = None  # the threshold the re-decided rows carry (None: their own)


def _is_scored(path: Location) -> bool:
    if is_webdataset_shard(path):
        return False
    names = set(parquet_schema(path).names)
    return {f.name for f in SCORED} <= names


def _read(path: Location, columns: list[str] | None = None) -> pa.Table:
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


def _outcomes(table: pa.Table, seen: set[bytes], dedupe: bool, keep: np.ndarray | None = None) -> np.ndarray:
    """Outcome code per row (`keep`: a re-decided verdict, else the table's own); `seen`
    (pair digests) carries across files."""
    failed = ~np.asarray(
        pc.fill_null(pc.and_(pc.equal(table.column("status"), "ok"), pc.is_valid(table.column("jpg"))), False)
        .to_numpy(zero_copy_only=False), dtype=bool,
    )
    if keep is None:
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


def _segments(files: list[Location], cfg: AssembleConfig) -> list[tuple[Location, np.ndarray | None, bool]]:
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


def _floats(column: pa.ChunkedArray) -> np.ndarray:
    """A float32 column as float32 (null -> NaN): compared with a threshold exactly as the filter did."""
    return np.asarray(pc.fill_null(column, np.nan).to_numpy(zero_copy_only=False), dtype=np.float32)


def _equals(column: pa.ChunkedArray, value: str) -> np.ndarray:
    return np.asarray(pc.fill_null(pc.equal(column, value), False).to_numpy(zero_copy_only=False), dtype=bool)


def redecide(files: list[Location], cfg: AssembleConfig) -> dict[Location, np.ndarray]:
    """Scored file -> (n,) keep of each of its rows, decided anew from the stored scores by
    `cfg.threshold` (else each row's stored threshold) and `cfg.top_k`, over all scored
    files together (an image's synthetic captions may be in a kept and a rejected shard)."""
    scored = [f for f in files if _is_scored(f)]
    if not scored:
        return {}
    tables = [read_table(f, "scored", columns=_DECIDE_READ) for f in scored]
    t = pa.concat_tables(tables)
    threshold = _floats(t.column("threshold")) if cfg.threshold is None else cfg.threshold
    image = np.unique(np.asarray(t.column("image_id").to_pylist(), dtype=object), return_inverse=True)[1]
    candidate = np.asarray(pc.fill_null(t.column("candidate"), -1).to_numpy(zero_copy_only=False), dtype=np.int64)
    decision = decide(
        score=_floats(t.column("itm_score")),
        failed=~_equals(t.column("status"), "ok"),
        nonempty=nonempty_captions(t.column("caption")),
        is_syn=_equals(t.column("source"), "synthetic"),
        image=image,
        rule=DecisionRule(threshold, cfg.top_k),
        tiebreak=candidate,  # an image's captions in candidate order, as the filter met them
    )
    ends = np.cumsum([table.num_rows for table in tables])[:-1]
    return dict(zip(scored, np.split(decision.keep, ends), strict=True))


def plan(files: list[Location], cfg: AssembleConfig) -> _Plan:
    """Read the dedupe columns of every input and decide each row's fate and shard."""
    verdicts = redecide(files, cfg) if cfg.redecides else {}
    seen: set[bytes] = set()
    read: list[Location] = []
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
            keep = verdicts[f][segment] if f in verdicts else None
            outcome = _outcomes(table, seen, cfg.dedupe, keep)
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
    return _Plan(files=read, rows=rows, outcome=outcomes, shard=shards, n_shards=n_shards,
                 redecided=frozenset(verdicts), threshold=cfg.threshold)  # fmt: skip


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


def _dataset_rows(table: pa.Table, rows: np.ndarray, redecided: bool = False, threshold: float | None = None) -> pa.Table:
    """The chosen rows as `dataset` rows with their sha256 filled in; re-decided rows are
    marked kept, without a reject reason, with the threshold they were kept at."""
    part = table.take(pa.array(rows, pa.int64()))
    part = part.set_column(part.schema.get_field_index("sha256"), "sha256", image_sha256(part))
    if redecided:
        n = part.num_rows
        part = part.set_column(part.schema.get_field_index("keep"), "keep", pa.array(np.ones(n, dtype=bool)))
        part = part.set_column(part.schema.get_field_index("reject_reason"), "reject_reason", pa.nulls(n, pa.string()))
        if threshold is not None:
            part = part.set_column(part.schema.get_field_index("threshold"), "threshold",
                                   pa.array(np.full(n, threshold, dtype=np.float32)))  # fmt: skip
    return conform(part, "dataset")


def _select(p: _Plan, j: int, cache: dict[Location, pa.Table]) -> ShardOutput:
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
        parts.append(_dataset_rows(cache[path], rows, path in p.redecided, p.threshold))
    table = pa.concat_tables(parts) if parts else conform(_read(p.files[0]).slice(0, 0), "dataset")
    extra = {"shards": p.n_shards, "inputs": [str(f) for f in p.files]}
    return ShardOutput(tables={"dataset": table}, counts=_shard_counts(p, j), extra=extra)


def _complete(folder: Location, fingerprint: str, digest: str) -> int | None:
    """The shard count when every output shard is complete, else None."""
    first = folder / shard_name(0)
    record = read_completion(first) if first.is_file() else None
    if record is None:
        return None
    total = int(record.extra.get("shards", 0))
    ok = all(is_complete(folder / shard_name(j), fingerprint, digest) for j in range(total))
    return total if ok else None


def assemble_settings(cfg: AssembleConfig) -> dict[str, Any]:
    """The settings that shape D' (all but `execution`), without the options left at their
    default (`sources`, `threshold`, `top_k`): folders made before those options keep their hash."""
    settings = semantic_settings(cfg)
    unset = {"sources": not cfg.sources, "threshold": cfg.threshold is None, "top_k": cfg.top_k is None}
    for name in (name for name, default in unset.items() if default):
        settings.pop(name)
    return settings


def run_assemble(inputs: list[Location], out_dir: Location, cfg: AssembleConfig) -> StageStats:
    """Assemble D' from `inputs` (files, folders or globs, in priority order) into
    ``out_dir/<hash>/``; a rerun skips shards already complete (and, when all are, the plan)."""
    files = list(dict.fromkeys(p for item in inputs for p in expand_item(item)))
    fingerprint = combine_fingerprints([input_fingerprint(f) for f in files])
    settings: dict[str, Any] = {"stage": "assemble", **assemble_settings(cfg), "inputs": fingerprint}
    folder, digest = stage_dir(location(out_dir), settings)
    stats = StageStats(stage="assemble", output=folder, settings_hash=digest)
    total = _complete(folder, fingerprint, digest)
    if total is not None:
        for j in range(total):
            record = read_completion(folder / shard_name(j))
            stats.shards.append(ShardStats(shard=shard_name(j), source="", counts=dict(record.counts), skipped=True))
        return stats
    p = plan(files, cfg)
    cache: dict[Location, pa.Table] = {}
    jobs = [
        ShardJob(name=shard_name(j), source=f"assemble {shard_name(j)}", outputs={"dataset": folder / shard_name(j)},
                 kind="dataset", fingerprint=fingerprint, digest=digest, work=functools.partial(_select, p, j, cache))
        for j in range(p.n_shards)
    ]  # fmt: skip
    with progress_bar(p.n_shards, "assemble", cfg.execution.progress, unit="shard") as bar:
        return run_stage(stats, jobs, on_done=lambda: bar.update(1))
