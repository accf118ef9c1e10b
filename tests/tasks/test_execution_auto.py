"""Batch size and decoding workers chosen from the machine (`tasks.execution`): cores from the
affinity mask, batch from device memory on CUDA, one log line naming the choice, every
knob still settable."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from stage_helpers import tiny_model, web_shards

from blip_core.config import VisionConfig
from tasks.execution import (
    ExecutionConfig,
    batch_for_memory,
    image_activation_bytes,
    resolve_batch_size,
    resolve_execution,
    resolve_workers,
    usable_cores,
)
from tasks.filter import FilterConfig, run_filter

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_cores_come_from_the_affinity_mask() -> None:
    assert usable_cores() == len(os.sched_getaffinity(0)) >= 1


def test_auto_workers_follow_cores_and_device_and_a_set_value_wins() -> None:
    assert [resolve_workers(-1, CUDA, cores=c) for c in (1, 2, 16, 64)] == [0, 1, 15, 32]
    assert [resolve_workers(-1, CPU, cores=c) for c in (2, 4, 8, 16, 64)] == [0, 0, 2, 4, 4]
    assert resolve_workers(3, CPU, cores=1) == 3 and resolve_workers(0, CUDA, cores=64) == 0


def test_auto_batch_from_memory() -> None:
    base = VisionConfig()  # ViT-B/16 at 384 px
    per_image = image_activation_bytes(base, copies=2)
    assert 20 * 2**20 < per_image < 200 * 2**20
    assert image_activation_bytes(base, copies=6) > per_image > image_activation_bytes(VisionConfig(image_size=224), 2)
    assert batch_for_memory(140 * 2**30, per_image) in (256, 512, 1024)
    assert batch_for_memory(2**30, per_image) == 16  # never below 16
    assert batch_for_memory(10**15, 1) == 1024  # never above 1024
    sizes = [batch_for_memory(g * 2**30, per_image) for g in (8, 16, 32, 64)]
    assert sizes == sorted(sizes) and all(s & (s - 1) == 0 for s in sizes)


def test_cpu_fallback_and_set_values() -> None:
    assert resolve_batch_size(0, CPU, VisionConfig(), 2) == (32, "auto, CPU")
    assert resolve_batch_size(7, CUDA, VisionConfig(), 2) == (7, "set")  # set: no device query


def test_the_choice_is_logged_once_and_reported_by_the_stage(tmp_path: Path, caplog) -> None:
    (tmp_path / "web").mkdir()
    webs = web_shards(tmp_path / "web", (4, 3))
    model = tiny_model(tmp_path / "model")
    with caplog.at_level(logging.INFO, logger="tasks.execution"):
        stats = run_filter(webs, tmp_path / "out", model, FilterConfig(execution=ExecutionConfig(progress=False)))
    lines = [r.getMessage() for r in caplog.records if r.name == "tasks.execution"]
    assert len(lines) == 1 and lines[0] == stats.execution
    assert stats.execution.startswith("filter: batch_size 32 (auto, CPU), num_workers ")
    assert f"{usable_cores()} usable cores" in stats.execution
    chosen = resolve_execution(ExecutionConfig(batch_size=5, num_workers=0), CPU, VisionConfig(), 2, "caption")
    assert (chosen.batch_size, chosen.num_workers) == (5, 0) and "(set)" in chosen.why
