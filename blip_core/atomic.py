"""Atomic writes for blip_core: the one place here that renames files and folders into place.

`data.shards.atomic_path` is the same rule for `data` and above; blip_core may not import
`data`, so it keeps this copy. Temporary names are fixed (``<name>.tmp``), so a writer
killed mid-way leaves a leftover that its rerun replaces; one writer per path is assumed.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """``with atomic_path(path) as tmp:`` write the file at `tmp`; on a clean exit it is
    fsynced and renamed over `path`, so readers see the old or the new file, never half."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def replace_folder(tmp: Path, final: Path) -> None:
    """Move the finished folder `tmp` to `final`, replacing an older `final`.

    A folder under the final name is always complete; a kill between removing the old one
    and the rename leaves none, and the rerun writes it again.
    """
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
