"""`capfilt export RUN OUT --format webdataset|blip-json|parquet`: D' in a trainer's layout.

RUN is a run folder (its current D', ``assemble/<hash>/``, from ``current.json``), a name
under ``runs/``, or a D' folder itself; ``--input FOLDER`` (repeatable) names D' shard
folders or files instead, and then the one argument is OUT. The layouts are described in
`data/export.py`; a rerun skips the shards already written.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

import typer

from data.defaults import DEFAULT_SHARD_ROWS
from flows.commands.query import resolve_run

if TYPE_CHECKING:
    from data.storage import Location

EXIT_ERROR = 1


class ExportFormat(str, enum.Enum):
    webdataset = "webdataset"
    blip_json = "blip-json"
    parquet = "parquet"


def _sources(args: list[str], inputs: list[str] | None) -> tuple[list[Location], Location]:
    """(D' shards, OUT) from ``RUN OUT`` or ``--input ... OUT``, each a path or a URL."""
    from data.export import dataset_shards
    from data.inputs import expand_inputs
    from data.storage import location

    if inputs:
        if len(args) != 1:
            raise typer.BadParameter("with --input give only OUT", param_hint="ARGS")
        return expand_inputs(inputs), location(args[0])
    if len(args) != 2:
        raise typer.BadParameter("give RUN OUT (or --input FOLDER OUT)", param_hint="ARGS")
    return dataset_shards(resolve_run(args[0])), location(args[1])


def export_command(
    args: list[str] = typer.Argument(
        ..., metavar="[RUN] OUT",
        help="RUN (a run or D' folder; omit it with --input) and OUT, the folder to write; paths or URLs (s3://...)",
    ),
    fmt: ExportFormat = typer.Option(..., "--format", "-f", help="webdataset, blip-json or parquet"),
    shard_size: int = typer.Option(DEFAULT_SHARD_ROWS, "--shard-size", help="rows per output shard"),
    inputs: list[str] | None = typer.Option(
        None, "--input", "-i", help="D' shards (folder, file or glob) instead of RUN; repeatable"
    ),
) -> None:
    """Export D' for open_clip / img2dataset (webdataset), BLIP / LAVIS (blip-json) or
    Hugging Face datasets / duckdb (parquet)."""
    from blip_core.progress import Advance
    from data.export import ExportError, claim_out, export
    from data.layout import LayoutError
    from data.schema import SchemaError

    try:
        shards, out = _sources(args, inputs)
        claim_out(out, fmt.value, shards)  # a refusal is the only line (export claims it again, idempotently)
        with Advance("export", unit="row") as advance:
            stats = export(shards, out, fmt.value, shard_size, on_shard=advance)
    except (ExportError, SchemaError, LayoutError, FileNotFoundError, ValueError) as exc:
        typer.echo(f"capfilt export: {exc}", err=True)
        raise typer.Exit(EXIT_ERROR) from None
    sources = ", ".join(f"{name} {count}" for name, count in stats.by_source.items())
    typer.echo(
        f"exported {stats.rows} rows ({sources}) from {len(shards)} D' shards as {stats.shards} {stats.fmt} "
        f"shards to {out} ({stats.written} written, {stats.skipped} already complete)"
    )


def register(app: typer.Typer) -> None:
    """Add `capfilt export` to the app."""
    app.command("export")(export_command)
