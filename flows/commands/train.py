"""capfilt CLI commands for this area (see docs/ARCHITECTURE.md)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this area's commands to the app."""
