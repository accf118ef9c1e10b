"""Shared fixtures for the flow tests: one Prefect test harness per session (about 10 s)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")  # a busy 2-core machine


@pytest.fixture(scope="session")
def prefect_harness():
    """A temporary Prefect API (SQLite) for the whole session; flows run against it."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def random_tiny_model(tmp_path_factory: pytest.TempPathFactory):
    """A random-weight tiny MED with a WordPiece vocabulary of the shapes world, saved with
    `blip_core.save` (used as pretrained model, filter and captioner to skip training)."""
    return save_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


def save_tiny_model(folder):
    """Save a random-weight tiny MED (seed 0, WordPiece vocabulary of the shapes world) to
    `folder` with `blip_core.save`; returns the folder. Used by the fixture and the benches."""
    import torch

    import blip_core
    from blip_core.config import preset
    from blip_core.med import MED
    from data.synth_world import all_scenes, correct_captions, weak_captions

    captions = [c for scene in all_scenes() for c in correct_captions(scene) + weak_captions(scene)]
    tokenizer = blip_core.build_tokenizer(captions + ["a picture of"], vocab_size=256)
    torch.manual_seed(0)
    blip_core.save(MED(preset("tiny").with_tokenizer(tokenizer)), tokenizer, folder)
    return folder


def write_tiny_web_shards(folder, rows: int, shards: int, distinct_images: int = 4) -> int:
    """`rows` web pairs cut into `shards` pair shards (`part-NNNNN.parquet`, sizes differing by
    at most one row) in `folder`, written directly with `data.shards.write_shard`: 32 px
    JPEGs, `distinct_images` of them reused, so thousands of shards take seconds. Returns rows."""
    import io
    from pathlib import Path

    import pyarrow as pa
    from PIL import Image

    from data.shards import shard_name, write_shard

    if not 1 <= shards <= rows:
        raise ValueError(f"need 1 <= shards <= rows, got {shards} shards for {rows} rows")
    jpgs = []
    for i in range(distinct_images):
        buffer = io.BytesIO()
        Image.new("RGB", (32, 32), ((60 * i) % 256, 120, (200 - 40 * i) % 256)).save(buffer, format="JPEG")
        jpgs.append(buffer.getvalue())
    base, extra = divmod(rows, shards)
    row = 0
    for s in range(shards):
        keys = [f"w{r:06d}" for r in range(row, row + base + (s < extra))]
        row += len(keys)
        table = pa.table({
            "key": keys, "image_id": keys, "source": ["web"] * len(keys),
            "caption": ["a red circle on grass"] * len(keys), "status": ["ok"] * len(keys),
            "jpg": pa.array([jpgs[int(k[1:]) % distinct_images] for k in keys], pa.binary()),
            "width": pa.array([32] * len(keys), pa.int32()), "height": pa.array([32] * len(keys), pa.int32()),
        })  # fmt: skip
        write_shard(table, Path(folder) / shard_name(s), kind="pairs")
    return rows


def small_world_config(run_dir, model, **overrides):
    """A RunConfig on a small synthetic world whose web shards are linked (no img2dataset),
    using `model` for every role, so no training runs."""
    from flows.config import load_config

    values = {
        "preset": "demo-quick",
        "run_dir": str(run_dir),
        "data": {"world": {"n_human": 60, "n_web": 150, "n_test": 20, "shard_rows": 30}, "serve_local": False},
        "model": {"pretrained": str(model), "filter": str(model), "captioner": str(model)},
        "stages": {"stop_after": "assemble"},
        "runner": {"max_workers": 2},
    }
    for key, value in overrides.items():
        values[key] = {**values.get(key, {}), **value} if isinstance(value, dict) else value
    return load_config(values)
