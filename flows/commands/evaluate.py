"""capfilt CLI commands for evaluation: `capfilt evaluate`, `capfilt report`, `capfilt ablation`.

Each is a thin shell over `tasks.evaluate`, `tasks.report` and `tasks.ablation`; all
three are safe to rerun (results are keyed by their inputs, files replaced atomically).
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from flows.commands import local_option, local_path


def evaluate(
    model: str = typer.Option(None, help="Model folder (ours or a Hugging Face BLIP folder; a path or URL). Default: the final model RUN's latest run used."),
    test: list[str] = typer.Option(None, "--test", help="Test pair shards (several rows per image = several references). Default: RUN/ingest/test."),
    run: str = typer.Option(None, help="Run folder (a path or URL): takes its model, test set, truth, filter and caption outputs; writes RUN/eval/metrics.json."),
    truth: str = typer.Option(None, help="Synthetic-world folder (or its truth/): scene hits, noise detection, captioner correctness."),
    filter_dir: str = typer.Option(None, "--filter-dir", help="A filter output folder (filter/<hash>) to score against the truth."),
    caption_dir: str = typer.Option(None, "--caption-dir", help="A caption output folder (caption/<hash>) to score against the truth."),
    out: str = typer.Option(None, help="Write the JSON here (default: RUN/eval/metrics.json, or print only)."),
    rerank_k: int = typer.Option(16, help="Re-rank the ITC top k of each query by ITM (BLIP: 256 on COCO)."),
    strategy: str = typer.Option("beam", help="Captioning decode: beam | greedy | nucleus."),
    prompt: str = typer.Option("", help="Decoder prompt (\"a picture of \" for a finetuned captioner)."),
    max_images: int = typer.Option(None, help="Evaluate only the first N test images."),
    batch_size: int = typer.Option(64),
    device: str = typer.Option("auto", help="auto | cpu | cuda[:N]."),
    videos: list[str] = typer.Option(None, "--videos", help="Zero-shot video instead: videos shards or folders (capfilt ingest videos / synth --videos). Writes --out, or RUN/eval/video.json."),
    frames: int = typer.Option(8, "--frames", help="--videos: frames sampled uniformly per clip (BLIP: 8)."),
) -> None:
    """Retrieval R@1/5/10 (ITC rank + ITM re-rank), BLEU-4 / CIDEr, and truth-based checks; with
    --videos, text-to-video and video-to-text R@1/5/10 and caption metrics of clips, zero-shot."""
    if videos:
        _evaluate_videos([local_option(v, "--videos") for v in videos], frames, local_option(model, "--model"),  # type: ignore[misc]
                         local_option(run, "--run"), local_option(truth, "--truth"), local_option(out, "--out"),
                         rerank_k, strategy, prompt, max_images, batch_size, device)  # fmt: skip
        return
    from data.storage import location
    from data.layout import MODEL_ENTRY, RunLayout
    from data.shards import list_shards
    from tasks.evaluate.config import EvalConfig
    from tasks.evaluate.measure import evaluate as run_eval
    from tasks.evaluate.run import evaluate_to_file

    cfg = EvalConfig(rerank_k=rerank_k, caption_strategy=strategy, prompt=prompt, max_images=max_images,
                     batch_size=batch_size, device=device)
    given = {name: location(value) if value else None for name, value in
             (("model", model), ("truth", truth), ("filter", filter_dir), ("caption", caption_dir), ("out", out))}  # fmt: skip
    tests = [location(t) for t in test or []]
    if run is not None:
        layout = RunLayout(location(run))  # the outputs the run's latest run used (its current.json)
        given["model"] = given["model"] or layout.current(MODEL_ENTRY + "final") or layout.models / "final"
        tests = tests or list_shards(layout.ingest("test"))
        given["truth"] = given["truth"] or layout.truth_dir()
        given["filter"] = given["filter"] or layout.current_stage("filter")
        given["caption"] = given["caption"] or layout.current_stage("caption")
        given["out"] = given["out"] or layout.metrics
    if given["model"] is None or not tests:
        raise typer.BadParameter("give --run RUN, or --model and --test")
    shards = [p for t in tests for p in (list_shards(t) if t.is_dir() else [t])]
    args = (given["model"], shards)
    if given["out"] is not None:
        result = evaluate_to_file(*args, given["out"], given["truth"], given["filter"], given["caption"], cfg)  # type: ignore[arg-type]
    else:
        result = run_eval(*args, given["truth"], given["filter"], given["caption"], cfg)  # type: ignore[arg-type]
    summary = {"retrieval": result.retrieval, "captioning": result.captioning,
               "filter_detection": result.filter_detection, "captioner": result.captioner}
    typer.echo(json.dumps(summary, indent=2))
    if given["out"] is not None:
        typer.echo(f"wrote {given['out']}")


def _evaluate_videos(videos: list[Path], frames: int, model: Path | None, run: Path | None, truth: Path | None,
                     out: Path | None, rerank_k: int, strategy: str, prompt: str, max_videos: int | None,
                     batch_size: int, device: str) -> None:  # fmt: skip
    """`capfilt evaluate --videos`: one model's zero-shot video metrics, printed and written."""
    from data.layout import MODEL_ENTRY, RunLayout
    from tasks.video_eval import VideoEvalConfig, default_truth, evaluate_video_models, summary

    if run is not None:
        model = model or RunLayout(run).current(MODEL_ENTRY + "final") or RunLayout(run).models / "final"
        out = out or RunLayout(run).video_metrics
    if model is None:
        raise typer.BadParameter("--videos needs --model M (or --run RUN for its final model)")
    cfg = VideoEvalConfig(frames=frames, rerank_k=rerank_k, caption_strategy=strategy, prompt=prompt,
                          max_videos=max_videos, batch_size=max(1, batch_size // frames), device=device)  # fmt: skip
    truth = truth or default_truth(videos)
    try:
        result = evaluate_video_models({"model": model}, videos, out, truth, cfg)
    except (ValueError, FileNotFoundError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(json.dumps({"truth": result["truth"], **summary(result)["model"]}, indent=2))
    if out is not None:
        typer.echo(f"wrote {out}")


def report(run: str = typer.Argument(..., help="Run folder (runs/<run>, or a URL: s3://bucket/run).")) -> None:
    """Write RUN/report.md, RUN/report.html and the report-*.png plots from the run's files."""
    from data.storage import location
    from tasks.report import write_report

    path = write_report(location(run))
    typer.echo(f"wrote {path} and {path.with_suffix('.html')}")


def ablation(
    preset: str = typer.Option("tiny", help="Model preset of every model in the experiment."),
    out: Path = typer.Option(Path("runs/ablation"), parser=local_path, help="Output folder (laid out like a run folder; reruns resume)."),
    seeds: int = typer.Option(2, help="Seeds of the final pretraining per row (first_seed, first_seed + 1, ...)."),
    first_seed: int = typer.Option(0, help="First seed: a rerun with new seeds (e.g. 5) replicates the table on the folder's datasets."),
    rows: str = typer.Option(",".join(("no_cf", "filter", "captioner", "cf", "human")), help="Rows to run, comma-separated."),
    steps: int = typer.Option(None, help="Pretraining steps per model (default: the config's)."),
    finetune_steps: int = typer.Option(None, help="Filter / captioner finetuning steps."),
    batch_size: int = typer.Option(None),
    world_seed: int = typer.Option(None, help="Seed of the synthetic world (default 0): another world replicates the experiment."),
    human_images: int = typer.Option(None),
    web_images: int = typer.Option(None),
    test_images: int = typer.Option(None),
    num_captions: int = typer.Option(None, help="Synthetic captions per web image."),
    lr: float = typer.Option(None, help="Pretraining learning rate."),
    finetune_lr: float = typer.Option(None, help="Filter / captioner finetuning learning rate."),
    momentum: float = typer.Option(None, help="EMA of the momentum encoders (BLIP: 0.995)."),
    alpha: float = typer.Option(None, help="Momentum-distillation weight (BLIP: 0.4)."),
    queue_size: int = typer.Option(None, help="Momentum features per modality (a multiple of the batch size)."),
    threshold: float = typer.Option(None, help="Filter keep threshold on the ITM match probability (BLIP: 0.5)."),
    caption_strategy: str = typer.Option(None, help="How the captioner writes synthetic captions: nucleus (BLIP), beam or greedy."),
    top_p: float = typer.Option(None, help="Nucleus sampling's top_p (BLIP: 0.9)."),
    human_vague_rate: float = typer.Option(None, help="Share of the world's human captions that are true but vague (default 0)."),
    mix_units: int = typer.Option(None, help="Row groups shuffled together in training (default 8; 1: one row group per batch, as folders made before this option)."),
    rounds: int = typer.Option(1, help="Bootstrap rounds: round r > 1 finetunes filter and captioner from round r - 1's C+F model; F, C and C+F train on the last round's data (a rerun with more rounds reuses the earlier ones)."),
    threads: int = typer.Option(None, help="torch threads."),
) -> None:
    """BLIP's Table 1 in miniature: pretrain on no-C/F, F, C, C+F and human-only data; print the table."""
    from tasks.ablation import AblationConfig, run_ablation

    overrides = {k: v for k, v in dict(
        pretrain_steps=steps, finetune_steps=finetune_steps, batch_size=batch_size, world_seed=world_seed,
        human_images=human_images, web_images=web_images, test_images=test_images, num_captions=num_captions,
        threads=threads, lr=lr,
        finetune_lr=finetune_lr, momentum=momentum, alpha=alpha, queue_size=queue_size, threshold=threshold,
        caption_strategy=caption_strategy, top_p=top_p, human_vague_rate=human_vague_rate, mix_units=mix_units,
    ).items() if v is not None}
    if "batch_size" in overrides:
        overrides.setdefault("queue_size", 4 * overrides["batch_size"])
    try:
        cfg = AblationConfig(out_dir=str(out), preset=preset, seeds=tuple(range(first_seed, first_seed + seeds)),
                             rows=tuple(r.strip() for r in rows.split(",") if r.strip()), rounds=rounds, **overrides)
        run_ablation(cfg, log=typer.echo)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo((out / "table.md").read_text())


def register(app: typer.Typer) -> None:
    """Add this area's commands to the app."""
    app.command(name="evaluate")(evaluate)
    app.command(name="report")(report)
    app.command(name="ablation")(ablation)
