"""One training stage of the bootstrap: `blip_core.train` over the run's pair shards.

`train_model` builds the trainer config for a stage (pretrain, finetune-filter,
finetune-captioner, or the final pretrain on D'), streams the shards through
`data.dataset.PairDataset`, and returns the trained model's folder
(``models/<name>/final``). The trainer checkpoints as it goes and `resume=True`
continues from the newest complete checkpoint, so a rerun after a crash resumes; a
stage whose ``final`` model exists returns at once.

Models trained from scratch share one tokenizer per run (``models/tokenizer``),
built from the human and web captions (deterministic, so rebuilding it is harmless).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

FINAL = "final"


def _captions(shards: list[str]) -> list[str]:
    captions: list[str] = []
    for path in shards:
        column = pq.read_table(path, columns=["caption"]).column("caption").to_pylist()
        captions += [c for c in column if c]
    return captions


def run_tokenizer(folder: Path, caption_shards: list[str], vocab_size: int) -> Any:
    """The run's tokenizer: loaded from `folder` or built from the captions and saved there."""
    from blip_core.tokenizer import Tokenizer, build_tokenizer

    if folder.is_dir():
        return Tokenizer.from_folder(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(_captions(caption_shards), vocab_size=vocab_size)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer.save(tmp)
    os.replace(tmp, folder)
    return tokenizer


def _image_size(model_dir: str) -> int:
    """The input size a saved model (ours or Hugging Face's) was built for."""
    raw = json.loads((Path(model_dir) / "config.json").read_text())
    if "med" in raw:
        return int(raw["med"]["vision"]["image_size"])
    return int(raw.get("vision_config", {}).get("image_size", 384))


def _finished_with(final: Path, cfg: Any) -> bool:
    """True when `final` holds a model trained with the same semantic settings as `cfg`.

    Otherwise the trainer runs: it resumes from the newest checkpoint, or refuses a
    checkpoint whose settings differ (so a changed config never reuses a stale model).
    """
    from blip_core.train import TrainConfig

    record = final / "training.json"
    if not (final / "config.json").is_file() or not record.is_file():
        return False
    try:
        saved = TrainConfig.from_dict(json.loads(record.read_text())["train_config"])
    except (ValueError, KeyError, TypeError):
        return False
    return not cfg.semantic_diff(saved)


def train_model(
    *,
    mode: str,
    data: list[str],
    out: str,
    init: str | None,
    preset: str,
    steps: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    warmup_fraction: float,
    schedule: str,
    queue_size: int | None,
    augment: bool,
    image_size: int | None,
    checkpoint_every: int,
    seed: int,
    device: str,
    vocab_size: int,
    tokenizer_dir: str,
    tokenizer_shards: list[str],
    nproc_per_node: int = 1,
) -> dict[str, Any]:
    """Train (or resume, or find finished) one model into `out`; returns its final folder and steps.

    With `nproc_per_node` > 1 the same call is relaunched under ``torchrun`` (DDP, one
    process per GPU); every rank runs this function and the trainer splits the data.
    """
    if nproc_per_node > 1 and "LOCAL_RANK" not in os.environ:
        return _launch_torchrun({k: v for k, v in locals().items() if k != "nproc_per_node"}, nproc_per_node)
    from blip_core.image import ImageTransform
    from blip_core.train import TrainConfig, train
    from data.dataset import PairDataset

    out_dir = Path(out)
    final = out_dir / FINAL
    size = image_size or (_image_size(init) if init else 0)
    overrides: dict[str, Any] = {
        "out_dir": str(out_dir), "preset": preset, "init": init, "image_size": size, "epochs": 1_000_000,
        "max_steps": steps, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
        "warmup_steps": round(warmup_fraction * steps), "schedule": schedule, "seed": seed, "device": device,
        "num_workers": 0, "progress": False, "checkpoint_every": checkpoint_every, "keep_last": 2, "resume": True,
    }  # fmt: skip
    if queue_size is not None:
        overrides["queue_size"] = queue_size
    cfg = TrainConfig.for_mode(mode, **overrides)
    if _finished_with(final, cfg):
        return {"final": str(final), "steps": steps, "resumed": False, "finished_before": True}
    transform = ImageTransform(cfg.resolved_image_size(), train=augment)
    shards = [Path(p) for p in data]

    def factory(rank: int, world_size: int) -> PairDataset:
        if augment:
            return PairDataset(shards, transform=transform, seed=seed, rank=rank, world_size=world_size)
        return PairDataset(shards, transform=lambda img, rng: transform(img), seed=seed, rank=rank, world_size=world_size)

    tokenizer = None
    if init is None:
        tokenizer = run_tokenizer(Path(tokenizer_dir), tokenizer_shards, vocab_size)
    resumed = any((out_dir / "checkpoints").glob("*")) if (out_dir / "checkpoints").is_dir() else False
    result = train(cfg, factory, tokenizer=tokenizer)
    return {"final": str(result.final_dir), "steps": result.steps, "resumed": resumed,
            "last_metrics": {k: float(v) for k, v in result.last_metrics.items()}}  # fmt: skip


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


if __name__ == "__main__":  # one torchrun rank: `python -m flows.training ARGS.json`
    train_model(**json.loads(Path(sys.argv[1]).read_text()))
