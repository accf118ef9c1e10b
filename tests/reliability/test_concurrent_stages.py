"""Two writers on one stage folder: the stage commands hold the output folder's run lock
(`capfilt run` holds the run folder's, see test_security.py), so a second command at the
same time is refused with the holder named and writes nothing (two writers would share
the shards' temporary file names)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from reliability_harness import HOOK, ROOT, env, hold_lock, stage_cases

REFUSED = "is in use by another capfilt process"


def _start(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(HOOK), *argv], cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def test_a_stage_command_on_a_locked_folder_is_refused(world: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "caption"
    holder = hold_lock(out)
    try:
        refused = _start(stage_cases(world)["caption"].argv(out))
        _, err = refused.communicate(timeout=300)
    finally:
        holder.kill()
        holder.wait()
    assert refused.returncode == 1 and REFUSED in err and f"pid {holder.pid}" in err
    assert [p.name for p in out.iterdir()] == [".lock"]
