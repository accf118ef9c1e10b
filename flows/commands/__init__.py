"""The `capfilt` commands, one module per area, and what they share."""

from __future__ import annotations

from pathlib import Path

import typer


def local_path(value: str | Path) -> Path:
    """`value` as a local path; ValueError when it is a URL (``s3://...``), which a command
    that reads and writes only local files must refuse, never turn into a folder named
    ``s3:``. `typer.Option(..., parser=local_path)` on such a command's Path parameters."""
    from data.storage import RemotePath, location

    place = location(value)
    if isinstance(place, RemotePath):
        raise ValueError(f"{value} is a URL; this command reads and writes local files only: copy it to a local folder first")
    return place


def local_option(value: str | None, hint: str) -> Path | None:
    """An option value that names a local path (None stays None); a URL is refused in one line naming `hint`."""
    try:
        return None if value is None else local_path(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint=hint) from None
