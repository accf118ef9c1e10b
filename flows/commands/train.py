"""capfilt CLI command `capfilt train`: pretrain or finetune a MED on pair shards.

Single process: ``capfilt train --mode pretrain --data runs/x/ingest/human --out runs/x/models/pretrain``.
Several GPUs / nodes: ``torchrun --nproc_per_node 8 -m flows.cli train ...`` (same options).
Rerun with ``--resume`` after an interruption: training continues from the newest
complete checkpoint in ``--out``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from flows.commands import local_path


_MODES = ("pretrain", "finetune-filter", "finetune-captioner")
# Extra positional words after `--data A` are more shards (`--data web/*.parquet`).
_MANY_INPUTS = {"allow_extra_args": True}


def _data(ctx: typer.Context, first: list[str]) -> list[str]:
    items = list(first) + list(ctx.args)
    for item in items:
        if item.startswith("-"):
            raise typer.BadParameter(f"unknown option {item!r}")
    if not items:
        raise typer.BadParameter("give at least one --data shard or folder")
    return items


def train(
    ctx: typer.Context,
    mode: str = typer.Option(..., help="pretrain (ITC+ITM+LM) | finetune-filter (ITC+ITM) | finetune-captioner (LM)."),
    data: list[str] = typer.Option(..., "--data", help="Pair shards or folders of part-*.parquet (several may follow)."),
    out: Path = typer.Option(..., parser=local_path, help="Run folder: checkpoints/, metrics.jsonl and final/ (the trained model)."),
    init: Path | None = typer.Option(None, parser=local_path, help="Start from this model folder (ours or a Hugging Face BLIP folder)."),
    preset: str = typer.Option("tiny", help="Model size when training from scratch: tiny | base | large."),
    resume: bool = typer.Option(False, "--resume/--no-resume", help="Continue from the newest complete checkpoint in --out."),
    steps: int | None = typer.Option(None, help="Stop after this many optimizer steps (the schedule spans them)."),
    epochs: int | None = typer.Option(None, help="Passes over the data (default: BLIP's per mode: 20 / 6 / 5)."),
    batch_size: int | None = typer.Option(None, help="Samples per process per micro-batch (default 32)."),
    grad_accum: int | None = typer.Option(None, help="Micro-batches per optimizer step (default 1)."),
    lr: float | None = typer.Option(None, help="Peak learning rate (default: 3e-4 pretrain, 1e-5 finetune)."),
    schedule: str | None = typer.Option(None, help="step (x decay-rate per epoch) | cosine (default: step pretrain, cosine finetune)."),
    warmup_steps: int | None = typer.Option(None, help="Linear warmup steps (default: 3000 pretrain, 0 finetune)."),
    weight_decay: float | None = typer.Option(None, help="AdamW weight decay (default 0.05)."),
    grad_clip: float | None = typer.Option(None, help="Max global gradient norm (default 1.0)."),
    queue_size: int | None = typer.Option(None, help="ITC momentum queue; a multiple of batch x processes (default 57600)."),
    image_size: int | None = typer.Option(None, help="Input pixels (default: 224 pretrain, 384 finetune; tiny: 32)."),
    augment: bool = typer.Option(True, "--augment/--no-augment", help="Random resized crop + horizontal flip."),
    vocab_size: int = typer.Option(1000, help="Tokenizer size when training from scratch (built from the captions)."),
    seed: int | None = typer.Option(None, help="Seed of weights, data order and augmentation (default 42)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda."),
    bf16: bool = typer.Option(True, "--bf16/--no-bf16", help="bf16 autocast on CUDA."),
    activation_checkpointing: bool = typer.Option(False, help="Recompute ViT blocks in backward to save memory."),
    compile: bool = typer.Option(False, "--compile/--no-compile", help="torch.compile the ViT."),
    workers: int = typer.Option(0, help="DataLoader processes per rank decoding images."),
    log_every: int = typer.Option(10, help="Steps between metrics.jsonl lines."),
    checkpoint_every: int = typer.Option(500, help="Steps between checkpoints (one is always written at the end)."),
    keep_last: int = typer.Option(3, help="Complete checkpoints kept."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Train a MED on pair shards; prints the final model folder and last losses as JSON."""
    from tasks.train import train_stage

    if mode not in _MODES:
        raise typer.BadParameter(f"--mode must be one of {', '.join(_MODES)}; got {mode!r}")
    optional: dict[str, Any] = {
        "max_steps": steps, "epochs": epochs, "batch_size": batch_size, "grad_accum": grad_accum, "lr": lr,
        "schedule": schedule, "warmup_steps": warmup_steps, "weight_decay": weight_decay, "grad_clip": grad_clip,
        "queue_size": queue_size, "image_size": image_size, "seed": seed,
    }  # fmt: skip
    overrides = {k: v for k, v in optional.items() if v is not None}
    overrides.update(
        resume=resume, device=device, bf16=bf16, activation_checkpointing=activation_checkpointing, compile=compile,
        num_workers=workers, log_every=log_every, checkpoint_every=checkpoint_every, keep_last=keep_last,
        progress=progress,
    )  # fmt: skip
    result = train_stage(
        out, _data(ctx, data), mode, init=init, preset=preset, augment=augment, vocab_size=vocab_size, **overrides
    )
    typer.echo(json.dumps({"final": result.final_dir, "steps": result.steps, "skipped": result.skipped,
                           "last_metrics": result.last_metrics}, indent=2))  # fmt: skip


def register(app: typer.Typer) -> None:
    """Add `capfilt train` to the app."""
    app.command(context_settings=_MANY_INPUTS)(train)
