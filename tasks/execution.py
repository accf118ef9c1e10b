"""How a stage runs: device, precision, decoding workers, the model it loads, progress.

None of it enters a stage's settings hash (results do not depend on it), except the
precision, which a stage resolves and hashes itself.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from data.storage import RemotePath

_MAX_AUTO_WORKERS = 8
_CPU_CORES_PER_WORKER = 4


@dataclass
class ExecutionConfig:
    """How a stage runs; never part of the settings hash (results do not depend on it).

    In a run config, a stage's `device` left at ``auto`` and `num_workers` left at -1
    follow the run's own `device` and `loader_workers` (see `flows.steps.stage_config`).
    """

    __pydantic_config__ = {"extra": "forbid"}  # a misspelt field in a run config is an error

    batch_size: int = 32  # images per model call
    num_workers: int = -1  # DataLoader processes decoding images; 0 = in-process, -1 = auto (see `resolve_workers`)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 elsewhere) | fp32 | bf16; enters the hash resolved
    progress: bool = True  # a bar with images/s on a terminal, plain lines every ~10 s or 5 % otherwise

    def __post_init__(self) -> None:
        require(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        require(self.num_workers >= -1, f"num_workers must be -1 (auto), 0 (in-process) or more, got {self.num_workers}")


def require(condition: bool, message: str) -> None:
    """Raise ValueError(`message`) unless `condition`: a stage config's field check (pydantic
    reports it against the config's block in a run config)."""
    if not condition:
        raise ValueError(message)


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
