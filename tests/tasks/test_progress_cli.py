"""Progress of the stage and training commands: a live bar under a pseudo-terminal, plain
lines (no carriage returns) when output is piped (`blip_core.progress`)."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest
from stage_helpers import tiny_model, web_shards

ROOT = Path(__file__).resolve().parents[2]


def _capfilt(args: list[str], tty: bool, size: tuple[int, int] = (40, 120)) -> tuple[str, str]:
    """Run `capfilt ARGS`; under a pseudo-terminal of `size` (rows, columns; stdout and
    stderr both on it) return its output as ("", terminal); piped, return (stdout, stderr)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "160", "NO_ALBUMENTATIONS_UPDATE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}  # fmt: skip
    cmd = [sys.executable, "-m", "flows.cli", *args]
    if not tty:
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout, done.stderr
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", *size, 0, 0))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=follower, stdout=follower, stderr=follower)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert proc.wait(timeout=120) == 0, b"".join(chunks).decode(errors="replace")
    return "", b"".join(chunks).decode(errors="replace")


@pytest.fixture(scope="module")
def caption_args(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    web = web_shards(tmp_path_factory.mktemp("progress-in"), (40, 30), failed=())
    model = tiny_model(tmp_path_factory.mktemp("progress-model"))
    return ["caption", "--input", str(web[0].parent), "--model", str(model), "--device", "cpu", "--batch-size", "8",
            "--workers", "0", "--max-length", "8"]  # fmt: skip


@pytest.mark.parametrize("size", [(40, 120), (0, 0)])  # 0 x 0: a pseudo-terminal nobody sized
def test_caption_draws_a_bar_on_a_terminal(caption_args: list[str], tmp_path: Path, size: tuple[int, int]) -> None:
    _, terminal = _capfilt([*caption_args, "--output", str(tmp_path / "caption")], tty=True, size=size)
    assert "\r" in terminal  # a live bar redraws its line
    assert re.search(r"caption part-00000\.parquet: +\d+%.*? \d+/40 \[", terminal), terminal
    assert re.search(r"caption part-00001\.parquet: .*/30 \[.*img/s", terminal), terminal


def test_caption_prints_plain_lines_when_piped(caption_args: list[str], tmp_path: Path) -> None:
    _, err = _capfilt([*caption_args, "--output", str(tmp_path / "caption")], tty=False)
    assert "\r" not in err and "\x1b[" not in err
    lines = [line for line in err.splitlines() if line.startswith("caption part-")]
    assert any(re.fullmatch(r"caption part-00000\.parquet: 100% 40/40 \[\d\d:\d\d<00:00, +[\d.]+img/s\]", line)
               for line in lines), err  # fmt: skip
    assert any(line.startswith("caption part-00001.parquet: 100% 30/30 [") for line in lines), err


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from data.synth import SynthConfig, generate_world

    out = tmp_path_factory.mktemp("progress-world")
    generate_world(out, SynthConfig(seed=1, human_images=32, web_images=8, test_images=8, rows_per_shard=32))
    return out


def _train_args(world: Path, out: Path) -> list[str]:
    return ["train", "--mode", "finetune-captioner", "--data", str(world / "human"), "--out", str(out),
            "--steps", "4", "--batch-size", "8", "--log-every", "2", "--device", "cpu", "--workers", "0"]  # fmt: skip


def test_train_shows_step_loss_and_samples_per_second(world: Path, tmp_path: Path) -> None:
    _, terminal = _capfilt(_train_args(world, tmp_path / "tty"), tty=True)
    assert "\r" in terminal
    assert re.search(r"finetune-captioner: 100%.* 4/4 \[.*(step/s|s/step), loss=[\d.]+, samples/s=[\d.]+\]", terminal), terminal

    out, err = _capfilt(_train_args(world, tmp_path / "piped"), tty=False)
    assert json.loads(out[out.index("{"):])["steps"] == 4  # stdout stays the command's JSON
    assert "\r" not in err
    assert re.search(r"^finetune-captioner: 100% 4/4 \[.*, loss=[\d.]+, samples/s=[\d.]+\]$", err, re.M), err
