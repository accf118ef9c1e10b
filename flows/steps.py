"""The bootstrap's Prefect tasks: thin wrappers that call the `tasks/` and `data/` functions.

Each task takes a `StepJob` (what it reads, its semantic settings, its paths) and the
`RunConfig`, returns a small JSON-able dict (never tables or tensors), and records the
outputs it wrote so the cache agrees with the run folder (see `flows.caching`). The
wrapped functions skip work whose completion records match, so running a task again,
cached or not, is always safe. A shard stage is one task that runs a few long-lived
workers over the stage's plan file (`flows.runners`); lists of shards travel as list
files (`flows.caching.write_list`), so no parameter grows with the number of shards.
"""

from __future__ import annotations

import dataclasses
import os
import time
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from data.shards import list_shards
from data.storage import RemotePath, location
from flows import artifacts
from flows.artifacts import TrainingProgress, publish_report
from flows.caching import StepJob, read_list, record_outputs, step_cache_key
from flows.config import RunConfig
from flows.faults import maybe_fault
from flows.runners import gpu_slot

StageConfig = TypeVar("StageConfig")

_TASK_OPTIONS: dict[str, Any] = {
    "cache_key_fn": step_cache_key,
    "persist_result": True,
    "result_serializer": "json",
    "task_run_name": "{job.label}",
}


def stage_config(config: RunConfig, cfg: StageConfig) -> StageConfig:
    """A stage's config as the run gives it, for the flow's tasks: its `execution.device`
    left at ``auto`` and `num_workers` at -1 follow the run's `device` and `loader_workers`;
    progress stays on: a bar in the CLI's terminal (threads runner), plain lines in logs
    and in worker processes (`blip_core.progress` decides by stderr). Applies the run's
    storage options in this process (a Dask worker's too) before the stage opens any URL."""
    config.apply_storage()
    run = cfg.execution
    execution = dataclasses.replace(
        run,
        device=config.device if run.device == "auto" else run.device,
        num_workers=config.loader_workers if run.num_workers == -1 else run.num_workers,
    )
    return dataclasses.replace(cfg, execution=execution)


def _log() -> Any:
    return get_run_logger()


# ----------------------------------------------------------------------------- planning


@task(name="plan", **_TASK_OPTIONS)
def plan_stage(job: StepJob, config: RunConfig) -> dict[str, Any]:
    """Resolve a shard stage's output folder (``STAGE/<settings-hash>``) and digest with the
    stage's own plan (`plan_caption` / `plan_filter`), and write the plan into that folder
    (`tasks.executor.PLAN_FILE`): the stage's workers read it there, so nothing sent to
    Prefect grows with the number of shards. Rerun-safe: same settings, same folder."""
    import blip_core

    from tasks.executor import write_plan
    from tasks.model_store import local_model

    stage = job.step.removeprefix("plan-")
    loaded = blip_core.load(local_model(job.params["model"]), device="cpu")
    out_dir, web = location(job.params["out_dir"]), [location(p) for p in read_list(job.params["web"])]
    if stage == "caption":
        from tasks.caption import plan_caption

        stats, items = plan_caption(web, out_dir, loaded, stage_config(config, config.caption))
    elif stage == "filter":
        from tasks.filter import plan_filter

        captions = job.params.get("captions")
        stats, items = plan_filter(web, out_dir, loaded, stage_config(config, config.filter), location(captions) if captions else None)
    else:
        raise ValueError(f"plan_stage: no shard stage named {stage!r}; expected caption or filter")
    plan = write_plan(stats.output, items)
    record_outputs(job, [str(stats.output / "stage.json"), str(plan)])
    return {"folder": str(stats.output), "digest": stats.settings_hash, "plan": str(plan), "shards": len(items)}


# ----------------------------------------------------------------------------- shard stages


@task(name="shard-stage", cache_policy=NO_CACHE, task_run_name="{job.label}")
def shard_stage_task(job: StepJob, config: RunConfig, address: str | None = None) -> dict[str, Any]:
    """Run a caption or filter stage's plan on the run's workers (`flows.runners`): on the
    Dask cluster at `address`, else in threads of this process. Not cached: the shards'
    completion records decide what is done, so a rerun of a finished stage only reads them.
    Every shard is attempted; then the first failure (if any) is raised, so the flow fails
    and a rerun resumes."""
    from flows.runners import run_on_dask, run_on_threads
    from tasks.executor import WorkerResult, WorkerSpec

    stage, p = job.step, job.params
    cfg = stage_config(config, getattr(config, stage))
    quiet = dataclasses.replace(cfg, execution=dataclasses.replace(cfg.execution, progress=False))  # the stage's bar counts shards

    def shares(slots: int) -> list[WorkerSpec]:  # one worker per slot, never more than shards
        world = max(1, min(p["shards"], slots))
        return [WorkerSpec(stage, p["plan"], p["folder"], p["digest"], p["model"], quiet, rank, world) for rank in range(world)]

    with artifacts.ShardProgress(stage, p["shards"], enabled=cfg.execution.progress) as progress:
        run = partial(run_on_dask, address) if address else run_on_threads
        outcomes = run(shares, config, progress.done)
    crashed = [o for o in outcomes if isinstance(o, BaseException)]
    results = [o for o in outcomes if isinstance(o, WorkerResult)]
    if crashed:
        raise crashed[0]
    failed = sum(r.failed for r in results)
    if failed:
        named = "\n".join(f"  {src}: {error}" for r in results for src, error in r.failures.items())
        _log().error("%s: %d of %d shards failed", stage, failed, p["shards"])
        raise StageFailed(f"{stage}: {failed} of {p['shards']} shards failed (the others are complete, a rerun "
                          f"resumes):\n{named}")  # fmt: skip
    return {"workers": [_stats_dict(r) for r in results], "execution": next((r.execution for r in results if r.execution), "")}


class StageFailed(RuntimeError):
    """Some shards of a stage failed; every other shard completed (a rerun redoes only these)."""


def _stats_dict(stats: Any) -> dict[str, Any]:
    out = dataclasses.asdict(stats)
    return {k: (str(v) if isinstance(v, (Path, RemotePath)) else v) for k, v in out.items()}


# ----------------------------------------------------------------------------- whole-stage steps


@task(name="world", **_TASK_OPTIONS)
def world_task(job: StepJob, config: RunConfig) -> dict[str, Any]:
    """Generate the synthetic world into ``RUN/world`` (deterministic; complete shards kept)."""
    from data.synth import SynthConfig, generate_world

    maybe_fault("world")
    w = config.data.world
    assert w is not None
    cfg = SynthConfig(
        seed=w.seed, human_images=w.n_human, web_images=w.n_web, test_images=w.n_test, rows_per_shard=w.shard_rows
    )
    out = Path(job.params["out"])
    start = time.perf_counter()
    result = generate_world(out, cfg, as_urls=config.data.serve_local)
    seconds = time.perf_counter() - start
    _log().info("synthetic world: %s rows in %.1f s", result.rows, seconds)
    outputs = [str(p) for split in ("human", "web", "test") for p in sorted((out / split).glob("part-*.parquet"))]
    record_outputs(job, outputs)
    return {"rows": result.rows, "seconds": seconds, "url_list": str(result.url_list) if result.url_list else None}


def link_shards(src_dir: Path, dst_dir: Path, pattern: str = "part-*") -> list[str]:
    """Hard-link (or copy) the files of `src_dir` matching `pattern` (shards and their
    completion records by default) into `dst_dir`; returns the linked files.

    Idempotent: an existing identical link is kept; a different file is replaced atomically.
    """
    import shutil

    from data.shards import atomic_path

    dst_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for src in sorted(src_dir.glob(pattern)):
        if src.name.endswith(".tmp") or not src.is_file():
            continue
        dst = dst_dir / src.name
        if dst.exists() and os.path.samefile(src, dst):
            written.append(str(dst))
            continue
        with atomic_path(dst) as tmp:
            try:
                os.link(src, tmp)
            except OSError:
                shutil.copy2(src, tmp)
        written.append(str(dst))
    return written


@task(name="ingest", **_TASK_OPTIONS)
def ingest_task(job: StepJob, config: RunConfig) -> dict[str, Any]:
    """Bring one split into ``RUN/ingest/<split>``: link world shards, import pair shards,
    or fetch a URL list with img2dataset (from a local HTTP server for the world)."""
    maybe_fault("ingest")
    split = job.params["split"]
    dst = Path(job.params["dst"])
    start = time.perf_counter()
    mode = job.params["mode"]
    if mode == "link":
        outputs: list[str] = []
        pattern = job.params.get("pattern", "part-*")
        for src in job.params["sources"]:
            outputs += [p for p in link_shards(Path(src), dst, pattern) if not p.endswith(".done.json")]
    elif mode == "urls":
        from flows.ingest import ingest_url_list

        outputs = ingest_url_list(job.params, config)
    else:
        raise ValueError(f"ingest: unknown mode {mode!r}")
    seconds = time.perf_counter() - start
    _log().info("ingest %s: %d shards in %.1f s", split, len(outputs), seconds)
    record_outputs(job, outputs)
    return {"split": split, "shards": outputs, "seconds": seconds}


@task(name="train", **_TASK_OPTIONS)
def train_task(job: StepJob, config: RunConfig) -> dict[str, Any]:
    """Train one model (pretrain / finetune-filter / finetune-captioner / final) into
    ``models/<name>/final``; the trainer resumes from its newest checkpoint on a rerun.
    With ``params.publish`` (a run folder on object storage) the model trained in the local
    working folder is uploaded there, and one already published is used as is."""
    from flows.training import train_published

    maybe_fault(job.step, job.index)
    p = job.params
    start = time.perf_counter()
    metrics = Path(p["kwargs"]["out"]) / "metrics.jsonl"
    kwargs = {**p["kwargs"], "data": read_list(p["kwargs"]["data"]), "tokenizer_shards": read_list(p["kwargs"]["tokenizer_shards"])}
    with gpu_slot(config), TrainingProgress(job.label, metrics, int(p["kwargs"]["stage"]["steps"])):
        result = train_published(p.get("publish"), **kwargs)
    seconds = time.perf_counter() - start
    _log().info("%s: model %s (%s steps) in %.1f s", job.label, result["final"], result["steps"], seconds)
    record_outputs(job, [result["final"]])
    return {"model": result["final"], "seconds": seconds, "result": _jsonable(result)}


@task(name="assemble", **_TASK_OPTIONS)
def assemble_task(job: StepJob, config: RunConfig) -> dict[str, Any]:
    """Assemble D' = human + kept web + kept synthetic into ``assemble/<hash>/`` (the
    filter's rejected shards too when the assemble config re-decides from the scores)."""
    from tasks.assemble import run_assemble

    maybe_fault("assemble")
    p = job.params
    cfg = stage_config(config, config.assemble)
    inputs = [location(x) for x in read_list(p["human"]) + read_list(p["scored"])]  # priority order: human first
    stats = run_assemble(inputs, location(p["out_dir"]), cfg)
    shards = sorted(str(x) for x in list_shards(stats.output))
    record_outputs(job, shards)
    return {"output": str(stats.output), "shard_stats": [_stats_dict(s) for s in stats.shards], "shards": shards}


@task(name="evaluate", **_TASK_OPTIONS)
def evaluate_task(job: StepJob, config: RunConfig) -> dict[str, Any]:
    """Evaluate the final model on the test set into ``eval/metrics.json``."""
    from tasks.evaluate.run import evaluate_run

    maybe_fault("evaluate")
    start = time.perf_counter()
    with gpu_slot(config):
        cfg = config.evaluate
        path = evaluate_run(**job.params, cfg=dataclasses.replace(cfg, device=config.device if cfg.device == "auto" else cfg.device))
    record_outputs(job, [str(path)])
    return {"metrics": str(path), "seconds": time.perf_counter() - start}


@task(name="evaluate-video", **_TASK_OPTIONS)
def video_eval_task(job: StepJob, config: RunConfig) -> dict[str, Any]:
    """Zero-shot video: synthetic clips into ``world/videos``, the named models on them
    into ``eval/video.json`` (both skip what is already complete)."""
    from tasks.video_eval import evaluate_video_world

    maybe_fault("evaluate-video")
    world, cfg, p = config.video.world, config.video.evaluate, job.params
    assert world is not None
    cfg = dataclasses.replace(cfg, device=config.device if cfg.device == "auto" else cfg.device)
    with gpu_slot(config):
        result = evaluate_video_world(p["models"], Path(p["world"]), Path(p["out"]), world, cfg)
    record_outputs(job, [p["out"]])
    return {"video": p["out"], "seconds": result["seconds"]}


@task(name="report", retries=1, cache_policy=NO_CACHE)
def report_task(run_dir: str) -> str:
    """Write ``report.md`` / ``report.html`` from the files the stages wrote and publish
    the report as a Markdown artifact; returns report.md's path. Not cached: it reads the
    whole run folder and is cheap, so every run rewrites it (atomically)."""
    from tasks.report import artifact_markdown, write_report

    root = location(run_dir)  # a local folder or a URL
    path = write_report(root)
    publish_report(root.name, artifact_markdown(root), run_dir)
    return str(path)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
