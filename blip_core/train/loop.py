"""The training loop: `train(cfg, dataset_factory, tokenizer=None) -> TrainResult`.

Writes under `cfg.out_dir`:
- ``checkpoints/step-NNNNNNNN/`` every `checkpoint_every` steps and at the end (atomic,
  newest `keep_last` kept; each is also a `blip_core.load`-able model folder);
- ``metrics.jsonl``: one flushed line per `log_every` steps;
- ``final/``: the trained model via `blip_core.save` (plus ``training.json``), renamed
  into place when complete.

A rerun with `resume=True` continues from the newest complete checkpoint; on CPU the
result is bit-identical to a run that was never interrupted, because the data position,
every RNG, the optimizer, the momentum encoders and the queues are all restored and
the schedules are pure functions of the step.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from blip_core.atomic import replace_folder
from blip_core.checkpoint import save as save_model_folder
from blip_core.med import MED
from blip_core.progress import progress_bar
from blip_core.tokenizer import Tokenizer
from blip_core.train import checkpoint as ckpt
from blip_core.train.config import TrainConfig
from blip_core.train.distributed import DistInfo, all_gather_cat, all_reduce_min, all_reduce_sum, barrier, init_distributed
from blip_core.train.metrics import MetricsWriter, truncate_after
from blip_core.train.objectives import BlipObjectives, ContrastBank, lm_target_count, prepare_batch
from blip_core.train.schedule import alpha_at, lr_at
from blip_core.train.state import TrainState, build_state, save_state

# Loss parts worth a metrics column (counts such as lm_tokens are left out).
_LOGGED_PARTS = ("loss", "itc", "itc_i2t", "itc_t2i", "itm", "itm_acc", "lm")


class EmptyDatasetError(ValueError):
    """The dataset holds fewer samples than one optimizer step needs."""


class NonFiniteLossError(FloatingPointError):
    """A NaN/inf loss; the message names the step and the last good checkpoint."""


class ResumableDataset(Protocol):
    """What the trainer needs of a dataset (`data.dataset.PairDataset` is one)."""

    def __len__(self) -> int: ...  # this rank's samples in the current epoch
    def __iter__(self) -> Iterator[dict[str, Any]]: ...  # {"pixel_values", "caption", "image_id", ...}
    def set_epoch(self, epoch: int) -> None: ...
    def start_at(self, position: int) -> None: ...


# (rank, world_size) -> this rank's dataset
DatasetFactory = Callable[[int, int], ResumableDataset]


@dataclass
class TrainResult:
    out_dir: Path
    final_dir: Path  # `blip_core.load`-able folder of the trained model
    steps: int
    last_checkpoint: Path | None
    last_metrics: dict[str, float] = field(default_factory=dict)
    model: MED | None = field(default=None, repr=False)  # this rank's trained model, in memory


def _resume_point(cfg: TrainConfig, root: Path) -> Path | None:
    latest = ckpt.latest_checkpoint(root)
    if latest is not None and not cfg.resume:
        raise ckpt.CheckpointError(
            f"{root} already holds checkpoints (newest {latest.name}); pass resume=True (--resume) to "
            f"continue, or choose an empty output folder"
        )
    return latest


def _epoch_plan(cfg: TrainConfig, dataset: ResumableDataset, info: DistInfo) -> list[int]:
    """Optimizer steps in each epoch (the same on every rank: the smallest rank's).

    Stops listing epochs once `max_steps` is covered, so a huge `epochs` costs nothing.
    """
    per_step = cfg.batch_size * cfg.grad_accum
    plan: list[int] = []
    for epoch in range(cfg.epochs):
        dataset.set_epoch(epoch)
        plan.append(all_reduce_min(len(dataset) // per_step, info))
        if plan[0] == 0:
            where = getattr(dataset, "shards", None)
            raise EmptyDatasetError(
                f"dataset{f' over {[str(p) for p in where]}' if where else ''} yields {len(dataset)} samples "
                f"per rank, fewer than one step of batch_size {cfg.batch_size} x grad_accum {cfg.grad_accum}; "
                f"add data or lower the batch size"
            )
        if cfg.max_steps is not None and sum(plan) >= cfg.max_steps:
            break
    return plan


def _batches(dataset: ResumableDataset, epoch: int, position: int, cfg: TrainConfig, info: DistInfo) -> Iterator[dict[str, Any]]:
    """Batches of `epoch` from stream position `position` on (full batches only)."""
    dataset.set_epoch(epoch)
    dataset.start_at(position)
    loader = DataLoader(
        dataset,  # type: ignore[arg-type]
        batch_size=cfg.batch_size,
        drop_last=True,
        num_workers=cfg.num_workers,
        pin_memory=info.device.type == "cuda",
        # own generator: creating the iterator must not draw from the global torch RNG
        generator=torch.Generator().manual_seed(cfg.seed + epoch),
    )
    return iter(loader)


class TrainStep:
    """One optimizer step (grad_accum micro-batches) on a `TrainState`: what the loop and bench/train_step.py run."""

    def __init__(self, cfg: TrainConfig, state: TrainState, info: DistInfo, steps_per_epoch: int, total: int) -> None:
        self.cfg, self.state, self.info = cfg, state, info
        self.steps_per_epoch, self.total = steps_per_epoch, total
        self.prompt_length = state.tokenizer.prompt_length(cfg.prompt) if cfg.prompt else 0
        module = BlipObjectives(state.model, cfg.objectives, cfg.retrieval, self.prompt_length, cfg.label_smoothing)
        if info.distributed:
            module = DistributedDataParallel(
                module,
                device_ids=[info.device.index] if info.device.type == "cuda" else None,
                find_unused_parameters=cfg.mode != "pretrain",  # the other modes leave heads unused
            )
        self.objectives = module
        self.last_checkpoint: Path | None = None

    def autocast(self) -> contextlib.AbstractContextManager:
        on_cuda = self.info.device.type == "cuda"
        return torch.autocast(device_type=self.info.device.type, dtype=torch.bfloat16, enabled=on_cuda and self.cfg.bf16)

    def step(self, batches: Iterator[dict[str, Any]]) -> dict[str, float]:
        cfg, state = self.cfg, self.state
        lr = lr_at(cfg, state.step, state.epoch, self.total)
        for group in state.optimizer.param_groups:
            group["lr"] = lr
        alpha = alpha_at(cfg, state.step, self.steps_per_epoch)
        sums: dict[str, float] = {}
        for micro in range(cfg.grad_accum):
            samples = next(batches)
            batch = prepare_batch(
                samples, state.tokenizer, cfg.objectives, cfg.max_words, cfg.text_max_length, cfg.prompt, self.info.device
            )
            last = micro == cfg.grad_accum - 1
            no_sync = self.objectives.no_sync if (self.info.distributed and not last) else contextlib.nullcontext
            with no_sync():
                parts = self._micro(batch, alpha)
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v / cfg.grad_accum
        params = [p for p in state.model.parameters() if p.grad is not None]
        if cfg.grad_clip is not None:
            sums["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
        state.optimizer.step()
        state.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            state.model.temp.clamp_(state.model.config.temp_min, state.model.config.temp_max)
        if state.momentum is not None:
            state.momentum.update(state.model)
        return {**sums, "lr": lr, "alpha": alpha}

    def _micro(self, batch: Any, alpha: float) -> dict[str, float]:
        state, info = self.state, self.info
        bank = gathered = None
        if state.queue is not None and state.momentum is not None:
            with torch.no_grad(), self.autocast():
                image_m = state.momentum.image_features(batch.pixel_values).float()  # (B, E)
                text_m = state.momentum.text_features(batch.text_ids, batch.text_mask).float()  # (B, E)
            gathered = (all_gather_cat(image_m, info), all_gather_cat(text_m, info), all_gather_cat(batch.image_ids, info))
            bank = ContrastBank(image_m, text_m, *state.queue.bank(*gathered), offset=info.rank * len(batch))
        lm_normalizer = None
        if "lm" in self.cfg.objectives:
            tokens = all_reduce_sum(lm_target_count(batch, self.prompt_length).float(), info)
            lm_normalizer = tokens.clamp(min=1.0) / info.world_size
        with self.autocast():
            parts = self.objectives(batch, bank, alpha, state.generator, lm_normalizer)
        self._check_finite(parts)
        (parts["loss"] / self.cfg.grad_accum).backward()
        if gathered is not None:
            state.queue.enqueue(*gathered)
        return {k: float(v.detach()) for k, v in parts.items() if k in _LOGGED_PARTS}

    def _check_finite(self, parts: dict[str, torch.Tensor]) -> None:
        bad = torch.tensor(0.0 if bool(torch.isfinite(parts["loss"].detach()).all()) else 1.0, device=self.info.device)
        if float(all_reduce_sum(bad, self.info)) > 0:
            shown = {k: float(v.detach()) for k, v in parts.items() if k in _LOGGED_PARTS}
            raise NonFiniteLossError(
                f"step {self.state.step + 1} (epoch {self.state.epoch}): loss is not finite {shown}; training "
                f"stopped without saving. Last good checkpoint: {self.last_checkpoint or 'none'}. Lower the "
                f"learning rate or check the data, then resume"
            )


def _mean_over_ranks(values: dict[str, float], info: DistInfo) -> dict[str, float]:
    if not info.distributed:
        return values
    keys = sorted(values)
    t = all_reduce_sum(torch.tensor([values[k] for k in keys], dtype=torch.float64, device=info.device), info)
    return {k: float(v) / info.world_size for k, v in zip(keys, t.tolist())}


def _export_final(state: TrainState, cfg: TrainConfig, out: Path, last: Path | None) -> Path:
    """Save the model with `blip_core.save` into ``out/final`` via a temporary folder and rename."""
    final, tmp = out / "final", out / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_model_folder(state.model, state.tokenizer, tmp)
    ckpt.write_json(
        tmp / "training.json",
        {"steps": state.step, "checkpoint": last.name if last else None, "train_config": cfg.to_dict()},
    )
    replace_folder(tmp, final)
    return final


def train(cfg: TrainConfig, dataset_factory: DatasetFactory, tokenizer: Tokenizer | None = None) -> TrainResult:
    """Train per `cfg` on the dataset `dataset_factory(rank, world_size)` returns; see the module doc.

    `tokenizer` is needed when training from scratch (else it comes from `cfg.init`
    or the checkpoint). Under torchrun every rank calls this.
    """
    cfg.validate()
    joined_here = not (dist.is_available() and dist.is_initialized())
    info = init_distributed(cfg.device)
    out, root = Path(cfg.out_dir), Path(cfg.out_dir) / "checkpoints"
    if info.is_main:
        root.mkdir(parents=True, exist_ok=True)
    barrier(info)
    try:
        return _run(cfg, dataset_factory, tokenizer, info, out, root)
    finally:
        if joined_here and info.distributed and dist.is_initialized():
            dist.destroy_process_group()


def _run(
    cfg: TrainConfig, factory: DatasetFactory, tokenizer: Tokenizer | None, info: DistInfo, out: Path, root: Path
) -> TrainResult:
    resume_from = _resume_point(cfg, root)
    state = build_state(cfg, info, tokenizer, resume_from)
    dataset = factory(info.rank, info.world_size)
    plan = _epoch_plan(cfg, dataset, info)
    total = min(sum(plan), cfg.max_steps) if cfg.max_steps else sum(plan)
    stepper = TrainStep(cfg, state, info, plan[0], total)
    stepper.last_checkpoint = resume_from
    metrics_path = out / "metrics.jsonl"
    if info.is_main:
        truncate_after(metrics_path, state.step)
    writer = MetricsWriter(metrics_path, enabled=info.is_main)
    bar = progress_bar(total, cfg.mode, unit="step", enabled=info.is_main and cfg.progress, initial=state.step,
                       leave=True)
    last: dict[str, float] = {}
    try:
        tick, samples = time.perf_counter(), 0
        while state.step < total and state.epoch < len(plan):
            if state.epoch_step >= plan[state.epoch]:
                state.epoch, state.epoch_step = state.epoch + 1, 0
                continue
            position = state.epoch_step * cfg.batch_size * cfg.grad_accum
            batches = _batches(dataset, state.epoch, position, cfg, info)
            while state.epoch_step < plan[state.epoch] and state.step < total:
                values = stepper.step(batches)
                state.step, state.epoch_step = state.step + 1, state.epoch_step + 1
                samples += cfg.batch_size * cfg.grad_accum * info.world_size
                if state.step % cfg.log_every == 0 or state.step == total:
                    now = time.perf_counter()
                    values = _mean_over_ranks(values, info)
                    last = {**values, "samples_per_s": samples / max(now - tick, 1e-9), "temp": float(state.model.temp.detach())}
                    writer.write({"step": state.step, "epoch": state.epoch, **last})
                    bar.set_postfix({"loss": f"{last['loss']:.3g}", "samples/s": f"{last['samples_per_s']:.3g}"})
                    tick, samples = now, 0
                bar.update(1)
                if state.step % cfg.checkpoint_every == 0:
                    stepper.last_checkpoint = save_state(state, cfg, info, root, {})
        if stepper.last_checkpoint is None or ckpt.read_state(stepper.last_checkpoint)["step"] != state.step:
            stepper.last_checkpoint = save_state(state, cfg, info, root, {})
        final = out / "final"
        if info.is_main:
            final = _export_final(state, cfg, out, stepper.last_checkpoint)
        barrier(info)
    finally:
        writer.close()
        bar.close()
    return TrainResult(out, final, state.step, stepper.last_checkpoint, last, state.model)
