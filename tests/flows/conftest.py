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
    import torch

    import blip_core
    from blip_core.config import preset
    from blip_core.med import MED
    from data.synth_world import all_scenes, correct_captions, weak_captions

    captions = [c for scene in all_scenes() for c in correct_captions(scene) + weak_captions(scene)]
    tokenizer = blip_core.build_tokenizer(captions + ["a picture of"], vocab_size=256)
    torch.manual_seed(0)
    model = MED(preset("tiny").with_tokenizer(tokenizer))
    folder = tmp_path_factory.mktemp("model") / "tiny"
    blip_core.save(model, tokenizer, folder)
    return folder


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
