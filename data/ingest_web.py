"""Web pairs from a URL list, downloaded by img2dataset and normalised into pairs shards.

`ingest_web(url_list, out, cfg)` writes, under `out`:

```
out/_img2dataset/input.parquet      the list as read (capfilt_key, image_id, url, caption)
out/_img2dataset/manifest.json      the list's fingerprint and the download settings
out/_img2dataset/raw/NNNNN.parquet  img2dataset's own output (+ NNNNN_stats.json)
out/part-NNNNN.parquet (+ .done.json)   kind pairs: every input row, ok or failed
```

Shard NNNNN of ours holds exactly input rows [N * rows_per_shard, (N+1) * rows_per_shard),
so every URL is accounted for: a row img2dataset reports failed keeps its status and
error message, and a row it never emitted becomes failed with kind ``not_emitted``.
A rerun is safe: img2dataset skips raw shards it finished, and shards of ours whose
completion record matches are not rewritten. `retry_failed=True` downloads only the
rows that failed before (into ``_img2dataset/retry/``) and replaces them in place by
key, so nothing is duplicated. Ingesting a changed list into the same folder discards
img2dataset's raw output and redoes the shards whose rows changed.

img2dataset uses multiprocessing (spawn), so it runs in a child Python process.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from data.images import DEFAULT_MAX_PIXELS
from data.img2dataset import KEY_COLUMN, raw_rows, read_img2dataset, to_pairs
from data.ingest import IngestStats, RawRow, normalise_rows, write_pairs_shard
from data.schema import conform
from data.storage import Location, location
from data.webdataset_input import webdataset_rows
from data.shards import (
    CompletionRecord,
    atomic_path,
    completion_path,
    file_fingerprint,
    is_complete,
    list_shards,
    read_completion,
    read_table,
    settings_hash,
    shard_name,
)

WORK_DIR = "_img2dataset"
NOT_EMITTED = "not_emitted"
BAD_URL = "bad_url"  # failure kind of a URL that is never fetched (empty, or not http/https)
_FETCHABLE_SCHEMES = ("http", "https")  # urllib would also read file://, ftp:// and data: URLs
_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
_FORMAT_ALIASES = {"json": "jsonl"}
_LOG_TAIL_CHARS = 3000
_POLL_S = 1.0  # seconds between `run_img2dataset`'s polls
_SERVER_START_S = 15.0


@dataclass(frozen=True)
class WebIngestConfig:
    """How a URL list is read and downloaded."""

    url_col: str = "url"
    caption_col: str | None = "caption"  # None: the list has no captions
    key_col: str | None = None  # None: use a "key" column if present, else key_prefix + row number
    image_id_col: str | None = None  # None: use an "image_id" column if present, else the key
    input_format: str | None = None  # csv | tsv | jsonl | parquet; None: from the file suffix
    source: str = "web"
    key_prefix: str = "web-"
    rows_per_shard: int = 1000
    processes: int = 1  # img2dataset processes_count
    threads: int = 16  # img2dataset thread_count (per process)
    timeout_s: int = 10
    retries: int = 0  # img2dataset's per-URL retries
    image_size: int = 256
    resize_mode: str = "no"  # img2dataset resize_mode; "no" keeps the original size
    # With resize_mode "no": store the downloaded bytes untouched (our decoder checks them,
    # so an HTML page or a truncated file fails as "undecodable: ..."). False, or any
    # resize: img2dataset decodes and re-encodes (bad bytes fail as "failed_to_resize").
    keep_original_bytes: bool = True
    encode_format: str = "jpg"  # img2dataset's encode format (also the name of its bytes column)
    encode_quality: int | None = None  # None: 95 for jpg/webp, 3 (compression) for png
    skip_reencode: bool = True  # keep original bytes when already in encode_format
    max_pixels: int = DEFAULT_MAX_PIXELS
    run_timeout_s: float | None = None  # stop an img2dataset run that takes longer (None: no limit)

    def download_settings(self) -> dict:
        """The settings that decide what a shard holds (not how fast it is made)."""
        skip = {"processes", "threads", "run_timeout_s"}
        return {k: v for k, v in asdict(self).items() if k not in skip}


# ---------------------------------------------------------------- reading URL lists


def read_url_list(path: Path, cfg: WebIngestConfig) -> pa.Table:
    """The URL list as a table (capfilt_key, image_id, url, caption), all strings.

    Errors name the file and the missing column or the duplicated keys.
    """
    path = Path(path)
    table = read_list_table(path, cfg.input_format)
    names = table.column_names

    def column(name: str | None, what: str) -> pa.Array | None:
        if name is None:
            return None
        if name not in names:
            raise ValueError(f"{path}: no {what} column {name!r} (columns: {names}); pass the right column name")
        return table.column(name).cast(pa.string()).combine_chunks()

    urls = column(cfg.url_col, "url")
    captions = column(cfg.caption_col, "caption") if cfg.caption_col else pa.nulls(table.num_rows, pa.string())
    key_col = cfg.key_col or ("key" if "key" in names else None)
    keys = column(key_col, "key")
    if keys is None:
        keys = pa.array([f"{cfg.key_prefix}{i:09d}" for i in range(table.num_rows)], pa.string())
    _check_keys(path, keys.to_pylist())
    image_id_col = cfg.image_id_col or ("image_id" if "image_id" in names else None)
    image_ids = column(image_id_col, "image_id") if image_id_col else keys
    return pa.table({KEY_COLUMN: keys, "image_id": image_ids, "url": urls, "caption": captions})


def read_list_table(path: Path, fmt: str | None) -> pa.Table:
    """A CSV / TSV / JSONL / Parquet list as a table; `fmt` None: from the file suffix."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: list not found")
    fmt = fmt or _FORMATS.get(path.suffix.lower())
    fmt = _FORMAT_ALIASES.get(fmt or "", fmt)
    if fmt == "parquet":
        return pq.read_table(path)
    if fmt == "csv":
        return pa_csv.read_csv(path)
    if fmt == "tsv":
        return pa_csv.read_csv(path, parse_options=pa_csv.ParseOptions(delimiter="\t"))
    if fmt == "jsonl":
        try:
            return pa_json.read_json(path)
        except pa.ArrowInvalid:  # a JSON array of objects rather than JSON Lines
            loaded = json.loads(path.read_text())
            if not isinstance(loaded, list):
                raise ValueError(f"{path}: expected JSON Lines or a JSON array of objects") from None
            return pa.Table.from_pylist(loaded)
    raise ValueError(f"{path}: cannot tell the list's format from {path.suffix!r}; pass one of csv, tsv, jsonl, parquet")


def _check_keys(path: Path, keys: list[str | None]) -> None:
    if any(k is None for k in keys):
        raise ValueError(f"{path}: row {keys.index(None)} has no key; every row needs one")
    seen: set[str] = set()
    for i, key in enumerate(keys):
        if key in seen:
            raise ValueError(f"{path}: key {key!r} repeats at row {i}; keys must be unique")
        seen.add(key)  # type: ignore[arg-type]


# ---------------------------------------------------------------- running img2dataset


def img2dataset_args(url_parquet: Path, output: Path, cfg: WebIngestConfig, mode: str) -> dict:
    """Keyword arguments of `img2dataset.download` for our input parquet."""
    quality = cfg.encode_quality if cfg.encode_quality is not None else (3 if cfg.encode_format == "png" else 95)
    return {
        "url_list": str(url_parquet),
        "output_folder": str(output),
        "input_format": "parquet",
        "url_col": "url",
        "caption_col": "caption",
        "save_additional_columns": [KEY_COLUMN],
        "output_format": "parquet",
        "processes_count": cfg.processes,
        "thread_count": cfg.threads,
        "number_sample_per_shard": cfg.rows_per_shard,
        "timeout": cfg.timeout_s,
        "retries": cfg.retries,
        "image_size": cfg.image_size,
        "resize_mode": cfg.resize_mode,
        "encode_format": cfg.encode_format,
        "encode_quality": quality,
        "skip_reencode": cfg.skip_reencode,
        "disable_all_reencoding": cfg.keep_original_bytes and cfg.resize_mode == "no",
        "incremental_mode": mode,
        "enable_wandb": False,
        "extract_exif": False,
    }


_CHILD = "import json, sys\nfrom img2dataset import download\ndownload(**json.load(open(sys.argv[1])))\n"


def run_img2dataset(args: dict, log: Path, timeout_s: float | None = None,
                    on_poll: Callable[[], None] | None = None) -> None:  # fmt: skip
    """Run `img2dataset.download(**args)` in a child process; its output goes to `log`;
    `on_poll()` is called about every second while it runs (e.g. to count finished shards).

    The child gets its own process group; past `timeout_s` the whole group (img2dataset
    spawns a logger and a pool) is killed. Raises RuntimeError with the log's tail when
    img2dataset exits non-zero or times out; a rerun resumes from its finished shards.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    args_path = log.with_suffix(".args.json")
    args_path.write_text(json.dumps(args, indent=2))
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled"}
    with open(log, "w") as handle:
        proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(args_path)],
            stdout=handle,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        try:
            code = _wait(proc, timeout_s, on_poll)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise RuntimeError(f"img2dataset ran past {timeout_s} s and was stopped; log {log}") from None
        except BaseException:  # interrupted: leave no downloader behind
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    if code != 0:
        tail = log.read_text()[-_LOG_TAIL_CHARS:]
        raise RuntimeError(f"img2dataset failed (exit {code}); log {log}:\n{tail}")


def _wait(proc: subprocess.Popen, timeout_s: float | None, on_poll: Callable[[], None] | None) -> int:
    """`proc.wait(timeout_s)`, calling `on_poll()` about every second meanwhile."""
    if on_poll is None:
        return proc.wait(timeout=timeout_s)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            raise subprocess.TimeoutExpired(proc.args, timeout_s)
        try:
            return proc.wait(timeout=_POLL_S if left is None else min(_POLL_S, left))
        except subprocess.TimeoutExpired:
            on_poll()


def read_raw_results(raw_parquet: Path) -> dict[str, RawRow]:
    """capfilt_key -> img2dataset's result for it (bytes or error, `data.img2dataset.raw_rows`),
    from one raw shard of ours; {} when img2dataset wrote no such file."""
    if not raw_parquet.is_file():
        return {}
    table = read_img2dataset(raw_parquet)
    if KEY_COLUMN not in table.column_names:
        raise ValueError(
            f"{raw_parquet}: no {KEY_COLUMN!r} column; this is not an img2dataset run of capfilt: "
            "import such a folder with `capfilt ingest img2dataset` instead"
        )
    return {row.key: row for row in raw_rows(table, raw_parquet)}


def url_problem(url: str | None) -> str | None:
    """Why `url` must not be fetched (empty, relative, or a scheme other than http/https), or None.

    img2dataset fetches with urllib, which reads ``file://`` (any local file), ``ftp://`` and
    ``data:`` URLs too; a URL list must never make ingestion read the machine's own files.
    """
    text = (url or "").strip()
    if not text:
        return "empty URL"
    scheme = urlsplit(text).scheme.lower()
    if scheme not in _FETCHABLE_SCHEMES:
        return f"scheme {scheme or '(none)'!r} is not http or https; such URLs are never fetched"
    return None


def _fetchable(table: pa.Table) -> pa.Table:
    """The list as img2dataset gets it: refused URLs blanked (it fails those without any I/O),
    rows kept in place so its shard N still holds our shard N's rows."""
    urls = [None if url_problem(u) else u for u in table.column("url").to_pylist()]
    return table.set_column(table.schema.get_field_index("url"), "url", pa.array(urls, pa.string()))


def _raw_row(expected: dict, result: RawRow | None, why_missing: str) -> RawRow:
    """The row of one URL-list entry: its key, image_id, caption and url from the list,
    bytes or error from img2dataset's `result` (a refused URL or no result: failed)."""
    key = expected[KEY_COLUMN]
    row = RawRow(key=key, image_id=expected["image_id"], caption=expected["caption"], data=None, url=expected["url"])
    problem = url_problem(expected["url"])
    if problem is not None:
        row.error = f"{BAD_URL}: {problem}"
    elif result is None:
        row.error = f"{NOT_EMITTED}: {why_missing}"
    else:
        row.data, row.error = result.data, result.error
    return row


# ---------------------------------------------------------------- the ingestion


def _slice_fingerprint(rows: list[dict]) -> str:
    digest = hashlib.sha256(json.dumps(rows, sort_keys=True, ensure_ascii=True).encode())
    return digest.hexdigest()[:32]


def _prepare_work(url_list: Path, out: Path, cfg: WebIngestConfig) -> tuple[Path, pa.Table]:
    """Write input.parquet + manifest.json for this list and these settings.

    When `out` holds the download of a different list (or other settings), img2dataset's
    raw output is discarded and its shards of ours that no longer match are redone;
    shards past the new list's end are removed.
    """
    work = out / WORK_DIR
    table = read_url_list(url_list, cfg)
    manifest = {
        "list_fingerprint": _slice_fingerprint(table.to_pylist()),
        "settings": settings_hash(cfg.download_settings()),
        "source": str(url_list),
    }
    manifest_path = work / "manifest.json"
    if manifest_path.is_file():
        old = json.loads(manifest_path.read_text())
        if (old["list_fingerprint"], old["settings"]) != (manifest["list_fingerprint"], manifest["settings"]):
            shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    input_path = work / "input.parquet"
    if not input_path.is_file():
        with atomic_path(input_path) as tmp:
            pq.write_table(_fetchable(table), tmp)
    manifest_path.write_text(json.dumps(manifest, indent=2))
    n_shards = -(-table.num_rows // max(1, cfg.rows_per_shard))
    for stale in list_shards(out):
        if int(stale.name.removesuffix(".parquet").split("-")[1]) < n_shards:
            continue
        completion_path(stale).unlink(missing_ok=True)
        stale.unlink()
    return work, table


def ingest_web(url_list: Path, out: Path, cfg: WebIngestConfig, retry_failed: bool = False,
               on_shard: Callable[[int, int], None] | None = None) -> IngestStats:  # fmt: skip
    """Download a URL list into pairs shards under `out` (see the module docstring).
    `on_shard(n, total)` is told as img2dataset finishes `n` more of the `total` shards to
    download (e.g. to advance a progress bar)."""
    out = Path(out)
    work, table = _prepare_work(Path(url_list), out, cfg)
    settings = settings_hash(cfg.download_settings())
    size = max(1, cfg.rows_per_shard)
    slices = [table.slice(start, size).to_pylist() for start in range(0, table.num_rows, size)]
    fingerprints = [_slice_fingerprint(rows) for rows in slices]
    todo = [i for i, fp in enumerate(fingerprints) if not is_complete(out / shard_name(i), fp, settings)]
    if todo:
        args = img2dataset_args(work / "input.parquet", work / "raw", cfg, "incremental")
        poll = _shard_counter(work / "raw", len(todo), on_shard)
        run_img2dataset(args, work / "raw.log", cfg.run_timeout_s, poll)
        if poll is not None:
            poll()  # the shards that finished since the last poll
    stats = IngestStats()
    for index, (rows, fp) in enumerate(zip(slices, fingerprints)):
        path = out / shard_name(index)
        if index in todo:
            table_rows = normalise_raw_shard(rows, work / "raw" / f"{index:05d}.parquet", cfg)
            stats.add(write_pairs_shard(table_rows, path, fp, settings), written=True)
        else:
            stats.add(_record(path), written=False)
    if retry_failed:
        stats = _retry_failed(out, work, cfg, settings)
    return stats


def _shard_counter(raw: Path, total: int, on_shard: Callable[[int, int], None] | None) -> Callable[[], None] | None:
    """A poll that tells `on_shard` of img2dataset's new ``*_stats.json`` (written as each of
    its shards finishes) in `raw`."""
    if on_shard is None:
        return None
    seen = [len(list(raw.glob("*_stats.json")))]  # shards finished by an earlier, interrupted run
    told = [0]

    def poll() -> None:
        done = min(total, len(list(raw.glob("*_stats.json"))) - seen[0])
        if done > told[0]:
            on_shard(done - told[0], total)
            told[0] = done

    return poll


def normalise_raw_shard(expected: list[dict], raw_path: Path, cfg: WebIngestConfig) -> pa.Table:
    """Pairs rows for exactly the `expected` input rows, from img2dataset's `raw_path`.

    `expected` are input.parquet rows (capfilt_key, image_id, url, caption). Bytes and
    errors follow `data.img2dataset`'s rule (a row img2dataset failed keeps
    ``"<status>: <error_message>"``, bytes that do not decode fail as ``undecodable``);
    a row it never wrote (or a shard file it never wrote) becomes failed with kind
    ``not_emitted``.
    """
    results = read_raw_results(raw_path)
    if raw_path.is_file():
        why = f"img2dataset wrote no row for it in {raw_path.name}"
    else:
        why = f"img2dataset wrote no {raw_path.name}"
    rows = [_raw_row(row, results.get(row[KEY_COLUMN]), why) for row in expected]
    return normalise_rows(rows, cfg.source, cfg.max_pixels)


def _record(path: Path) -> CompletionRecord:
    record = read_completion(path)
    if record is None:
        raise FileNotFoundError(f"{path}: no completion record")
    return record


def _retry_failed(out: Path, work: Path, cfg: WebIngestConfig, settings: str) -> IngestStats:
    """Download the failed rows of every shard again and replace them in place by key."""
    failed: list[dict] = []
    for path in list_shards(out):
        t = read_table(path, "pairs", columns=["key", "image_id", "url", "caption", "status"])
        failed += [
            {KEY_COLUMN: r["key"], "image_id": r["image_id"], "url": r["url"], "caption": r["caption"]}
            for r in t.to_pylist()
            if r["status"] == "failed"
        ]
    retry = work / "retry"
    results: dict[str, RawRow] = {}
    if failed:
        retry.mkdir(parents=True, exist_ok=True)
        pq.write_table(_fetchable(pa.Table.from_pylist(failed)), retry / "input.parquet")
        # A fresh folder in "incremental" mode: img2dataset's "overwrite" mode deletes the
        # temporary folder it has just made and then loops on the missing files.
        shutil.rmtree(retry / "raw", ignore_errors=True)
        args = img2dataset_args(retry / "input.parquet", retry / "raw", cfg, "incremental")
        run_img2dataset(args, retry / "raw.log", cfg.run_timeout_s)
        for raw in sorted((retry / "raw").glob("*.parquet")):
            results.update(read_raw_results(raw))
    retried = {row[KEY_COLUMN]: row for row in failed}
    stats = IngestStats()
    for path in list_shards(out):
        record = _record(path)
        table = read_table(path, "pairs")
        keys = table.column("key").to_pylist()
        redo = [i for i, k in enumerate(keys) if k in retried]
        if not redo:
            stats.add(record, written=False)
            continue
        rows = [_raw_row(retried[keys[i]], results.get(keys[i]), "img2dataset wrote no row for it on retry") for i in redo]
        fresh = conform(normalise_rows(rows, cfg.source, cfg.max_pixels), "pairs")
        merged = _replace_rows(conform(table, "pairs"), redo, fresh)
        extra = {k: v for k, v in record.extra.items() if k != "failures"}
        extra["retries"] = int(extra.get("retries", 0)) + 1
        new = write_pairs_shard(merged, path, record.input_fingerprint, record.settings_hash, extra)
        stats.add(new, written=True)
    return stats


def _replace_rows(table: pa.Table, positions: list[int], fresh: pa.Table) -> pa.Table:
    """`table` with rows at `positions` replaced by `fresh`'s rows (same order, no duplicates)."""
    combined = pa.concat_tables([table, fresh])
    order = list(range(table.num_rows))
    for j, i in enumerate(positions):
        order[i] = table.num_rows + j
    return combined.take(pa.array(order, pa.int64()))


# ---------------------------------------------------------------- existing img2dataset folders


@dataclass(frozen=True)
class ImportConfig:
    """How an existing img2dataset output folder becomes pairs shards (keys: `data.img2dataset`)."""

    source: str = "web"
    max_pixels: int = DEFAULT_MAX_PIXELS


def import_img2dataset(folder: Location | str, out: Location | str, cfg: ImportConfig) -> IngestStats:
    """Import an img2dataset output folder (parquet or webdataset format) as pairs shards.

    img2dataset shard ``NNNNN`` becomes ``out/part-NNNNN.parquet``, its rows turned into
    pairs rows by `data.img2dataset.to_pairs` (the stages' reader gives the same rows for
    the same files: a webdataset tar and its sidecar are joined by
    `data.webdataset_input.webdataset_rows`, every sample accounted for); failed rows
    (kept in img2dataset's parquet files) become failed rows. Safe to rerun: a shard whose record matches the source files'
    fingerprints is skipped.
    """
    folder, out = location(folder), location(out)  # paths or URLs
    shards = _img2dataset_shards(folder)
    if not shards:
        raise FileNotFoundError(f"{folder}: no img2dataset shards (NNNNN.parquet or NNNNN.tar) here")
    settings = settings_hash(cfg)
    stats = IngestStats()
    for index, (meta, tar) in sorted(shards.items()):
        path = out / shard_name(index)
        fp = "+".join(file_fingerprint(p) for p in (meta, tar) if p is not None)
        if is_complete(path, fp, settings):
            stats.add(_record(path), written=False)
            continue
        table = webdataset_rows(tar) if tar is not None else read_img2dataset(meta)  # type: ignore[arg-type]
        rows = to_pairs(table, tar or meta, cfg.source, cfg.max_pixels)
        stats.add(write_pairs_shard(rows, path, fp, settings), written=True)
    return stats


def _img2dataset_shards(folder: Location) -> dict[int, tuple[Location | None, Location | None]]:
    shards: dict[int, tuple[Location | None, Location | None]] = {}
    for path in folder.iterdir():
        match = re.fullmatch(r"(\d+)\.(parquet|tar)", path.name)
        if not match:
            continue
        meta, tar = shards.get(int(match.group(1)), (None, None))
        shards[int(match.group(1))] = (path, tar) if match.group(2) == "parquet" else (meta, path)
    return shards


# ---------------------------------------------------------------- a local HTTP server


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def serve_folder(root: Path, port: int | None = None) -> Iterator[str]:
    """Serve `root` with ``python -m http.server`` on 127.0.0.1 (`port`, or a free one);
    yields the base URL. The server is a child process, terminated when the block exits.
    """
    port = port or free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(root)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for_port(port, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_for_port(port: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + _SERVER_START_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"http.server on port {port} exited with code {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"http.server on port {port} did not start within {_SERVER_START_S} s")
