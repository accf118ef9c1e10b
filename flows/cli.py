"""The `capfilt` command line: one typer app; each area registers its own commands."""

from __future__ import annotations

import typer

from flows.commands import errors
from flows.commands import browse as browse_commands
from flows.commands import data as data_commands
from flows.commands import evaluate as evaluate_commands
from flows.commands import export as export_commands
from flows.commands import query as query_commands
from flows.commands import run as run_commands
from flows.commands import stages as stage_commands
from flows.commands import train as train_commands

app = typer.Typer(
    help="capfilt: clean and enrich image-text datasets with BLIP's captioner + filter bootstrap.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,  # an error is one line (flows.commands.errors); --verbose: Python's traceback
    callback=errors.global_verbose,  # `capfilt --verbose COMMAND`
)

for area in (run_commands, data_commands, train_commands, stage_commands, evaluate_commands, query_commands,
             browse_commands, export_commands):
    area.register(app)
errors.apply(app)


if __name__ == "__main__":
    app()
