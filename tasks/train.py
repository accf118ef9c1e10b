"""The training stage: `train_stage(out_dir, shards, mode, ...)` over pair shards.

Wires `data.dataset.PairDataset` (streamed row groups, deterministic order, exact
resume) and `blip_core.image.ImageTransform` into `blip_core.train.train`. Writes
under `out_dir`:

- ``tokenizer/`` when training from scratch (built once from the shards' captions and
  reused by every rerun, so token ids never change under a resumed run);
- ``checkpoints/step-NNNNNNNN/``, ``metrics.jsonl`` (see `blip_core.train.loop`);
- ``final/``: the model, loadable with `blip_core.load`, plus ``training.json``.

A rerun is the resume: it continues from the newest complete checkpoint, and returns
at once when ``final/training.json`` records the same semantic settings. Different
settings with checkpoints present raise `CheckpointMismatchError` naming the fields.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch.distributed as dist
from blip_core.atomic import replace_folder
from blip_core.image import ImageTransform
from blip_core.tokenizer import Tokenizer, build_tokenizer
from blip_core.train import TrainConfig, train
from blip_core.train.distributed import DistInfo, barrier, init_distributed
from data.dataset import PairDataset
from data.shards import list_shards, read_table, settings_hash, shard_identity
from tasks.execution import require

TOKENIZER_DIR = "tokenizer"
FINAL_DIR = "final"


@dataclass
class TrainStageConfig:
    """One training stage of a run (pretrain, a finetune, or the final re-pretrain): the
    trainer settings a run config sets (its `train.<stage>` blocks are this class), turned
    into `TrainConfig` fields by `overrides` in one place."""

    __pydantic_config__ = {"extra": "forbid"}  # a misspelt field in a run config is an error

    steps: int = 600  # optimizer steps (the schedule spans them)
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_fraction: float = 0.05  # of `steps`
    schedule: Literal["step", "cosine"] = "cosine"
    queue_size: int | None = None  # ITC momentum queue (a multiple of the batch); None: BLIP's
    mix_units: int | None = None  # row groups shuffled together (1: each batch from one); None: the trainer's
    augment: bool = False  # random crop + flip (off for the shapes world: a flip changes 'left of')
    image_size: int | None = None  # None: the preset's (scratch) or the init model's size
    checkpoint_every: int = 200
    seed: int = 0

    def __post_init__(self) -> None:
        require(self.steps >= 1 and self.batch_size >= 1 and self.checkpoint_every >= 1,
                "steps, batch_size and checkpoint_every must be >= 1")  # fmt: skip
        require(self.lr > 0 and self.weight_decay >= 0, f"need lr > 0 and weight_decay >= 0, got {self.lr}, {self.weight_decay}")
        require(0 <= self.warmup_fraction <= 1, f"warmup_fraction must be in [0, 1], got {self.warmup_fraction}")
        for name in ("queue_size", "mix_units"):
            require(getattr(self, name) is None or getattr(self, name) >= 1, f"{name} must be >= 1 or null")
        require(self.image_size is None or self.image_size >= 8, f"image_size must be >= 8 or null, got {self.image_size}")

    def overrides(self) -> dict[str, Any]:
        """The `TrainConfig` fields these settings give (None ones left to the trainer's defaults)."""
        out = {"epochs": 1_000_000, "max_steps": self.steps, "batch_size": self.batch_size, "lr": self.lr,
               "weight_decay": self.weight_decay, "warmup_steps": round(self.warmup_fraction * self.steps),
               "schedule": self.schedule, "seed": self.seed, "checkpoint_every": self.checkpoint_every}  # fmt: skip
        optional = {"queue_size": self.queue_size, "mix_units": self.mix_units, "image_size": self.image_size}
        return {**out, **{name: value for name, value in optional.items() if value is not None}}


@dataclass
class TrainStageResult:
    """What a training stage produced; `skipped` when a matching final model already existed."""

    final_dir: str
    steps: int
    skipped: bool
    last_metrics: dict[str, float] = field(default_factory=dict)


def expand_shards(paths: Sequence[str | Path]) -> list[Path]:
    """Shard files as given, folders expanded to their ``part-*.parquet``; raises if none."""
    shards: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            shards.extend(list_shards(path))
        elif path.is_file():
            shards.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such shard file or folder")
    if not shards:
        raise FileNotFoundError(f"no part-*.parquet shards in {[str(p) for p in paths]}")
    return shards


def stage_tokenizer(folder: Path, shards: Sequence[Path], vocab_size: int) -> Tokenizer:
    """Load the tokenizer in `folder`, or build it from the shards' captions and save it there atomically."""
    if (folder / "tokenizer.json").is_file():
        return Tokenizer.from_folder(folder)
    captions: list[str] = []
    for shard in shards:
        captions += [c for c in read_table(shard, "pairs", columns=["caption"]).column("caption").to_pylist() if c]
    tokenizer = build_tokenizer(captions, vocab_size=vocab_size)  # it adds the captioner prompt itself
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer.save(tmp)
    replace_folder(tmp, folder)
    return tokenizer


# Inputs smaller than BLIP's pretraining size mark a toy/test model: finetune it at its own size.
_BLIP_PRETRAIN_SIZE = 224


def init_image_size(init: str | Path) -> int:
    """The input size a saved model (ours or a Hugging Face BLIP folder) was built for."""
    path = Path(init) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no config.json; --init must be a model folder")
    raw = json.loads(path.read_text())
    if "med" in raw:
        return int(raw["med"]["vision"]["image_size"])
    return int(raw.get("vision_config", {}).get("image_size", 384))


def training_identity(shards: Sequence[str | Path], init: str | Path | None) -> dict[str, str | None]:
    """What a model is trained from, by content: ``{"data": ..., "init_weights": ...}``
    (`TrainConfig` fields; paths play no part, so a moved run folder keeps its models)."""
    files = expand_shards(shards)
    return {"data": settings_hash([shard_identity(f) for f in files]),
            "init_weights": weights_fingerprint(Path(init)) if init else None}  # fmt: skip


def weights_fingerprint(model_dir: Path) -> str:
    """The identity of a model folder's weights (ours or a Hugging Face BLIP folder), not its path."""
    from blip_core.checkpoint import fingerprint

    files = sorted(model_dir.glob("*.safetensors")) or sorted(model_dir.glob("*.bin"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no weights (*.safetensors or *.bin); --init must be a model folder")
    return fingerprint(files)


def _finished(final: Path, cfg: TrainConfig) -> bool:
    record = final / "training.json"
    if not (final / "config.json").is_file() or not record.is_file():
        return False
    try:
        saved = TrainConfig.from_dict(json.loads(record.read_text())["train_config"])
    except (ValueError, KeyError, TypeError):
        return False
    return not cfg.semantic_diff(saved)


def train_stage(
    out_dir: str | Path,
    shards: Sequence[str | Path],
    mode: str,
    init: str | Path | None = None,
    preset: str = "tiny",
    *,
    augment: bool = True,
    vocab_size: int = 1000,
    tokenizer_dir: str | Path | None = None,
    **overrides: Any,
) -> TrainStageResult:
    """Train (or resume, or find finished) one model of `mode` into `out_dir`; see the module doc.

    `shards`: pair shard files or folders. `init`: a checkpoint folder (ours or Hugging
    Face BLIP) to start from; without it a `preset` model is trained from scratch with
    the tokenizer in `tokenizer_dir` (default ``out_dir/tokenizer``, built if absent).
    `overrides`: any `TrainConfig` field (max_steps, batch_size, lr, queue_size, ...).
    Without `image_size`, finetuning follows BLIP (384 px, position embeddings
    interpolated) unless `init` is a model below 224 px, which keeps its own size.
    Under torchrun every rank calls this with the same arguments.
    """
    out = Path(out_dir)
    files = expand_shards(shards)
    if init is not None and not overrides.get("image_size"):
        own = init_image_size(init)
        if own < _BLIP_PRETRAIN_SIZE:  # BLIP finetunes at 384 px; a tiny model stays at its size
            overrides["image_size"] = own
    identity = training_identity(files, init)
    cfg = TrainConfig.for_mode(
        mode,
        **{"out_dir": str(out), "preset": preset, "init": str(init) if init else None, "resume": True, **identity,
           **overrides},
    )  # fmt: skip
    final = out / FINAL_DIR
    if _finished(final, cfg):
        return TrainStageResult(str(final), int(json.loads((final / "training.json").read_text())["steps"]), True)
    joined_here = not (dist.is_available() and dist.is_initialized())
    info = init_distributed(cfg.device)  # a no-op outside torchrun
    try:
        return _train(cfg, files, init, augment, vocab_size, Path(tokenizer_dir) if tokenizer_dir else out / TOKENIZER_DIR, info)
    finally:
        if joined_here and info.distributed and dist.is_initialized():
            dist.destroy_process_group()


def _train(
    cfg: TrainConfig, files: list[Path], init: str | Path | None, augment: bool, vocab_size: int, tok_dir: Path, info: DistInfo
) -> TrainStageResult:
    tokenizer = None
    if init is None:
        # rank 0 builds (build_tokenizer's ids may differ between processes); the others load its files
        if info.is_main:
            tokenizer = stage_tokenizer(tok_dir, files, vocab_size)
        barrier(info)
        if not info.is_main:
            tokenizer = Tokenizer.from_folder(tok_dir)
    transform = ImageTransform(cfg.resolved_image_size(), train=augment, scale=(cfg.min_scale, 1.0))

    def dataset(rank: int, world_size: int) -> PairDataset:
        return PairDataset(
            files, transform=transform, seed=cfg.seed, rank=rank, world_size=world_size, shuffle=True,
            block_size=cfg.batch_size, equalize=world_size > 1, mix_units=cfg.mix_units,
        )  # fmt: skip

    result = train(cfg, dataset, tokenizer=tokenizer)
    return TrainStageResult(str(result.final_dir), result.steps, False, dict(result.last_metrics))
