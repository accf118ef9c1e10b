"""Test-wide setup: the shared helper modules (tests/tasks/stage_helpers.py,
tests/data/webdataset_shards.py, ...) importable from every test folder, also when a
single test file is run (pytest itself only adds the folder of the file it collects)."""

from __future__ import annotations

import sys
from pathlib import Path

for _folder in ("tasks", "data"):
    _path = str(Path(__file__).parent / _folder)
    if _path not in sys.path:
        sys.path.append(_path)
