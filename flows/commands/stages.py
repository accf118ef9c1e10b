"""capfilt CLI commands for the CapFilt stages: `capfilt caption`, `capfilt filter`, `capfilt assemble`.

Each takes `--input` shards (files, folders or globs; several may follow one `--input`,
so a shell glob works), writes under `--output/<settings-hash>/` and prints the stage's
totals as JSON. Rerunning the same command resumes: complete shards are skipped.
Run standalone with ``python -m flows.commands.stages caption ...``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer

from tasks.execution import ExecutionConfig
from tasks.lifecycle import StageStats

# Extra positional words after `--input A` are more inputs (`--input web/*.parquet`).
_MANY_INPUTS = {"allow_extra_args": True}


def _execution(batch_size: int, workers: int, device: str, precision: str, progress: bool) -> ExecutionConfig:
    return ExecutionConfig(batch_size=batch_size, num_workers=workers, device=device, precision=precision, progress=progress)


def _inputs(ctx: typer.Context, first: list[str]) -> list[str]:
    items = list(first) + [a for a in ctx.args]
    if not items:
        raise typer.BadParameter("give at least one --input shard, folder or glob")
    for item in items:
        if item.startswith("-"):
            raise typer.BadParameter(f"unknown option {item!r}")
    return items


@contextmanager
def _one_writer(output: Path) -> Iterator[None]:
    """Hold the lock of OUTPUT's run folder (or of OUTPUT when it is in none): a second
    command, or a flow run, writing there at once is refused (two writers would share the
    shards' temporary file names). A refusal, or a stage whose failed shards are listed
    (the others completed), exits 1 with the message."""
    from data.run_lock import RunLockedError, lock_scope, run_lock
    from tasks.lifecycle import StageIncompleteError

    try:
        with run_lock(lock_scope(output)):
            yield
    except (RunLockedError, StageIncompleteError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


def _report(stats: StageStats) -> None:
    """Print the stage's totals; when OUTPUT is a run's stage folder (``RUN/filter``), record
    the settings folder just written as the run's current one (what views and reports read)."""
    from data.layout import stage_layout

    layout = stage_layout(Path(stats.output).parent, stats.stage)
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
    if stats.images:
        summary["images_per_second"] = round(stats.images_per_second, 2)
    typer.echo(json.dumps(summary, indent=2))


def caption(
    ctx: typer.Context,
    model: Path = typer.Option(..., help="Captioner: our checkpoint or a transformers BlipForConditionalGeneration folder."),
    input: list[str] = typer.Option(..., "--input", help="Web pair shards or img2dataset Parquet (files, folders, globs)."),
    output: Path = typer.Option(..., help="Stage folder; shards go to OUTPUT/<settings-hash>/."),
    strategy: str = typer.Option("nucleus", help="nucleus | beam | greedy."),
    num_captions: int = typer.Option(1, help="Synthetic captions per image."),
    top_p: float = typer.Option(0.9),
    top_k: int = typer.Option(0, help="0 = off."),
    temperature: float = typer.Option(1.0),
    num_beams: int = typer.Option(3),
    repetition_penalty: float = typer.Option(1.0),
    max_length: int = typer.Option(20, help="Tokens including [DEC] and the prompt."),
    min_length: int = typer.Option(5),
    prompt: str = typer.Option("a picture of "),
    seed: int = typer.Option(0, help="Run seed; each image's seed derives from it and the row key."),
    batch_size: int = typer.Option(32),
    workers: int = typer.Option(-1, help="DataLoader processes decoding images (-1 = auto, 0 = none)."),
    device: str = typer.Option("auto"),
    precision: str = typer.Option("auto", help="auto | fp32 | bf16 (CUDA)."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Write synthetic captions for every web image (resumable; reruns skip complete shards)."""
    from tasks.caption import CaptionConfig, run_caption

    cfg = CaptionConfig(
        strategy=strategy, num_captions=num_captions, top_p=top_p, top_k=top_k, temperature=temperature,
        num_beams=num_beams, repetition_penalty=repetition_penalty, max_length=max_length,
        min_length=min_length, prompt=prompt, seed=seed,
        execution=_execution(batch_size, workers, device, precision, progress),
    )
    with _one_writer(output):
        _report(run_caption(_inputs(ctx, input), output, model, cfg))


def filter_(
    ctx: typer.Context,
    model: Path = typer.Option(..., help="Filter: our checkpoint or a transformers BlipForImageTextRetrieval folder."),
    input: list[str] = typer.Option(..., "--input", help="Web pair shards or img2dataset Parquet (files, folders, globs)."),
    output: Path = typer.Option(..., help="Stage folder; shards go to OUTPUT/<settings-hash>/{kept,rejected,failed}/."),
    captions: Path = typer.Option(None, help="Caption stage folder (OUTPUT/<hash> of `capfilt caption`) to score too."),
    threshold: float = typer.Option(0.5, help="Keep when the ITM match probability is >= this."),
    top_k: int = typer.Option(0, help="Keep at most this many synthetic captions per image (0 = all that pass)."),
    max_text_tokens: int = typer.Option(35),
    batch_size: int = typer.Option(32, help="Images per model call."),
    workers: int = typer.Option(-1, help="DataLoader processes decoding images (-1 = auto, 0 = none)."),
    device: str = typer.Option("auto"),
    precision: str = typer.Option("auto", help="auto | fp32 | bf16 (CUDA)."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Score web and synthetic captions with ITM; write kept / rejected / failed shards (resumable)."""
    from tasks.filter import FilterConfig, run_filter

    cfg = FilterConfig(
        threshold=threshold, top_k=top_k or None, max_text_tokens=max_text_tokens,
        execution=_execution(batch_size, workers, device, precision, progress),
    )
    with _one_writer(output):
        _report(run_filter(_inputs(ctx, input), output, model, cfg, caption_dir=captions))


def assemble(
    ctx: typer.Context,
    input: list[str] = typer.Option(
        ..., "--input", help="In priority order: human pair shards, then filter kept folders (files, folders, globs)."
    ),
    output: Path = typer.Option(..., help="Stage folder; D' goes to OUTPUT/<hash>/."),
    rows_per_shard: int = typer.Option(10_000),
    dedupe: bool = typer.Option(True, "--dedupe/--no-dedupe", help="Drop exact duplicate (image, caption) pairs."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Assemble D' = human + kept web + kept synthetic pairs, deduplicated and resharded."""
    from tasks.assemble import AssembleConfig, run_assemble

    cfg = AssembleConfig(rows_per_shard=rows_per_shard, dedupe=dedupe, execution=ExecutionConfig(progress=progress))
    with _one_writer(output):
        _report(run_assemble(_inputs(ctx, input), output, cfg))


def register(app: typer.Typer) -> None:
    """Add `caption`, `filter` and `assemble` to the app."""
    app.command("caption", context_settings=_MANY_INPUTS)(caption)
    app.command("filter", context_settings=_MANY_INPUTS)(filter_)
    app.command("assemble", context_settings=_MANY_INPUTS)(assemble)


if __name__ == "__main__":
    standalone = typer.Typer(no_args_is_help=True, add_completion=False)
    register(standalone)
    standalone()
