"""`capfilt demo --quick` end to end from the command line: interrupted once with Ctrl-C,
resumed to the end, then a last call that finds everything done and runs `--ablation`."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
ENV = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "NO_ALBUMENTATIONS_UPDATE": "1"}


def _demo(out: Path, *flags: str) -> str:
    done = subprocess.run([str(BIN / "capfilt"), "demo", "--quick", "--out", str(out), *flags], env=ENV,
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def _interrupt_during_pretraining(out: Path) -> str:
    """Start the demo in its own process group, press Ctrl-C (SIGINT to the group, as a
    terminal does) once the first model is training, and return what it printed."""
    proc = subprocess.Popen([str(BIN / "capfilt"), "demo", "--quick", "--out", str(out)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 600  # models/pretrain/<id>/metrics.jsonl: the first model is training
    while not any(m.stat().st_size for m in out.glob("models/pretrain/*/metrics.jsonl")) and proc.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.05)  # the first line comes at step 10 of 20: on an idle CPU the rest take about a second
    assert proc.poll() is None, "the demo ended before its first model trained"
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)  # one press is enough: no second Ctrl-C
    assert proc.returncode == 130, stderr[-3000:]
    assert f"resume with: capfilt demo --quick --out {out}" in stderr
    deadline = time.monotonic() + 60  # the temporary API server got the same SIGINT and stops too
    while _group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _group_alive(proc.pid), "processes of the interrupted demo are still running"
    return stdout


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _weights(out: Path) -> dict[str, tuple[int, int]]:
    paths = list(out.glob("models/*/*/final/model.safetensors")) + list(out.glob("ingest/web/part-*.parquet"))
    return {str(p): (p.stat().st_ino, p.stat().st_mtime_ns) for p in paths}


def test_demo_quick_survives_ctrl_c_prints_real_results_and_resumes(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    _interrupt_during_pretraining(out)
    assert not list(out.glob("models/pretrain/*/final"))
    stdout = _demo(out)  # resumes: the ingested shards are kept, the pretraining continues
    report = out / "report.md"
    assert f"report:     {report}" in stdout and report.is_file()
    assert "# capfilt run report" in report.read_text()
    assert (out / "eval" / "metrics.json").is_file() and "retrieval: TR@1" in stdout
    assert (out / "eval" / "video.json").is_file() and "zero-shot video (final, 40 clips x 8 frames)" in stdout
    assert "## Zero-shot video" in report.read_text()
    queries = [line.strip() for line in stdout.splitlines() if line.strip().startswith("capfilt query")]
    assert len(queries) == 3
    first = subprocess.run([str(BIN / q) if i == 0 else q for i, q in enumerate(shlex.split(queries[0]))],
                           env=ENV, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert first.returncode == 0 and "human" in first.stdout, first.stderr[-2000:]

    before = _weights(out)
    assert len(before) >= 5
    # the second call on the same folder resumes: nothing finished is redone; --ablation
    # then runs the (quick) miniature Table 1 into the run folder and prints it
    stdout = _demo(out, "--ablation")
    assert _weights(out) == before
    table = (out / "ablation" / "table.md").read_text()
    assert "| human + filtered web + filtered synthetic (C+F) |" in table and "78.4 / 60.7" in table
    assert "filter ROC-AUC" in stdout and table.splitlines()[2] in stdout
