"""How a stage runs: device, precision, decoding workers, the model it loads, progress.

None of it enters a stage's settings hash (results do not depend on it), except the
precision, which a stage resolves and hashes itself.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from data.storage import RemotePath
from tasks.stage_config import ExecutionConfig, require

# ExecutionConfig and require are defined in tasks.stage_config (torch-free) and imported from here too

log = logging.getLogger(__name__)

_MAX_AUTO_WORKERS = 32  # decoding processes feeding one GPU (a core decodes ~100-300 web JPEGs/s)
_CPU_CORES_PER_WORKER = 4  # on CPU a decoding worker competes with the model's threads
_CPU_BATCH = 32  # images per model call on CPU: throughput is flat from ~16 up
_GPU_BATCH_RANGE = (16, 1024)
_GPU_MEMORY_SHARE = 0.5  # of the device's free memory, for one batch's activations
_BYTES_PER_VALUE = 2  # bf16 activations


def semantic_settings(cfg: Any) -> dict[str, Any]:
    """The fields of a stage config that change results: all but the `execution` block."""
    settings = dataclasses.asdict(cfg)
    settings.pop("execution", None)
    return settings


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; a device this machine lacks is a ValueError
    naming it and the fix (see `available_device`)."""
    return torch.device(available_device(name))


def available_device(name: str) -> str:
    """`name` (auto | cpu | cuda | cuda:N | mps) made concrete for this machine: ``auto`` is
    cuda when available, else cpu. A device that is not here raises ValueError in one line."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    kind, _, index = name.partition(":")
    if kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {name!r}: this machine has no CUDA GPU; use device auto (cuda when there is one, else cpu) or cpu")
        if index and int(index) >= count:
            raise ValueError(f"device {name!r}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    elif kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r}: Apple's MPS is not available here; use device auto or cpu")
    return name


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, as set by taskset, cgroups or a
    scheduler), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def resolve_workers(requested: int, device: torch.device, cores: int | None = None) -> int:
    """-1 (auto): on CUDA, one decoding process per usable core but one (left to the model's
    process), at most 32; on CPU, a worker per 4 cores above 4 (it competes with the model's
    threads), none on a small machine."""
    if requested >= 0:
        return requested
    cores = usable_cores() if cores is None else cores
    if device.type == "cuda":
        return max(0, min(_MAX_AUTO_WORKERS, cores - 1))
    return 0 if cores <= _CPU_CORES_PER_WORKER else min(_MAX_AUTO_WORKERS // 8, cores // _CPU_CORES_PER_WORKER)


def image_activation_bytes(vision: Any, copies: int) -> int:
    """A rough peak of one image's inference activations, in bf16: the vision tower's widest
    layer (attention scores H*T*T, MLP 4*T*D) plus `copies` of its T*D tokens with the text
    layers' cross-attention keys and values (one per caption scored or sequence generated)."""
    tokens = (vision.image_size // vision.patch_size) ** 2 + 1
    widest = vision.num_heads * tokens * tokens * 2 + tokens * (vision.intermediate_size + 4 * vision.hidden_size)
    per_copy = tokens * vision.hidden_size * (1 + 2 * vision.num_layers)
    return _BYTES_PER_VALUE * (widest + copies * per_copy)


def resolve_batch_size(requested: int, device: torch.device, vision: Any, copies: int) -> tuple[int, str]:
    """0 (auto): 32 on CPU; on CUDA the largest power of two whose activations
    (`image_activation_bytes`) fit in half the free device memory, within [16, 1024].
    Returns the size and why."""
    if requested > 0:
        return requested, "set"
    if device.type != "cuda":
        return _CPU_BATCH, "auto, CPU"
    free, _ = torch.cuda.mem_get_info(device)
    per_image = image_activation_bytes(vision, copies)
    return batch_for_memory(free, per_image), f"auto, {free / 2**30:.1f} GiB free on {device}, ~{per_image / 2**20:.0f} MiB per image"


def batch_for_memory(free_bytes: int, per_image_bytes: int) -> int:
    """The largest power of two of images whose activations fit in half of `free_bytes`, within [16, 1024]."""
    fits = max(1, int(free_bytes * _GPU_MEMORY_SHARE // per_image_bytes))
    return min(_GPU_BATCH_RANGE[1], max(_GPU_BATCH_RANGE[0], 1 << (fits.bit_length() - 1)))


@dataclass(frozen=True)
class Resolved:
    """What a stage run uses: `ExecutionConfig`'s autos made concrete for this machine."""

    batch_size: int
    num_workers: int
    why: str  # one line naming the choice and why, logged by the stage


def resolve_execution(execution: ExecutionConfig, device: torch.device, vision: Any, copies: int, stage: str) -> Resolved:
    """Batch size and decoding workers for `stage` on `device` (see `resolve_batch_size`,
    `resolve_workers`), logged once in one line. `copies`: captions scored or sequences
    generated per image, for the memory estimate."""
    batch, batch_why = resolve_batch_size(execution.batch_size, device, vision, copies)
    workers = resolve_workers(execution.num_workers, device)
    workers_why = "set" if execution.num_workers >= 0 else f"auto, {usable_cores()} usable cores, {device.type}"
    why = (f"{stage}: batch_size {batch} ({batch_why}), num_workers {workers} ({workers_why}); "
           "set execution.batch_size / num_workers to change")  # fmt: skip
    log.info(why)
    return Resolved(batch, workers, why)


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


def load_stage_model(model: Any, device: torch.device, role: str, wrong_format: str) -> Any:
    """A `blip_core.LoadedModel` for a stage (loading it when given a folder).

    Refuses a model without tokenizer files, and a transformers export of the other half
    of BLIP (`wrong_format`: a captioning folder has no ITM head, a retrieval folder no
    decoder), whose missing weights would silently be random.
    """
    if isinstance(model, (str, Path, RemotePath)):
        import blip_core

        from tasks.model_store import local_model

        model = blip_core.load(local_model(model), device=str(device))  # a URL: through the local cache
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


def progress_bar(total: int, desc: str, enabled: bool, unit: str = "img") -> Any:
    """A counter of `unit`s (images by default: its rate is images/s): a bar on a terminal,
    plain lines in logs (`blip_core.progress`); a no-op when disabled."""
    from blip_core.progress import progress_bar as counter

    return counter(total, desc, unit=unit, enabled=enabled)
