"""Plumbing shared by the CapFilt stages (caption, filter, assemble).

A stage maps input shards to output shards named after them, under a folder named by
the hash of its *semantic* settings (``caption/<hash>/part-00042.parquet``). A shard is
redone only when its completion record is missing or was written for other input bytes
or other settings, so a rerun after a crash (SIGKILL included) is the resume, and a
changed semantic setting writes a new folder instead of overwriting the old one.
Execution settings (batch size, workers, device, progress) never enter the hash.

Inputs may be our ``pairs`` shards or img2dataset's own Parquet output; `read_pairs`
turns the latter into ``pairs`` rows on read (status other than ``success`` -> failed).
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, Dataset

from blip_core.image import ImageTransform, normalise
from data.images import decode_image
from data.schema import SchemaError, conform
from data.shards import is_complete, read_table, settings_hash, shard_name, write_atomic

# img2dataset's Parquet columns that identify its output (see PITFALLS.md).
_IMG2DATASET_COLUMNS = frozenset({"key", "status", "error_message", "jpg"})
_IMG2DATASET_SUCCESS = "success"
_OUR_SHARD = re.compile(r"part-\d{5}\.parquet")
_NUMBERED_SHARD = re.compile(r"(\d+)\.parquet")
_SEED_BYTES = 8
_SEED_MASK = (1 << 63) - 1
STAGE_FILE = "stage.json"
_MAX_AUTO_WORKERS = 8
_CPU_CORES_PER_WORKER = 4

# ----------------------------------------------------------------------------- stats


@dataclass
class ShardStats:
    """What one stage call did for one input shard."""

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
    output: Path
    settings_hash: str
    shards: list[ShardStats] = field(default_factory=list)

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


def run_each_shard(stats: StageStats, jobs: Sequence[tuple[Path, Callable[[], ShardStats]]]) -> StageStats:
    """Run every `(input, job)`, appending each result to `stats`; a job that raises does
    not stop the others. Raises StageIncompleteError naming the failed inputs at the end.

    Each job writes its shard atomically with its completion record last, so a failed
    shard leaves nothing a rerun would mistake for a result.
    """
    failures: dict[str, str] = {}
    for src, job in jobs:
        try:
            stats.shards.append(job())
        except Exception as exc:  # noqa: BLE001 - reported below, with the file, after the other shards
            failures[str(src)] = f"{type(exc).__name__}: {exc}"
    if failures:
        raise StageIncompleteError(stats, failures)
    return stats


def check_accounting(counts: dict[str, int], where: str) -> None:
    """Raise when kept + rejected + failed != input: every input row must be accounted for."""
    total = counts["kept"] + counts["rejected"] + counts["failed"]
    if total != counts["input"]:
        raise AssertionError(
            f"{where}: accounting broken, kept {counts['kept']} + rejected {counts['rejected']} + "
            f"failed {counts['failed']} = {total} != input {counts['input']}"
        )


# ----------------------------------------------------------------------------- settings


@dataclass
class ExecutionConfig:
    """How a stage runs; never part of the settings hash (results do not depend on it)."""

    batch_size: int = 32  # images per model call
    num_workers: int = -1  # DataLoader processes decoding images; 0 = in-process, -1 = auto (see `resolve_workers`)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 elsewhere) | fp32 | bf16; enters the hash resolved
    progress: bool = True  # tqdm bars with images/s and keep rate


def semantic_settings(cfg: Any) -> dict[str, Any]:
    """The fields of a stage config that change results: all but the `execution` block."""
    settings = dataclasses.asdict(cfg)
    settings.pop("execution", None)
    return settings


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_workers(requested: int, device: torch.device) -> int:
    """-1 (auto): on CUDA, up to 8 decoding processes (one core left to the main process);
    on CPU, a worker only where cores are to spare (it competes with the model's threads)."""
    if requested >= 0:
        return requested
    cores = os.cpu_count() or 1
    if device.type == "cuda":
        return max(0, min(_MAX_AUTO_WORKERS, cores - 1))
    return 0 if cores <= _CPU_CORES_PER_WORKER else min(_MAX_AUTO_WORKERS // 2, cores // _CPU_CORES_PER_WORKER)


def resolve_precision(name: str, device: torch.device) -> str:
    """``auto`` -> bf16 on CUDA (autocast), fp32 elsewhere; bf16 on CPU is refused (slow, inexact)."""
    if name == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if name not in ("fp32", "bf16"):
        raise ValueError(f"precision must be auto, fp32 or bf16, got {name!r}")
    if name == "bf16" and device.type != "cuda":
        raise ValueError("precision bf16 needs a CUDA device; use --precision fp32 on CPU")
    return name


@contextmanager
def inference_context(device: torch.device, precision: str) -> Iterator[None]:
    """No autograd; bf16 autocast on CUDA when asked."""
    with ExitStack() as stack:
        stack.enter_context(torch.inference_mode())
        if precision == "bf16":
            stack.enter_context(torch.autocast(device_type=device.type, dtype=torch.bfloat16))
        yield


def stage_dir(out_dir: Path, settings: dict[str, Any]) -> tuple[Path, str]:
    """The output folder for these semantic settings, ``out_dir/<hash>``, and the hash.

    Writes ``stage.json`` (the settings in plain JSON) into it, so a reader can tell what
    produced a folder; rewriting it is harmless because its content is a function of the hash.
    """
    digest = settings_hash(settings)
    folder = Path(out_dir) / digest
    folder.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"settings_hash": digest, "settings": settings}, indent=2, sort_keys=True, default=str)
    target = folder / STAGE_FILE
    if not target.is_file() or target.read_text() != text:  # its content is a function of the hash
        write_atomic(target, text)
    return folder, digest


def all_complete(paths: Sequence[Path], input_fingerprint: str, digest: str) -> bool:
    """True when every output shard of one input is complete for these inputs and settings."""
    return all(is_complete(p, input_fingerprint, digest) for p in paths)


def combine_fingerprints(parts: Sequence[str]) -> str:
    """One fingerprint for several inputs (order matters)."""
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def derive_seed(seed: int, key: str) -> int:
    """A 63-bit seed from (run seed, row key): the same row samples the same text in any run."""
    digest = hashlib.sha256(f"{seed}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:_SEED_BYTES], "little") & _SEED_MASK


# ----------------------------------------------------------------------------- models


def load_stage_model(model: Any, device: torch.device, role: str, wrong_format: str) -> Any:
    """A `blip_core.LoadedModel` for a stage (loading it when given a folder).

    Refuses a model without tokenizer files, and a transformers export of the other half
    of BLIP (`wrong_format`: a captioning folder has no ITM head, a retrieval folder no
    decoder), whose missing weights would silently be random.
    """
    if isinstance(model, (str, Path)):
        import blip_core

        model = blip_core.load(Path(model), device=str(device))
    if model.tokenizer is None:
        raise FileNotFoundError(
            f"the {role} model has no tokenizer files (tokenizer.json / vocab.txt); save one next to the weights"
        )
    if model.format == wrong_format:
        raise ValueError(
            f"the {role} model is a transformers {wrong_format.removeprefix('hf-')} export, which lacks the "
            f"weights the {role} needs; pass our checkpoint or the other BLIP folder"
        )
    return model


# ----------------------------------------------------------------------------- inputs


def expand_item(item: str | Path) -> list[Path]:
    """One input: a file, a folder (its ``*.parquet``, sorted) or a glob pattern (sorted).

    Raises FileNotFoundError naming an item that matches nothing.
    """
    path = Path(item)
    if path.is_dir():
        matches = sorted(p for p in path.glob("*.parquet") if p.is_file())
    elif path.is_file():
        matches = [path]
    else:
        matches = sorted(Path(p) for p in glob.glob(str(item)) if p.endswith(".parquet"))
    if not matches:
        raise FileNotFoundError(f"input {item!s}: no Parquet shards there (give files, folders or globs)")
    return [p.resolve() for p in matches]


def expand_inputs(items: Sequence[str | Path]) -> list[Path]:
    """Files, folders and globs -> unique Parquet paths sorted by the output they name."""
    unique = list(dict.fromkeys(p for item in items for p in expand_item(item)))
    return sorted(unique, key=lambda p: (output_name(p), str(p)))


def output_name(src: Path) -> str:
    """The output shard name for an input: ``part-00042.parquet`` stays, img2dataset's
    ``00042.parquet`` becomes ``part-00042.parquet``; other names are refused."""
    name = Path(src).name
    if _OUR_SHARD.fullmatch(name):
        return name
    numbered = _NUMBERED_SHARD.fullmatch(name)
    if numbered:
        return shard_name(int(numbered.group(1)))
    raise ValueError(
        f"{src}: input shards must be named part-NNNNN.parquet or NNNNN.parquet (img2dataset), "
        "so outputs can be named after them; rename the file"
    )


def plan_outputs(inputs: Sequence[Path]) -> list[tuple[Path, str]]:
    """(input, output name) pairs; refuses two inputs that would write the same output."""
    seen: dict[str, Path] = {}
    plan = []
    for src in inputs:
        name = output_name(src)
        if name in seen:
            raise ValueError(
                f"{src} and {seen[name]} would both write {name}; run the stage once per input folder"
            )
        seen[name] = Path(src)
        plan.append((Path(src), name))
    return plan


def _is_img2dataset(schema: pa.Schema) -> bool:
    return _IMG2DATASET_COLUMNS <= set(schema.names) and "source" not in schema.names


def _column(table: pa.Table, name: str, type_: pa.DataType) -> pa.Array:
    if name not in table.column_names:
        return pa.nulls(table.num_rows, type_)
    return pc.cast(table.column(name), type_).combine_chunks()


def normalise_img2dataset(table: pa.Table, source: str = "web") -> pa.Table:
    """img2dataset rows -> ``pairs`` rows: key = image_id = img2dataset key; a status other
    than ``success`` becomes ``failed`` with its error_message and no image bytes."""
    ok = pc.fill_null(pc.equal(_column(table, "status", pa.string()), _IMG2DATASET_SUCCESS), False)
    n = table.num_rows
    key = _column(table, "key", pa.string())
    columns = {
        "key": key,
        "image_id": key,
        "source": pa.array([source] * n, pa.string()),
        "caption": _column(table, "caption", pa.string()),
        "jpg": pc.if_else(ok, _column(table, "jpg", pa.binary()), pa.scalar(None, pa.binary())),
        "url": _column(table, "url", pa.string()),
        "width": _column(table, "width", pa.int32()),
        "height": _column(table, "height", pa.int32()),
        "sha256": _column(table, "sha256", pa.string()),
        "status": pc.if_else(ok, "ok", "failed"),
        "error": pc.if_else(ok, pa.scalar(None, pa.string()), _column(table, "error_message", pa.string())),
    }
    if pc.any(pc.is_null(key)).as_py():
        raise SchemaError("img2dataset shard has rows with a null `key`; cannot name their outputs")
    return conform(pa.table(columns), "pairs")


def read_pairs(path: Path, columns: Sequence[str] | None = None) -> pa.Table:
    """Read a shard as ``pairs`` rows, whether ours (any kind holding the pair columns) or
    img2dataset's raw Parquet output. `columns` limits what is read (ours only)."""
    path = Path(path)
    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowException) as exc:
        raise SchemaError(f"{path}: not a readable Parquet file ({exc})") from exc
    if _is_img2dataset(schema):
        table = normalise_img2dataset(pq.read_table(path))
        return table.select(list(columns)) if columns else table
    if columns:
        return read_table(path, "pairs", columns=list(columns))
    return conform(read_table(path, "pairs"), "pairs")


def ok_mask(table: pa.Table) -> np.ndarray:
    """Rows with status ok and image bytes present, as a bool array."""
    ok = pc.and_(pc.equal(table.column("status"), "ok"), pc.is_valid(table.column("jpg")))
    return np.asarray(pc.fill_null(ok, False).to_numpy(zero_copy_only=False), dtype=bool)


# ----------------------------------------------------------------------------- images


class _DecodedImages(Dataset):
    """Row i of an arrow binary column -> (uint8 pixels (3,S,S), error or "")."""

    def __init__(self, jpg: pa.Array, transform: ImageTransform) -> None:
        self.jpg = jpg
        self.transform = transform

    def __len__(self) -> int:
        return len(self.jpg)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        decoded = decode_image(self.jpg[index].as_py())
        if decoded.image is None:
            size = self.transform.image_size
            return torch.zeros(3, size, size, dtype=torch.uint8), decoded.error or "undecodable"
        return self.transform.pixels(decoded.image), ""


def image_batches(
    jpg: pa.Array,
    batches: list[list[int]],
    transform: ImageTransform,
    execution: ExecutionConfig,
    device: torch.device,
) -> Iterator[tuple[torch.Tensor, list[str]]]:
    """Decode and transform the rows of each index batch in DataLoader workers.

    Yields (pixel_values (B,3,S,S) float on `device`, errors) in batch order; an error is
    "" for a good image, else the reason (its pixels are a constant and must not be used).
    Workers decode the next batches while the model runs on this one; batches travel as
    uint8 (pinned on CUDA) and are normalised once on the device.
    """
    if not batches:
        return
    workers = resolve_workers(execution.num_workers, device)
    loader = DataLoader(
        _DecodedImages(jpg, transform),
        batch_sampler=batches,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=2 if workers else None,
        persistent_workers=False,
    )
    for pixels, errors in loader:  # pixels: (B, 3, S, S) uint8
        yield normalise(pixels.to(device, non_blocking=True)), list(errors)


def index_batches(indices: np.ndarray, batch_size: int) -> list[list[int]]:
    """Consecutive chunks of at most `batch_size` row indices."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    return [indices[i : i + batch_size].tolist() for i in range(0, len(indices), batch_size)]


# ----------------------------------------------------------------------------- progress


def progress_bar(total: int, desc: str, enabled: bool) -> Any:
    """A tqdm bar counting images (its rate is images/s); a no-op object when disabled."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, dynamic_ncols=True, leave=False)


class Timer:
    """Wall-clock seconds of a block: ``with Timer() as t: ...; t.seconds``."""

    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start
