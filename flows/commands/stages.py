"""capfilt CLI commands for the CapFilt stages: `capfilt caption`, `capfilt filter`, `capfilt assemble`.

Each takes `--input` shards (files, folders or globs; several may follow one `--input`,
so a shell glob works), writes under `--output/<settings-hash>/` and prints the stage's
totals as JSON. Rerunning the same command resumes: complete shards are skipped.
Run standalone with ``python -m flows.commands.stages caption ...``.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Any

import typer

from flows.commands.config_options import config_command

if TYPE_CHECKING:
    from tasks.lifecycle import StageStats

# Extra positional words after `--input A` are more inputs (`--input web/*.parquet`).
_MANY_INPUTS = {"allow_extra_args": True}


def _inputs(ctx: typer.Context, first: list[str]) -> list[str]:
    items = list(first) + [a for a in ctx.args]
    if not items:
        raise typer.BadParameter("give at least one --input shard, folder or glob")
    for item in items:
        if item.startswith("-"):
            raise typer.BadParameter(f"unknown option {item!r}")
    return items


@contextmanager
def _one_writer(output: str) -> Iterator[None]:
    """Hold the lock of OUTPUT's run folder (or of OUTPUT when it is in none): a second
    command, or a flow run, writing there at once is refused (two writers would share the
    shards' temporary file names). A refusal, or a stage whose failed shards are listed
    (the others completed), exits 1 with the message."""
    from data.run_lock import RunLockedError, lock_scope, run_lock
    from flows.commands.errors import naming
    from tasks.lifecycle import StageIncompleteError

    try:
        with ExitStack() as held:
            with naming(output):  # the first touch of OUTPUT: a missing bucket names it
                held.enter_context(run_lock(lock_scope(output)))
            yield
    except (RunLockedError, StageIncompleteError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


def _report(stats: StageStats) -> None:
    """Print the stage's totals; when OUTPUT is a run's stage folder (``RUN/filter``), record
    the settings folder just written as the run's current one (what views and reports read)."""
    from data.layout import stage_layout

    layout = stage_layout(stats.output.parent, stats.stage)
    if layout is not None:
        layout.mark_current(stats.stage, stats.output)
    done = [s for s in stats.shards if not s.skipped]
    summary = {
        "stage": stats.stage,
        "output": str(stats.output),
        "settings_hash": stats.settings_hash,
        "shards": len(stats.shards),
        "skipped": len(stats.shards) - len(done),
        "totals": stats.totals,
    }
    if stats.execution:
        summary["execution"] = stats.execution
    if stats.images:
        summary["images_per_second"] = round(stats.images_per_second, 2)
    typer.echo(json.dumps(summary, indent=2))


def _param(name: str, annotation: Any, default: Any) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def _io(model_help: str | None, output_help: str, input_help: str) -> list[inspect.Parameter]:
    """The parameters every stage command takes before its config's: inputs, output, model."""
    params = [
        _param("ctx", typer.Context, inspect.Parameter.empty),
        _param("input", list[str], typer.Option(..., "--input", help=input_help)),
        _param("output", str, typer.Option(..., help=output_help + " A folder or a URL (s3://bucket/run/caption).")),
    ]
    if model_help is not None:
        params.append(_param("model", str, typer.Option(..., help=model_help + " A folder or a URL.")))
    return params


def _run_caption(cfg: Any, ctx: typer.Context, input: list[str], output: str, model: str) -> None:
    from tasks.caption import run_caption

    with _one_writer(output):
        _report(run_caption(_inputs(ctx, input), output, model, cfg))


def _run_filter(cfg: Any, ctx: typer.Context, input: list[str], output: str, model: str, captions: str | None) -> None:
    from tasks.filter import run_filter

    with _one_writer(output):
        _report(run_filter(_inputs(ctx, input), output, model, cfg, caption_dir=captions))


def _run_assemble(cfg: Any, ctx: typer.Context, input: list[str], output: str) -> None:
    from tasks.assemble import run_assemble

    with _one_writer(output):
        _report(run_assemble(_inputs(ctx, input), output, cfg))


_WEB_INPUT = "Web pair shards, or img2dataset output in parquet or webdataset format (NNNNN.tar + sidecar, read in place) (files, folders, globs)."


def _commands() -> dict[str, Any]:
    """`caption`, `filter`, `assemble`: their options are their config classes' fields."""
    from tasks.stage_config import AssembleConfig, CaptionConfig, FilterConfig  # torch-free: help stays fast

    caption = config_command(
        CaptionConfig,
        _io("Captioner: our checkpoint or a transformers BlipForConditionalGeneration folder.",
            "Stage folder; shards go to OUTPUT/<settings-hash>/.", _WEB_INPUT),
        _run_caption,
        "Write synthetic captions for every web image (resumable; reruns skip complete shards).",
    )  # fmt: skip
    captions = _param("captions", str | None, typer.Option(
        None, help="Caption stage folder (OUTPUT/<hash> of `capfilt caption`) to score too."))  # fmt: skip
    filter_ = config_command(
        FilterConfig,
        _io("Filter: our checkpoint or a transformers BlipForImageTextRetrieval folder.",
            "Stage folder; shards go to OUTPUT/<settings-hash>/{kept,rejected,failed}/.", _WEB_INPUT) + [captions],
        _run_filter,
        "Score web and synthetic captions with ITM; write kept / rejected / failed shards (resumable).",
    )  # fmt: skip
    assemble = config_command(
        AssembleConfig,
        _io(None, "Stage folder; D' goes to OUTPUT/<hash>/.",
            "In priority order: human pair shards, then filter kept folders (with --threshold / --top-k the "
            "rejected folders too) (files, folders, globs)."),
        _run_assemble,
        "Assemble D' = human + kept web + kept synthetic pairs, deduplicated and resharded.",
        exclude={"batch_size", "num_workers", "device", "precision"},  # no model: only `progress` applies
    )  # fmt: skip
    return {"caption": caption, "filter": filter_, "assemble": assemble}


def register(app: typer.Typer) -> None:
    """Add `caption`, `filter` and `assemble` to the app."""
    for name, command in _commands().items():
        app.command(name, context_settings=_MANY_INPUTS)(command)


if __name__ == "__main__":
    standalone = typer.Typer(no_args_is_help=True, add_completion=False)
    register(standalone)
    standalone()
