"""Training checkpoints: atomic `step-NNNNNNNN/` folders of safetensors + JSON, newest K kept.

A checkpoint folder holds everything a resumed run needs to continue bit-identically:

- ``config.json``, ``model.safetensors`` and the tokenizer files (the MED itself);
- ``momentum.safetensors`` (EMA encoders) and ``queue.safetensors`` (feature queues);
- ``optimizer.safetensors`` + ``optimizer.json`` (AdamW moments and param groups);
- ``rng-rank<R>.safetensors`` + ``rng-rank<R>.json`` per rank (torch CPU/CUDA, the
  hard-negative generator, Python and NumPy states);
- ``trainer_state.json`` (step, epoch, position in the epoch, both configs), written last.

It is assembled in ``.tmp-step-NNNNNNNN/`` and renamed into place, so a folder named
``step-*`` is always complete: a process killed mid-write leaves only a temporary
folder, which the next save removes. Nothing is unpickled: tensors come from
safetensors, the rest from JSON.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

from blip_core.atomic import atomic_path, replace_folder
from blip_core.train.distributed import DistInfo, barrier

FORMAT = "capfilt-train-checkpoint/1"
STATE_FILE = "trainer_state.json"
MODEL_FILE = "model.safetensors"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (incomplete, other format, other config); names the folder."""


# -- folders -------------------------------------------------------------------------------


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint folders under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under `root`, or None."""
    found = list_checkpoints(root)
    return found[-1] if found else None


def _prune(root: Path, keep_last: int) -> None:
    for old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-step-*"):
        shutil.rmtree(stale, ignore_errors=True)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON to `path` via a temporary file and rename."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))


def save_checkpoint(
    root: Path,
    step: int,
    info: DistInfo,
    write_shared: Callable[[Path], None],
    write_rank: Callable[[Path], None],
    state: dict[str, Any],
    keep_last: int,
) -> Path:
    """Assemble a checkpoint in a temporary folder on all ranks, then rename it into place.

    `write_rank(folder)` runs on every rank (its RNG states), `write_shared(folder)` on
    rank 0 only; `state` becomes ``trainer_state.json``, written last. Returns the final
    folder. Safe to rerun: a leftover temporary folder of a killed save is replaced.
    """
    tmp, final = root / f".tmp-step-{step:08d}", step_dir(root, step)
    if info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(info)
    write_rank(tmp)
    barrier(info)
    if info.is_main:
        write_shared(tmp)
        write_json(tmp / STATE_FILE, {"format": FORMAT, **state})
        replace_folder(tmp, final)
        _prune(root, keep_last)
    barrier(info)
    return final


def read_state(folder: Path) -> dict[str, Any]:
    """The ``trainer_state.json`` of a checkpoint; raises CheckpointError if absent or foreign."""
    path = folder / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder}: no {STATE_FILE}; not a complete training checkpoint")
    state = json.loads(path.read_text())
    if state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {state.get('format')!r}, expected {FORMAT!r}")
    return state


# -- modules and tensors ----------------------------------------------------------------------


def save_module(module: torch.nn.Module, path: Path) -> None:
    """Module weights to safetensors (shared/tied tensors stored once)."""
    save_model(module, str(path))


def load_module(module: torch.nn.Module, path: Path) -> None:
    """Inverse of `save_module`; raises CheckpointError naming the file on a key mismatch."""
    with _damaged_file_named(path):
        missing, unexpected = load_model(module, str(path), strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))


def load_tensors(path: Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    with _damaged_file_named(path):
        return load_file(str(path), device=str(device))


@contextmanager
def _damaged_file_named(path: Path) -> Iterator[None]:
    """A truncated or foreign (e.g. pickled) tensor file -> CheckpointError naming it."""
    try:
        yield
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({exc}); this checkpoint is damaged: delete its "
            "step folder to resume from the one before"
        ) from exc


# -- optimizer --------------------------------------------------------------------------------


def save_optimizer(optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """AdamW state: tensors to ``optimizer.safetensors``, param groups and scalars to ``optimizer.json``."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, pstate in sd["state"].items():
        for name, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}.{name}"] = value
            else:
                scalars.setdefault(str(pid), {})[name] = value
    save_tensors(tensors, folder / "optimizer.safetensors")
    write_json(folder / "optimizer.json", {"param_groups": sd["param_groups"], "scalars": scalars})


def load_optimizer(optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Inverse of `save_optimizer` (moments land on the device of the parameters)."""
    meta = json.loads((folder / "optimizer.json").read_text())
    state: dict[int, dict[str, Any]] = {}
    for key, tensor in load_tensors(folder / "optimizer.safetensors").items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = tensor
    for pid, values in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(values)
    groups = meta["param_groups"]
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# -- random number generators -----------------------------------------------------------------


def save_rng(folder: Path, rank: int, generator: torch.Generator) -> None:
    """Every RNG this rank draws from: torch CPU (+CUDA), the hard-negative generator, Python, NumPy."""
    tensors = {"torch_cpu": torch.get_rng_state(), "hard_negatives": generator.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    save_tensors(tensors, folder / f"rng-rank{rank}.safetensors")
    version, internal, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    write_json(
        folder / f"rng-rank{rank}.json",
        {
            "python": [version, list(internal), gauss],
            "numpy": [np_name, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
        },
    )


def load_rng(folder: Path, rank: int, generator: torch.Generator) -> None:
    """Inverse of `save_rng`; raises CheckpointError if this rank has no saved state."""
    path = folder / f"rng-rank{rank}.safetensors"
    if not path.is_file():
        raise CheckpointError(f"{folder}: no RNG state for rank {rank} (was it written with fewer ranks?)")
    tensors = load_tensors(path)
    torch.set_rng_state(tensors["torch_cpu"])
    generator.set_state(tensors["hard_negatives"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    meta = json.loads((folder / f"rng-rank{rank}.json").read_text())
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
