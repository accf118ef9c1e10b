"""Learning-rate and distillation-weight schedules as pure functions of the step.

Being functions of (step, epoch) only, they need no saved state beyond the step: a
resumed run sets the same values as an uninterrupted one.
"""

from __future__ import annotations

import math

from blip_core.train.config import TrainConfig


def lr_at(cfg: TrainConfig, step: int, epoch: int, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based) in `epoch`.

    Linear warmup from `warmup_lr` to `lr` over `warmup_steps`, then either BLIP's
    step decay (``max(min_lr, lr * decay_rate ** epoch)``) or a cosine from `lr` to
    `min_lr` over the remaining steps.
    """
    if step < cfg.warmup_steps:
        return cfg.warmup_lr + (cfg.lr - cfg.warmup_lr) * step / cfg.warmup_steps
    if cfg.schedule == "step":
        return max(cfg.min_lr, cfg.lr * cfg.decay_rate**epoch)
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def alpha_at(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Distillation weight: ramps linearly from 0 to `alpha` over `alpha_ramp_steps` (0: one epoch)."""
    ramp = cfg.alpha_ramp_steps or steps_per_epoch
    if ramp <= 0:
        return cfg.alpha
    return cfg.alpha * min(1.0, step / ramp)
