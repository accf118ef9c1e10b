"""capfilt CLI commands for running the bootstrap: `capfilt demo`, `capfilt run`, `capfilt serve`."""

from __future__ import annotations

import contextlib
import json
import os
import threading
from pathlib import Path

import typer

# Offline defaults (see shared PITFALLS): no telemetry, no update checks, quiet tokenizers,
# and time for Prefect's temporary server to start on a busy machine (its default is 20 s).
_ENV_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",  # also the client's telemetry notice, which a terminal would show above the progress
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PREFECT_LOGGING_EXTRA_LOGGERS": "tasks.execution",  # a stage's batch size / workers choice, in its task's log
}


_VERBOSE_HELP = "Show Prefect's own log lines (flow and task runs, states); by default only warnings, so progress shows."


def _offline_env(verbose: bool = True) -> None:
    """Set the offline defaults; unless `verbose`, Prefect and Dask's `distributed` log only
    warnings and errors (their INFO lines would bury the progress). Before Prefect and Dask
    are imported; an explicit PREFECT_LOGGING_LEVEL / DASK_LOGGING__DISTRIBUTED wins."""
    for name, value in _ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)
    if not verbose:
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")  # a Dask run's ~60 INFO lines (workers inherit it)


def _start_flow(command: str, run_dir: str | Path) -> None:
    """Before the flow starts (Prefect imported): its failure lines without tracebacks (unless
    --verbose; the command's own error line names the failure), and one line saying it starts."""
    from flows.commands.errors import console_logs_without_tracebacks

    console_logs_without_tracebacks()
    _starting(command, run_dir)


def _starting(command: str, run_dir: str | Path) -> None:
    """One line on stderr before the flow starts: Prefect's temporary server and the first
    stage take a while, and a log (stderr not a terminal) would show nothing until then."""
    server = "" if os.environ.get("PREFECT_API_URL") else " (Prefect's temporary server first, about 10 s)"
    typer.echo(f"capfilt {command}: starting the run in {run_dir}{server}; each stage prints a line as it starts",
               err=True)  # fmt: skip


def _boot_temporary_server() -> threading.Thread | None:
    """Without PREFECT_API_URL the flow runs on Prefect's temporary server, whose process
    takes seconds to boot: start it in a thread now, so it boots while this process imports
    the flow's modules; the flow then finds it running (Prefect keeps one per process). A
    start that fails here is tried again, and reported, by the flow itself."""
    if os.environ.get("PREFECT_API_URL"):
        return None

    def boot() -> None:
        from prefect.server.api.server import SubprocessASGIServer

        with contextlib.suppress(Exception):
            SubprocessASGIServer().start()

    thread = threading.Thread(target=boot, name="capfilt-prefect-server", daemon=True)
    thread.start()
    return thread


_NOTHING_TO_DO = ("nothing to do: this run finished and neither its settings, its files nor its inputs changed "
                  "since ({record}); delete that file to run the flow anyway")


def _headline(metrics_path: Path) -> list[str]:
    """A few numbers read from the run's eval/metrics.json (nothing when it is absent)."""
    data = json.loads(metrics_path.read_text())
    lines = []
    for section in ("retrieval", "captioning"):
        values = data.get(section) or {}
        shown = ", ".join(f"{k} {v:.1f}" for k, v in values.items() if isinstance(v, (int, float)))
        if shown:
            lines.append(f"  {section}: {shown}")
    video = metrics_path.parent / "video.json"  # zero-shot video (tasks.video_eval), when the run made it
    if video.is_file():
        for name, r in json.loads(video.read_text()).get("models", {}).items():
            ret = r.get("retrieval", {})
            lines.append(f"  zero-shot video ({name}, {r.get('n_videos')} clips x {r.get('frames')} frames): "
                         + ", ".join(f"{k} {ret[k]:.1f}" for k in ("t2v_R@1", "t2v_R@5", "v2t_R@1") if k in ret))
    return lines


def demo(
    quick: bool = typer.Option(False, "--quick", help="Fewer images and steps (about 3 minutes; used in tests)."),
    out: Path = typer.Option(None, "--out", help="Run folder (default runs/demo or runs/demo-quick); reuse it to resume."),
    ablation: bool = typer.Option(False, "--ablation", help="Then run the miniature Table 1 into RUN/ablation and print "
                                  "it: `capfilt ablation`'s defaults (2 seeds, about 25 min on 2 cores), or with "
                                  "--quick a one-minute smoke version too small to show an effect."),
    verbose: bool = typer.Option(False, "--verbose", help=_VERBOSE_HELP),
) -> None:
    """Run the whole CapFilt bootstrap on the built-in synthetic world (tiny MED, CPU).

    Generates the world, serves its web images on 127.0.0.1 and ingests them with
    img2dataset, then pretrains, finetunes filter and captioner, captions, filters,
    assembles D', pretrains the final model and evaluates it. A second call on the same
    folder resumes where the first stopped (and so does `--ablation`'s experiment).
    """
    _offline_env(verbose)
    from flows.demo import run_demo

    result = run_demo(quick=quick, out=out, on_start=lambda run_dir: _start_flow("demo", run_dir))
    if result.reused:
        typer.echo(_NOTHING_TO_DO.format(record=result.run_dir / "run.json"), err=True)
    typer.echo(f"\nrun folder: {result.run_dir}")
    if result.report is not None:
        typer.echo(f"report:     {result.report}  (also {result.report.with_suffix('.html')})")
    else:
        typer.echo("report:     not written (the run stopped before the report stage)")
    if result.metrics is not None:
        typer.echo(f"metrics:    {result.metrics}")
        for line in _headline(result.metrics):
            typer.echo(line)
    typer.echo("\nask the run folder questions with SQL:")
    for command in result.query_commands():
        typer.echo(f"  {command}")
    if ablation:
        _demo_ablation(Path(result.run_dir) / "ablation", quick)


def _demo_ablation(folder: Path, quick: bool) -> None:
    """The miniature Table 1 after the demo (see `capfilt ablation`)."""
    from tasks.ablation import AblationConfig, quick_config, run_ablation

    cfg = quick_config(str(folder)) if quick else AblationConfig(out_dir=str(folder))
    typer.echo(f"\nminiature Table 1 ({'quick smoke version' if quick else 'capfilt ablation defaults'}) in {folder}:")
    run_ablation(cfg, log=typer.echo)
    typer.echo((folder / "table.md").read_text())


def run(
    config: str = typer.Option(..., "--config", "-c", help="YAML run config file, or a preset's name: demo, demo-quick, "
                               "gpu, or a file of presets/ by its stem (capfilt-on-img2dataset)."),
    run_dir: str = typer.Option(None, "--run-dir", help="Override the config's run_dir."),
    sets: list[str] = typer.Option(None, "--set", help="Override any field: FIELD=VALUE, e.g. "
                                   "--set filter.threshold=0.3 --set caption.execution.batch_size=64 (repeatable)."),
    verbose: bool = typer.Option(False, "--verbose", help=_VERBOSE_HELP),
) -> None:
    """Run (or resume) the bootstrap described by a YAML run config, in this process."""
    _offline_env(verbose)
    from flows.config import load_yaml
    from flows.preflight import preflight
    from flows.run_record import finished_summary

    cfg = preflight(load_yaml(config, sets=sets, run_dir=run_dir))  # a bad config: one line (flows.commands.errors)
    summary = finished_summary(cfg)
    if summary is None:
        booting = _boot_temporary_server()
        from flows.bootstrap import run_bootstrap  # torch, transformers, the stages: while the server boots

        _start_flow("run", cfg.run_dir)
        if booting is not None:
            booting.join()
        summary = run_bootstrap(cfg)
    else:
        typer.echo(_NOTHING_TO_DO.format(record=Path(cfg.run_dir) / "run.json"), err=True)
    typer.echo(json.dumps({k: v for k, v in summary.items() if k != "ingest"}, indent=2, default=str))


def serve(
    quick: bool = typer.Option(False, "--quick", help="Serve the demo deployment with the demo-quick preset."),
    full_config: Path = typer.Option(None, "--full-config", exists=True, dir_okay=False,
                                     help="YAML config for the `full` deployment (default: the gpu preset)."),  # fmt: skip
    limit: int = typer.Option(None, "--limit", help="At most this many concurrent flow runs."),
) -> None:
    """Serve the `demo` and `full` deployments (needs PREFECT_API_URL, e.g. `prefect server start`).

    Trigger a run with `prefect deployment run capfilt-bootstrap/demo`.
    """
    _offline_env()
    from flows.serve import serve_deployments

    serve_deployments(quick=quick, full_config=full_config, limit=limit)


def register(app: typer.Typer) -> None:
    """Add this area's commands to the app."""
    app.command("demo")(demo)
    app.command("run")(run)
    app.command("serve")(serve)
