"""One training stage of the bootstrap: `tasks.train.train_stage` with the run config's settings.

`train_model` maps a stage's settings (pretrain, finetune-filter, finetune-captioner, or
the final pretrain on D') onto `train_stage`, which streams the pair shards, checkpoints
as it goes, resumes from the newest complete checkpoint on a rerun, and returns at once
when ``out/final`` was trained with the same semantic settings. With
`nproc_per_node` > 1 the stage is relaunched under ``torchrun`` (DDP): every rank calls
`train_stage` with the same arguments.

Models trained from scratch share one tokenizer per run (``models/tokenizer``), built
from the human and web captions, so the first and the final model read captions alike.

With a run folder on object storage the trainer still writes on a local disk (the run's
local working folder: checkpoints, metrics), and `train_published` uploads the finished
model to the run URL (``RUN/models/<role>/<id>/final``, `tasks.model_store.publish_model`,
config.json last), where shard stages on other machines load it. The id is content-named
(settings, data, init weights), so a published ``final/config.json`` is a finished model:
a rerun, on this machine or another, takes it and does not train.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from data.shards import write_atomic

FINAL = "final"


def train_model(
    *,
    mode: str,
    data: list[str],
    out: str,
    init: str | None,
    preset: str,
    stage: dict[str, Any],
    device: str,
    loader_workers: int,
    vocab_size: int,
    tokenizer_dir: str,
    tokenizer_shards: list[str],
    nproc_per_node: int = 1,
) -> dict[str, Any]:
    """Train (or resume, or find finished) one model into `out`; returns its final folder and steps.

    `stage` is the run config's `TrainStageConfig` of this stage, as a dict (so it travels
    as JSON to torchrun's ranks). `tokenizer_shards` are the captions a scratch model's
    vocabulary is built from when ``tokenizer_dir`` does not exist yet.
    """
    from tasks.train import TrainStageConfig, stage_tokenizer, train_stage

    arguments = {k: v for k, v in locals().items() if k not in ("nproc_per_node", "stage_tokenizer", "train_stage",
                                                                  "TrainStageConfig")}  # fmt: skip
    if init is None and "LOCAL_RANK" not in os.environ:  # built once, before any torchrun rank starts
        stage_tokenizer(Path(tokenizer_dir), [Path(p) for p in tokenizer_shards], vocab_size)
    if nproc_per_node > 1 and "LOCAL_RANK" not in os.environ:
        return _launch_torchrun(arguments, nproc_per_node)
    cfg = TrainStageConfig(**stage)
    overrides = {**cfg.overrides(), "device": device, "num_workers": training_workers(loader_workers, device, nproc_per_node),
                 "keep_last": 2}  # fmt: skip  (progress on: a bar on a terminal, plain lines in logs)
    result = train_stage(out, data, mode, init=init, preset=preset, augment=cfg.augment, vocab_size=vocab_size,
                         tokenizer_dir=tokenizer_dir, **overrides)  # fmt: skip
    return {"final": result.final_dir, "steps": result.steps, "finished_before": result.skipped,
            "last_metrics": {k: float(v) for k, v in result.last_metrics.items()}}  # fmt: skip


def train_published(publish: str | None, **kwargs: Any) -> dict[str, Any]:
    """`train_model(**kwargs)`, then upload its final model to the URL `publish` (with the
    run's ``metrics.jsonl`` beside it, for the report); returns `train_model`'s dict with
    ``final`` the URL. A model already published there is returned untrained
    (``finished_before``). Without `publish` (a local run folder) it is `train_model`."""
    from data.storage import location
    from tasks.model_store import publish_model

    if publish is None:
        return train_model(**kwargs)
    target = location(publish)
    record = target / "training.json"
    if (target / "config.json").is_file() and record.is_file():  # config.json is uploaded last
        steps = json.loads(record.read_text()).get("steps")
        return {"final": str(target), "steps": steps, "finished_before": True, "last_metrics": {}}
    result = train_model(**kwargs)
    metrics = Path(kwargs["out"]) / "metrics.jsonl"
    if metrics.is_file():
        write_atomic(target.parent / metrics.name, metrics.read_bytes())
    publish_model(Path(result["final"]), target)
    return {**result, "final": str(target)}


def _launch_torchrun(kwargs: dict[str, Any], nproc: int) -> dict[str, Any]:
    """Run `train_model(**kwargs)` on `nproc` local processes with torchrun; output in ``out/torchrun.log``."""
    out = Path(kwargs["out"])
    out.mkdir(parents=True, exist_ok=True)
    args_file = out / "launch.json"
    args_file.write_text(json.dumps(kwargs, indent=1))
    log = out / "torchrun.log"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "flows.training", str(args_file)]  # fmt: skip
    with open(log, "w") as handle:
        done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"torchrun training into {out} failed (exit {done.returncode}); see {log}")
    final = out / FINAL
    steps = json.loads((final / "training.json").read_text()).get("steps")
    return {"final": str(final), "steps": steps, "resumed": False, "processes": nproc}


def training_workers(loader_workers: int, device: str, nproc_per_node: int) -> int:
    """A rank's DataLoader workers: `loader_workers`, or for -1 (auto) the stages' rule
    (`tasks.execution.resolve_workers`) shared among the node's ranks. The stream a rank
    sees does not depend on it (`data.dataset`)."""
    import torch

    from tasks.execution import resolve_workers

    if loader_workers >= 0:
        return loader_workers
    return resolve_workers(-1, torch.device("cuda" if device.startswith("cuda") else "cpu")) // max(1, nproc_per_node)


if __name__ == "__main__":  # one torchrun rank: `python -m flows.training ARGS.json`
    train_model(**json.loads(Path(sys.argv[1]).read_text()))
