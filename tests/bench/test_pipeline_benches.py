"""bench/pipeline.py and bench/peers.py run end to end on tiny inputs and print their tables
(slow: each builds models and runs every variant once)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false", "NO_ALBUMENTATIONS_UPDATE": "1"}


def _run(*args: str) -> str:
    result = subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
def test_pipeline_bench_prints_efficiency_and_linear_cost() -> None:
    out = _run("bench/pipeline.py", "--presets", "tiny", "--tiny-images", "16", "--tiny-batch", "8",
               "--linear-rows", "64", "--repeats", "1")  # fmt: skip
    rows = [line for line in out.splitlines() if line.startswith("| tiny |")]
    assert [r.split("|")[2].strip() for r in rows] == ["filter", "caption"]
    assert all("%" in r for r in rows)
    linear = [line for line in out.splitlines() if line.startswith(("| caption |", "| filter |"))]
    assert len(linear) == 10
    fsyncs = {line.split("|")[1].strip(): float(line.split("|")[8]) for line in linear}
    assert fsyncs == {"caption": 2.0, "filter": 6.0}  # the 16x row: a data file + a record per output


@pytest.mark.slow
def test_peers_bench_prints_filter_and_caption_tables() -> None:
    out = _run("bench/peers.py", "--preset", "tiny", "--images", "3", "--batch-size", "4")
    assert "per-sample loop (Data-Juicer style" in out and "per-sample generate" in out
    assert "max |dp|" in out
