"""`capfilt demo --quick` end to end from the command line, then a second call that resumes."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
ENV = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "NO_ALBUMENTATIONS_UPDATE": "1"}


def _demo(out: Path) -> str:
    done = subprocess.run([str(BIN / "capfilt"), "demo", "--quick", "--out", str(out)], env=ENV,
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def _weights(out: Path) -> dict[str, tuple[int, int]]:
    paths = list(out.glob("models/*/final/model.safetensors")) + list(out.glob("ingest/web/part-*.parquet"))
    return {str(p): (p.stat().st_ino, p.stat().st_mtime_ns) for p in paths}


def test_demo_quick_prints_real_results_and_resumes(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    stdout = _demo(out)
    report = out / "report.md"
    assert f"report:     {report}" in stdout and report.is_file()
    assert "# capfilt run report" in report.read_text()
    assert (out / "eval" / "metrics.json").is_file() and "retrieval: TR@1" in stdout
    queries = [line.strip() for line in stdout.splitlines() if line.strip().startswith("capfilt query")]
    assert len(queries) == 3
    first = subprocess.run([str(BIN / q) if i == 0 else q for i, q in enumerate(shlex.split(queries[0]))],
                           env=ENV, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert first.returncode == 0 and "human" in first.stdout, first.stderr[-2000:]

    before = _weights(out)
    assert len(before) >= 5
    _demo(out)  # the second call on the same folder resumes: nothing finished is redone
    assert _weights(out) == before
