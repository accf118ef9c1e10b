"""The trainer's mutable state and how it is built, saved and restored.

`TrainState` bundles the model, its momentum copy and queue, the optimizer, the
hard-negative generator and the position (step, epoch, steps done in the epoch).
`build_state` makes it from scratch, from an `--init` checkpoint, or from a training
checkpoint when resuming (then every tensor and RNG is restored).
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint as recompute

from blip_core.checkpoint import load as load_model_folder
from blip_core.checkpoint import save as save_model_folder
from blip_core.config import preset as model_preset
from blip_core.med import MED
from blip_core.momentum import FeatureQueue, MomentumEncoders
from blip_core.tokenizer import Tokenizer
from blip_core.train import checkpoint as ckpt
from blip_core.train.config import TrainConfig
from blip_core.train.distributed import DistInfo

# Offsets that keep the per-rank seed streams apart.
_RANK_SEED_STRIDE = 1009
_HARD_NEGATIVE_SEED = 7919


class CheckpointMismatchError(ckpt.CheckpointError):
    """Resuming with options that differ from the checkpoint's; the message lists them."""


@dataclass
class TrainState:
    model: MED
    tokenizer: Tokenizer
    momentum: MomentumEncoders | None
    queue: FeatureQueue | None
    optimizer: torch.optim.Optimizer
    generator: torch.Generator  # draws ITM hard negatives
    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch
    epoch_step: int = 0  # optimizer steps done within `epoch`


def _initial_model(cfg: TrainConfig, tokenizer: Tokenizer | None, image_size: int) -> tuple[MED, Tokenizer]:
    if cfg.init is not None:
        loaded = load_model_folder(cfg.init, image_size=image_size)
        tok = tokenizer or loaded.tokenizer
        if tok is None:
            raise ValueError(f"{cfg.init}: holds no tokenizer files; pass a tokenizer to train()")
        return loaded.model.train(), tok
    if tokenizer is None:
        raise ValueError("training from scratch needs a tokenizer (build one with blip_core.build_tokenizer)")
    config = model_preset(cfg.preset).with_tokenizer(tokenizer).with_image_size(image_size)
    return MED(config), tokenizer


def _model_from_checkpoint(folder: Path) -> tuple[MED, Tokenizer]:
    loaded = load_model_folder(folder)
    if loaded.tokenizer is None:
        raise ckpt.CheckpointError(f"{folder}: no tokenizer files")
    return loaded.model.train(), loaded.tokenizer


def enable_vit_checkpointing(model: MED) -> None:
    """Recompute each ViT block in backward instead of storing its activations.

    Patches the instance `forward` (parameter names unchanged). Build the momentum
    copy before calling this: a deep copy would keep pointing at these blocks.
    """
    for block in model.vision.layers:
        plain = block.forward

        def forward(x: torch.Tensor, _plain: Any = plain) -> torch.Tensor:
            if torch.is_grad_enabled():
                return recompute(_plain, x, use_reentrant=False)
            return _plain(x)

        block.forward = functools.wraps(plain)(forward)


def build_state(
    cfg: TrainConfig, info: DistInfo, tokenizer: Tokenizer | None, resume_from: Path | None
) -> TrainState:
    """Model, momentum copy, queue, optimizer and RNGs, fresh or restored from `resume_from`."""
    image_size = cfg.resolved_image_size()
    torch.manual_seed(cfg.seed)  # identical initial weights and queue on every rank
    if resume_from is not None:
        saved = ckpt.read_state(resume_from)
        check_compatible(cfg, saved, resume_from)
        model, tokenizer = _model_from_checkpoint(resume_from)
    else:
        model, tokenizer = _initial_model(cfg, tokenizer, image_size)
    model.to(info.device)
    momentum = queue = None
    if "itc" in cfg.objectives:
        momentum = MomentumEncoders(model, cfg.momentum).to(info.device)
        queue = FeatureQueue(cfg.queue_size, model.config.embed_dim, torch.Generator().manual_seed(cfg.seed)).to(info.device)
        queue.check_batch(cfg.batch_size * info.world_size)
    if cfg.activation_checkpointing:
        enable_vit_checkpointing(model)
    if cfg.compile:
        model.vision.compile()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    generator = torch.Generator(device=info.device)
    state = TrainState(model, tokenizer, momentum, queue, optimizer, generator)
    _seed_rank(cfg, info, generator)
    if resume_from is not None:
        _restore(state, resume_from, info)
    return state


def _seed_rank(cfg: TrainConfig, info: DistInfo, generator: torch.Generator) -> None:
    seed = cfg.seed + _RANK_SEED_STRIDE * (info.rank + 1)
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    generator.manual_seed(seed + _HARD_NEGATIVE_SEED)


def check_compatible(cfg: TrainConfig, saved: dict[str, Any], folder: Path) -> None:
    """Raise CheckpointMismatchError listing every semantic option that differs from the checkpoint."""
    diff = TrainConfig.from_dict(saved["train_config"]).semantic_diff(cfg)
    if diff:
        lines = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, a, b in ((k, *v) for k, v in sorted(diff.items())))
        raise CheckpointMismatchError(
            f"{folder} was written with other training options ({lines}); rerun with the same options "
            f"to resume, or use a new output folder to start over"
        )


def save_state(state: TrainState, cfg: TrainConfig, info: DistInfo, root: Path, extra: dict[str, Any]) -> Path:
    """Write a complete checkpoint of `state` under `root` (all ranks call this)."""

    def shared(folder: Path) -> None:
        save_model_folder(state.model, state.tokenizer, folder)
        if state.momentum is not None and state.queue is not None:
            ckpt.save_tensors(state.momentum.averaged_state(), folder / "momentum.safetensors")
            ckpt.save_tensors(dict(state.queue.state_dict()), folder / "queue.safetensors")
        ckpt.save_optimizer(state.optimizer, folder)

    def per_rank(folder: Path) -> None:
        ckpt.save_rng(folder, info.rank, state.generator)

    trainer_state = {
        "step": state.step,
        "epoch": state.epoch,
        "epoch_step": state.epoch_step,
        "world_size": info.world_size,
        "train_config": cfg.to_dict(),
        "model_config": state.model.config.to_dict(),
        **extra,
    }
    return ckpt.save_checkpoint(root, state.step, info, shared, per_rank, trainer_state, cfg.keep_last)


def _restore(state: TrainState, folder: Path, info: DistInfo) -> None:
    saved = ckpt.read_state(folder)
    if saved["world_size"] != info.world_size:
        raise CheckpointMismatchError(
            f"{folder} was written by {saved['world_size']} ranks, this run has {info.world_size}; "
            f"resume with the same number of processes"
        )
    if state.momentum is not None and state.queue is not None:
        state.momentum.load_averaged_state(ckpt.load_tensors(folder / "momentum.safetensors", info.device))
        state.queue.load_state_dict(ckpt.load_tensors(folder / "queue.safetensors", info.device))
    ckpt.load_optimizer(state.optimizer, folder)
    ckpt.load_rng(folder, info.rank, state.generator)
    state.step, state.epoch, state.epoch_step = saved["step"], saved["epoch"], saved["epoch_step"]

