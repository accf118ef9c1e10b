"""Plumbing shared by the CapFilt stages (caption, filter, assemble).

A stage maps input shards to output shards named after them, under a folder named by
the hash of its *semantic* settings (``caption/<hash>/part-00042.parquet``). A shard is
redone only when its completion record is missing or was written for other input bytes
or other settings, so a rerun after a crash (SIGKILL included) is the resume, and a
changed semantic setting writes a new folder instead of overwriting the old one.
Execution settings (batch size, workers, device, progress) never enter the hash.

Which shards a stage reads, and reading them as ``pairs`` rows, is `data.inputs`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader, Dataset

from blip_core.image import ImageTransform, normalise
from data.images import decode_image

_SEED_BYTES = 8
_SEED_MASK = (1 << 63) - 1
_MAX_AUTO_WORKERS = 8
_CPU_CORES_PER_WORKER = 4

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
