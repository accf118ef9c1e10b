"""`train.nproc_per_node > 1` relaunches a training stage under torchrun (2 CPU processes, gloo)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_training_stage_under_torchrun(tmp_path: Path, random_tiny_model) -> None:
    from data.synth import SynthConfig, generate_world
    from flows.training import train_model

    generate_world(tmp_path / "world", SynthConfig(human_images=64, web_images=8, test_images=4, rows_per_shard=32))
    data = [str(p) for p in sorted((tmp_path / "world" / "human").glob("part-*.parquet"))]
    result = train_model(
        mode="finetune-filter", data=data, out=str(tmp_path / "filter"), init=str(random_tiny_model), preset="tiny",
        stage={"steps": 2, "batch_size": 8, "lr": 1e-3, "warmup_fraction": 0.0, "queue_size": 32, "checkpoint_every": 2,
               "mix_units": 3},
        device="cpu", loader_workers=0, vocab_size=256, tokenizer_dir=str(tmp_path / "tok"), tokenizer_shards=data,
        nproc_per_node=2,
    )  # fmt: skip
    assert result["processes"] == 2 and result["steps"] == 2
    record = json.loads((Path(result["final"]) / "training.json").read_text())
    assert record["steps"] == 2 and (Path(result["final"]) / "model.safetensors").is_file()
    assert record["train_config"]["mix_units"] == 3  # the run config's setting reached every rank's trainer
    assert json.loads((tmp_path / "filter" / "launch.json").read_text())["mode"] == "finetune-filter"
