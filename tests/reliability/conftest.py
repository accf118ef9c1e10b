"""Shared inputs of the reliability suite: one small world (tiny random model, web and
human shards, caption and filter outputs) built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from reliability_harness import build_world

SEED = 20261129  # every seeded choice of the suite derives from it


@pytest.fixture(scope="session", autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_world(tmp_path_factory.mktemp("reliability-world"))
