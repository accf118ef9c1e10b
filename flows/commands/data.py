"""capfilt CLI commands for the data area: `capfilt synth [--videos]` and `capfilt ingest web|human|img2dataset|videos`."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from data.defaults import DEFAULT_BASE_URL
from data.video import CODECS, MAX_DURATION_S  # numpy and PIL only; the ingesters load pyarrow when called
from flows.commands import local_path

if TYPE_CHECKING:
    from data.ingest import IngestStats

ingest_app = typer.Typer(help="Ingest image-text pairs into pairs shards.", no_args_is_help=True)


def _echo_stats(stats: IngestStats, out: str | Path) -> None:
    typer.echo(json.dumps({"out": str(out), **dataclasses.asdict(stats)}, indent=2))


def synth(
    out: Path = typer.Argument(None, parser=local_path, help="Folder to write the world into (human/, web/, test/, truth/)."),
    seed: int = typer.Option(0, help="Random seed; the world is a pure function of its settings."),
    human: int = typer.Option(1000, help="Human-annotated images (correct captions)."),
    human_captions: int = typer.Option(1, help="Correct captions per human image."),
    web: int = typer.Option(4000, help="Web images (noisy captions)."),
    test: int = typer.Option(500, help="Held-out test images."),
    test_captions: int = typer.Option(5, help="Correct captions per test image."),
    rates: str = typer.Option("0.25,0.35,0.20,0.20", help="Web caption kinds: correct,weak,swapped,junk."),
    image_size: int = typer.Option(32, help="Image side in pixels."),
    rows_per_shard: int = typer.Option(1000, help="Rows per output shard."),
    as_urls: bool = typer.Option(False, "--as-urls", help="Also write www/ files and web_urls.parquet."),
    base_url: str = typer.Option(DEFAULT_BASE_URL, help="Base of the URLs in web_urls.parquet."),
    videos: Path = typer.Option(None, "--videos", parser=local_path, help="Write a synthetic video test set here instead (or too): clips of drifting shapes."),
    clips: int = typer.Option(40, help="--videos: clips."),
    clip_frames: int = typer.Option(16, help="--videos: encoded frames per clip."),
    fps: int = typer.Option(8, help="--videos: frames per second."),
    codec: str = typer.Option("h264-lossless", help=f"--videos: {' | '.join(sorted(CODECS))}."),
    clip_captions: int = typer.Option(5, help="--videos: correct captions per clip."),
) -> None:
    """Generate the synthetic shapes world, and/or (--videos) clips of it (deterministic per seed; reruns skip finished shards)."""
    from data.synth import SynthConfig, generate_world
    from data.synth_video import VideoWorldConfig, generate_video_world
    from data.synth_world import RenderConfig

    if out is None and videos is None:
        raise typer.BadParameter("give OUT (the image world) and/or --videos OUT (the clips)")
    if videos is not None:
        try:
            vcfg = VideoWorldConfig(seed=seed, clips=clips, frames=clip_frames, fps=fps, codec=codec,
                                    captions=clip_captions, rows_per_shard=rows_per_shard,
                                    render=RenderConfig(image_size=image_size))  # fmt: skip
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None
        typer.echo(json.dumps({"videos": str(videos), **dataclasses.asdict(generate_video_world(videos, vcfg))}, indent=2))
    if out is None:
        return
    web_rates = tuple(float(x) for x in rates.split(","))
    if len(web_rates) != 4:
        raise typer.BadParameter("--rates needs four numbers: correct,weak,swapped,junk")
    cfg = SynthConfig(
        seed=seed,
        human_images=human,
        human_captions=human_captions,
        web_images=web,
        test_images=test,
        test_captions=test_captions,
        web_rates=web_rates,  # type: ignore[arg-type]
        rows_per_shard=rows_per_shard,
        render=RenderConfig(image_size=image_size),
    )
    result = generate_world(out, cfg, as_urls=as_urls, base_url=base_url)
    summary = dataclasses.asdict(result)
    summary["url_list"] = str(result.url_list) if result.url_list else None
    typer.echo(json.dumps({"out": str(out), **summary}, indent=2))


@ingest_app.command("web")
def ingest_web_command(
    url_list: Path = typer.Argument(..., parser=local_path, help="CSV, TSV, JSONL or Parquet with url and caption columns."),
    out: Path = typer.Argument(..., parser=local_path, help="Folder for the pairs shards (e.g. runs/x/ingest/web)."),
    url_col: str = typer.Option("url"),
    caption_col: str = typer.Option("caption"),
    key_col: str = typer.Option("", help="Key column (default: 'key' if present, else row numbers)."),
    input_format: str = typer.Option("", help="csv|tsv|jsonl|parquet (default: from the suffix)."),
    source: str = typer.Option("web", help="human | web | synthetic."),
    key_prefix: str = typer.Option("web-", help="Prefix of generated keys."),
    rows_per_shard: int = typer.Option(1000),
    processes: int = typer.Option(1, help="img2dataset processes."),
    threads: int = typer.Option(16, help="img2dataset threads per process."),
    timeout: int = typer.Option(10, help="Seconds per download."),
    retries: int = typer.Option(0, help="img2dataset retries per URL."),
    image_size: int = typer.Option(256),
    resize_mode: str = typer.Option("no", help="img2dataset resize_mode (no keeps the size)."),
    encode_format: str = typer.Option("jpg", help="jpg | png | webp."),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Download only previously failed rows again."),
    serve: Path = typer.Option(None, parser=local_path, help="Serve this folder on 127.0.0.1 while ingesting (local lists)."),
    port: int = typer.Option(8000, help="Port for --serve (must match the list's URLs)."),
    run_timeout: float = typer.Option(0, help="Stop an img2dataset run after this many seconds (0: no limit)."),
) -> None:
    """Download a URL list through img2dataset into pairs shards; every URL is accounted for."""
    from blip_core.progress import Advance
    from data.ingest_web import WebIngestConfig, ingest_web, serve_folder

    cfg = WebIngestConfig(
        url_col=url_col,
        caption_col=caption_col,
        key_col=key_col or None,
        input_format=input_format or None,
        source=source,
        key_prefix=key_prefix,
        rows_per_shard=rows_per_shard,
        processes=processes,
        threads=threads,
        timeout_s=timeout,
        retries=retries,
        image_size=image_size,
        resize_mode=resize_mode,
        encode_format=encode_format,
        run_timeout_s=run_timeout or None,
    )
    server = serve_folder(serve, port) if serve is not None else contextlib.nullcontext()
    with server:
        with Advance("ingest: download", unit="shard") as advance:
            stats = ingest_web(url_list, out, cfg, retry_failed=retry_failed, on_shard=advance)
    _echo_stats(stats, out)


@ingest_app.command("human")
def ingest_human_command(
    src: Path = typer.Argument(..., parser=local_path, help="COCO captions JSON, BLIP-style JSON list, or Parquet/JSONL/CSV list."),
    out: Path = typer.Argument(..., parser=local_path, help="Folder for the pairs shards (e.g. runs/x/ingest/human)."),
    images: Path = typer.Option(None, parser=local_path, help="Image folder (default: next to SRC)."),
    image_col: str = typer.Option("image", help="Lists: column with an image path or URL."),
    caption_col: str = typer.Option("caption"),
    key_prefix: str = typer.Option("human-"),
    rows_per_shard: int = typer.Option(1000),
) -> None:
    """Ingest human-annotated pairs (missing images become failed rows)."""
    from data.ingest_human import HumanIngestConfig, ingest_human

    cfg = HumanIngestConfig(
        image_col=image_col,
        caption_col=caption_col,
        image_root=str(images) if images else None,
        key_prefix=key_prefix,
        rows_per_shard=rows_per_shard,
    )
    _echo_stats(ingest_human(src, out, cfg), out)


@ingest_app.command("img2dataset")
def ingest_img2dataset_command(
    folder: str = typer.Argument(..., help="An img2dataset output folder (parquet or webdataset), a path or URL."),
    out: str = typer.Argument(..., help="Folder for the pairs shards, a path or URL."),
    source: str = typer.Option("web"),
) -> None:
    """Import an existing img2dataset output folder as pairs shards (keys: img2dataset's, as the stages read them)."""
    from data.ingest_web import ImportConfig, import_img2dataset

    _echo_stats(import_img2dataset(folder, out, ImportConfig(source=source)), out)


@ingest_app.command("videos")
def ingest_videos_command(
    src: Path = typer.Argument(..., parser=local_path, help="A folder of videos with one captions file (CSV/TSV/JSONL of path + caption, "
                                         "MSR-VTT's annotation JSON or a BLIP-style list), or that captions file."),
    out: Path = typer.Argument(..., parser=local_path, help="Folder for the videos shards."),
    videos_root: Path = typer.Option(None, parser=local_path, help="Where relative video paths live (default: beside the captions file)."),
    key_prefix: str = typer.Option("video-"),
    source: str = typer.Option("human"),
    rows_per_shard: int = typer.Option(500),
    max_duration: float = typer.Option(MAX_DURATION_S, help="Longer videos become failed rows (too_long)."),
) -> None:
    """Ingest video-text pairs into videos shards (corrupt, empty, missing or too long videos become failed rows)."""
    from data.ingest_video import VideoIngestConfig, ingest_videos

    cfg = VideoIngestConfig(source=source, key_prefix=key_prefix, video_root=str(videos_root) if videos_root else None,
                            rows_per_shard=rows_per_shard, max_duration_s=max_duration)  # fmt: skip
    _echo_stats(ingest_videos(src, out, cfg), out)


def register(app: typer.Typer) -> None:
    """Add `capfilt synth` and `capfilt ingest ...` to the app."""
    app.command("synth")(synth)
    app.add_typer(ingest_app, name="ingest")
