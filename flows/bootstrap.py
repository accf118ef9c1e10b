"""The CapFilt bootstrap as one Prefect flow.

ingest (human, web, test) -> pretrain MED -> finetune filter || finetune captioner ->
caption web shards -> filter web + synthetic captions -> assemble D' -> pretrain the
final MED on D' -> evaluate -> report; optionally several rounds (the final model of
round r is the pretrained model of round r + 1).

Every stage is a Prefect task calling the `tasks/` functions; a shard stage is ONE task
whatever its number of shards, running a few long-lived workers over the stage's plan
file, in threads or on the run's Dask cluster (`flows.runners`). Rerunning the flow on
the same run folder resumes: finished steps come back from Prefect's cache, which
`flows.caching` keeps in agreement with the completion records, shard stages skip the
shards whose records are complete, and training continues from its newest checkpoint.

The run folder may be a URL (``s3://bucket/run``): shard stages, completion records,
``current.json``, ``stages.jsonl``, the evaluation and the report are written there
(`data.storage`); what needs a local disk (Prefect's ``.prefect`` results, training
checkpoints, the shared tokenizer, local copies of training shards) lives in the run's
local working folder, `work_dir`, and each finished model is published to the URL
(`flows.training.train_published`), where Dask workers on other machines load it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.futures import PrefectFuture

from data.layout import MODEL_ENTRY, SHARD_STAGES, LayoutError, RunLayout, model_name
from data.shards import list_shards, settings_hash, write_atomic
from data.storage import RemotePath, is_remote, location
from flows import artifacts, steps
from flows.caching import StepJob, result_storage, write_list
from flows.config import RunConfig
from flows.runners import ShardCluster, shard_cluster
from tasks.assemble import assemble_settings
from tasks.evaluate.config import semantic_settings as eval_settings
from tasks.execution import semantic_settings
from tasks.filter import filter_config_settings
from tasks.video_eval import semantic_settings as video_settings


WORK_DIR_ENV = "CAPFILT_WORK_DIR"


def work_dir(run_dir: str) -> Path:
    """The local working folder of a run: the run folder itself when it is local; for a URL,
    ``<$CAPFILT_WORK_DIR or <tmp>/capfilt-work>/<sha of the URL>`` (Prefect's results,
    training checkpoints; losing it costs time, not results: models are published)."""
    if not is_remote(run_dir):
        return Path(run_dir).resolve()
    base = Path(os.environ.get(WORK_DIR_ENV) or Path(tempfile.gettempdir()) / "capfilt-work")
    return base / hashlib.sha256(str(location(run_dir)).rstrip("/").encode()).hexdigest()[:16]


def _record_before(layout: RunLayout) -> dict[str, str]:
    """The run folder's record as the run starts ({} when there is none or it is unreadable)."""
    try:
        return layout.read_current()
    except LayoutError:
        return {}


class _Run:
    """Per-run state: the config, the run folder (local or a URL) and its local working
    folder, tasks bound to this run's result storage."""

    def __init__(self, config: RunConfig, cluster: ShardCluster | None = None) -> None:
        self.config = config
        self.cluster = cluster  # the run's one Dask cluster (None on threads)
        self.remote = is_remote(config.run_dir)
        self.root = location(config.run_dir) if self.remote else Path(config.run_dir).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.work = work_dir(config.run_dir)
        self.work.mkdir(parents=True, exist_ok=True)
        self.layout = RunLayout(self.root)
        self.work_layout = RunLayout(self.work)  # the same as `layout` for a local run
        # What this run used, written to current.json as it goes. Shard stages past stop_after
        # keep their entry (a standalone `capfilt assemble` after a caption + filter run stays
        # current) until this run changes an output they were made from (`use`).
        self.before = _record_before(self.layout)
        self.current = {name: str(self.layout.resolve(path)) for name, path in self.before.items()
                        if name in SHARD_STAGES and not config.runs_stage(name)}  # fmt: skip
        self.layout.write_current(self.current)
        store = result_storage(self.work)
        names = ("world_task", "ingest_task", "train_task", "plan_stage", "shard_stage_task", "assemble_task",
                 "evaluate_task", "video_eval_task")  # fmt: skip
        self.tasks = {name: getattr(steps, name).with_options(result_storage=store) for name in names}
        self.rows: list[dict[str, Any]] = []
        self.tokenizer_shards: list[str] = []  # captions a scratch model's vocabulary is built from

    def job(self, step: str, **kwargs: Any) -> StepJob:
        # the job's run_dir is where its Prefect output records go: the local working folder
        return StepJob(step=step, run_dir=str(self.work), **kwargs)

    def shard_list(self, paths: list[str]) -> str:
        """`paths` as a list file (`flows.caching.write_list`): what a task takes instead of a
        list whose size grows with the number of shards."""
        return write_list(self.work, paths)

    def record(self, row: dict[str, Any], did_work: bool = True) -> None:
        """Keep a stage's row for the summary and publish its table; when the stage did
        work in this run, append the row to ``stages.jsonl`` too (the report reads stage
        times there, last line winning; the run lock makes this flow its only writer)."""
        self.rows.append(row)
        artifacts.publish_stage_table(self.root.name, row)
        if did_work:
            log = self.layout.stages_log
            if isinstance(log, RemotePath):  # no append on object storage: rewrite the object whole
                before = log.read_text() if log.is_file() else ""
                write_atomic(log, before + json.dumps(row) + "\n")
            else:
                with open(log, "a") as handle:
                    handle.write(json.dumps(row) + "\n")

    def use(self, name: str, path: str) -> str:
        """Record `path` as this run's current output `name` (``caption``, ``model/final`` ...);
        a shard stage output other than the one recorded before drops the later stages' kept
        entries (made from the old one)."""
        if name in SHARD_STAGES and self.layout.relative(path) != self.before.get(name):
            for later in SHARD_STAGES[SHARD_STAGES.index(name) + 1 :]:
                self.current.pop(later, None)
        self.current[name] = path
        self.layout.write_current(self.current)
        return path


# ----------------------------------------------------------------------------- data


def _expand(items: list[str]) -> list[str]:
    from data.inputs import expand_inputs

    return [str(p) for p in expand_inputs(items)] if items else []


def ingest_stage(run: _Run) -> dict[str, Any]:
    """Shards per split (human, web, test) and the truth folder.

    With a synthetic world: generate it into RUN/world, link its human / test shards
    and truth into RUN/ingest and RUN/truth, and fetch its web images through
    img2dataset from a local server. Otherwise use the configured paths, fetching
    `data.web_urls` with img2dataset into RUN/ingest/web.
    """
    cfg, layout = run.config, run.layout
    splits: dict[str, Any] = {"human": _expand(cfg.data.human), "web": _expand(cfg.data.web),
                              "test": _expand(cfg.data.test), "truth": cfg.data.truth}  # fmt: skip
    results: list[dict[str, Any]] = []
    world = layout.world
    if cfg.data.world is not None:
        job = run.job("world", settings={"world": cfg.data.world.model_dump(), "as_urls": cfg.data.serve_local},
                      params={"out": str(world)})  # fmt: skip
        results.append(run.tasks["world_task"](job=job, config=cfg))
        results.append(_ingest(run, "truth", "link", [str(world / "truth")], dst=layout.truth, pattern="*"))
        splits["truth"] = str(layout.truth)
        for split in ("human", "test") + (() if cfg.data.serve_local else ("web",)):
            results.append(_ingest(run, split, "link", [str(world / split)]))
            splits[split] = results[-1]["shards"]
        if cfg.data.serve_local:
            # the URL list holds the local server's port: key the step on the world's web shards
            results.append(_ingest(run, "web", "urls", [str(world / "web_urls.parquet")], www=str(world / "www"),
                                   key_inputs=[str(world / "web")]))  # fmt: skip
            splits["web"] = results[-1]["shards"]
    elif cfg.data.web_urls:
        results.append(_ingest(run, "web", "urls", [cfg.data.web_urls]))
        splits["web"] = results[-1]["shards"]
    counts = {split: sum(_rows(p) for p in splits[split]) for split in ("human", "web", "test")}
    shards = sum(len(splits[s]) for s in ("human", "web", "test"))
    run.record({"stage": "ingest", "input": sum(counts.values()), **counts, "shards": shards,
                "seconds": round(sum(r["seconds"] for r in results), 2)})  # fmt: skip
    return splits


def _ingest(run: _Run, split: str, mode: str, sources: list[str], www: str | None = None, dst: Path | None = None,
            pattern: str = "part-*", key_inputs: list[str] | None = None) -> dict[str, Any]:  # fmt: skip
    dst = dst or run.layout.ingest(split)
    params = {"split": split, "mode": mode, "sources": sources, "dst": str(dst), "www": www, "pattern": pattern,
              "processes": run.config.data.ingest_processes, "threads": run.config.data.ingest_threads}  # fmt: skip
    world = run.config.data.world
    settings = {"mode": mode, "split": split, "rows_per_shard": world.shard_rows if world else None}
    job = run.job(f"ingest-{split}", inputs=key_inputs or sources, settings=settings, params=params)
    return run.tasks["ingest_task"](job=job, config=run.config)


def _rows(path: str) -> int:
    from data.inputs import input_rows

    return input_rows(location(path))  # path: local or a URL


# ----------------------------------------------------------------------------- training


def _train_job(run: _Run, step: str, mode: str, role: str, data: list[str], init: str | None,
               round_index: int = 1) -> StepJob:  # fmt: skip
    stage_cfg = {"pretrain": run.config.train.pretrain, "finetune-filter": run.config.train.finetune_filter,
                 "finetune-captioner": run.config.train.finetune_captioner, "final": run.config.train.final}[step]  # fmt: skip
    from tasks.model_store import local_model
    from tasks.shard_cache import local_shards
    from tasks.train import training_identity

    # the trainer reads local files: shards and init weights on object storage are copied once
    local_data = local_shards(data)
    local_init = str(local_model(init)) if init else None
    stage = dataclasses.asdict(stage_cfg)
    settings = {"mode": mode, "preset": run.config.model.preset, "vocab_size": run.config.model.vocab_size,
                **stage}  # fmt: skip
    identity = {k: v for k, v in settings.items() if k != "checkpoint_every"} | training_identity(local_data, local_init)
    # one folder per (settings, data, init weights): other settings never overwrite a finished model
    model_id = settings_hash(identity)
    out = str(run.work_layout.model_dir(role, round_index) / model_id)
    publish = str(run.layout.model_dir(role, round_index) / model_id / "final") if run.remote else None
    tokenizer_shards = local_shards(run.tokenizer_shards) if init is None else []
    kwargs = {"mode": mode, "data": run.shard_list(local_data), "out": out, "init": local_init,
              "preset": run.config.model.preset, "stage": stage, "device": run.config.device,
              "loader_workers": run.config.loader_workers, "vocab_size": run.config.model.vocab_size,
              "tokenizer_dir": str(run.work_layout.tokenizer), "tokenizer_shards": run.shard_list(tokenizer_shards),
              "nproc_per_node": run.config.train.nproc_per_node}  # fmt: skip
    inputs = [run.shard_list(data)] + ([init] if init else [])
    index = round_index if round_index > 1 else None
    params = {"out": out, "kwargs": kwargs, "name": model_name(role, round_index), "publish": publish}
    return run.job(step, index=index, inputs=inputs, settings=settings, params=params)


def _submit_train(run: _Run, job: StepJob) -> PrefectFuture:
    """Start a training task in a thread of the flow (for the two concurrent finetunes)."""
    return run.tasks["train_task"].submit(job=job, config=run.config)


def _train_now(run: _Run, job: StepJob) -> str:
    """Run a training task in the flow's own thread and process, also under a Dask task
    runner (the pretrain and final stages; the two finetunes go through `_submit_train`)."""
    return _record_training(run, job, run.tasks["train_task"](job=job, config=run.config))


def _trained(run: _Run, job: StepJob, future: PrefectFuture) -> str:
    """Wait for a training task started with `_submit_train`."""
    return _record_training(run, job, future.result())


def _record_training(run: _Run, job: StepJob, result: dict[str, Any]) -> str:
    """Record a training task's row (its time is the training's own, also when cached)."""
    name = job.params["name"]
    run.use(MODEL_ENTRY + name, result["model"])
    run.record({"stage": f"train {name}",
                "seconds": round(result["seconds"], 2), "steps": result["result"].get("steps")},
               did_work=not result["result"].get("finished_before"))  # fmt: skip
    return result["model"]


# ----------------------------------------------------------------------------- shard stages


def _run_shards(run: _Run, stage: str, plan: dict[str, Any], model: str) -> None:
    """Run a shard stage's plan as one task on the run's workers (on Dask: the run's one
    cluster); its row records the runner and, on Dask, the scheduler and the workers that
    did shard work and the seconds the stage waited for the cluster (part of its time)."""
    start = time.perf_counter()
    row_extra: dict[str, Any] = {"runner": run.config.runner.kind}
    address = None
    if run.cluster is not None:
        waited = time.perf_counter()
        address = run.cluster.address()  # waits for the run's LocalCluster on its first stage
        row_extra.update(dask_scheduler=address, dask_wait_s=round(time.perf_counter() - waited, 2))
    params = {**plan, "model": model}
    job = run.job(stage, settings={"digest": plan["digest"]}, params=params)
    result = run.tasks["shard_stage_task"](job=job, config=run.config, address=address)
    workers = result["workers"]
    if run.cluster is not None:
        row_extra["dask_workers"] = sorted({w["worker"] for w in workers if w.get("worker") and w["shards"] > w["skipped"]})
    if result["execution"]:
        row_extra["execution"] = result["execution"]  # the batch size and loader workers chosen, and why
    row = {**artifacts.stage_row(stage, workers, time.perf_counter() - start), **row_extra}
    run.record(row, did_work=any(w["shards"] > w["skipped"] for w in workers))


def caption_stage(run: _Run, web: list[str], captioner: str) -> str:
    """Caption every web shard; returns the ``caption/<hash>`` folder."""
    web_list = run.shard_list(web)
    plan = run.tasks["plan_stage"](
        job=run.job("plan-caption", inputs=[captioner], settings={**semantic_settings(run.config.caption), "web": web_list},
                    params={"model": captioner, "out_dir": str(run.layout.stage("caption")), "web": web_list}),  # fmt: skip
        config=run.config,
    )
    _run_shards(run, "caption", plan, captioner)
    return run.use("caption", plan["folder"])


def filter_stage(run: _Run, web: list[str], filter_model: str, captions: str | None) -> str:
    """Filter web + synthetic captions of every web shard; returns ``filter/<hash>``."""
    # the caption folder is named by its settings hash: its name is its identity (its shards
    # are not read for the key), and its records are what the plan reads
    web_list = run.shard_list(web)
    settings = {**filter_config_settings(run.config.filter), "web": web_list, "captions": captions}
    plan = run.tasks["plan_stage"](
        job=run.job("plan-filter", inputs=[filter_model], settings=settings,
                    params={"model": filter_model, "out_dir": str(run.layout.stage("filter")), "captions": captions,
                            "web": web_list}),  # fmt: skip
        config=run.config,
    )
    _run_shards(run, "filter", plan, filter_model)
    return run.use("filter", plan["folder"])


def assemble_stage(run: _Run, human: list[str], filter_dir: str) -> list[str]:
    """D' = human + kept (web and synthetic); returns its shards. With `assemble.threshold`
    (or `top_k`) the filter's rejected shards are inputs too and every scored row is decided
    anew from its stored score: the filter folder is read, never rerun (no model runs)."""
    start = time.perf_counter()
    parts = ("kept", "rejected") if run.config.assemble.redecides else ("kept",)
    scored = [str(p) for part in parts for p in list_shards(location(filter_dir) / part)]
    human_list, scored_list = run.shard_list(human), run.shard_list(scored)
    job = run.job("assemble", inputs=[human_list, scored_list], settings=assemble_settings(run.config.assemble),
                  params={"human": human_list, "scored": scored_list, "out_dir": str(run.layout.stage("assemble"))})  # fmt: skip
    result = run.tasks["assemble_task"](job=job, config=run.config)
    row = artifacts.stage_row("assemble", result["shard_stats"], time.perf_counter() - start)
    run.record(row, did_work=not all(s.get("skipped") for s in result["shard_stats"]))
    run.use("assemble", result["output"])
    return result["shards"]


# ----------------------------------------------------------------------------- the flow


def _finish(run: _Run, summary: dict[str, Any]) -> dict[str, Any]:
    artifacts.publish_summary(run.root.name, run.rows)
    summary["stages"] = run.rows
    return summary


def _evaluate_and_report(run: _Run, final_model: str, splits: dict[str, Any], summary: dict[str, Any]) -> None:
    cfg = run.config
    params = {"model": final_model, "test": list(splits["test"]), "truth": splits["truth"], "out": str(run.layout.eval_dir),
              "filter_dir": summary.get("filter_dir"), "caption_dir": summary.get("caption_dir")}  # fmt: skip
    inputs = [final_model, *splits["test"], *([splits["truth"]] if splits["truth"] else [])]
    # the filter / caption folders are named by their settings hash: their names are their identity
    settings = {**eval_settings(cfg.evaluate), "filter": params["filter_dir"],
                "caption": params["caption_dir"]}  # fmt: skip
    job = run.job("evaluate", inputs=inputs, settings=settings, params=params)
    result = run.tasks["evaluate_task"](job=job, config=cfg)
    summary["metrics"] = run.use("eval", result["metrics"])
    run.record({"stage": "evaluate", "seconds": round(result.get("seconds", 0.0), 2)})
    if cfg.video.world is not None and cfg.data.world is not None:
        summary["video_metrics"] = _evaluate_videos(run, final_model, summary.get("pretrained_model"))
    if cfg.stages.report:
        summary["report"] = steps.report_task(str(run.root))


def _evaluate_videos(run: _Run, final_model: str, pretrained: str | None) -> str:
    """Zero-shot video: the final model, and the pretrain (no C/F) one, on synthetic clips of
    the world (their own seed stream: the image world's numbers do not move)."""
    cfg = run.config
    models = {"final": final_model, **({"pretrain": pretrained} if pretrained else {})}
    params = {"models": models, "world": str(run.layout.world / "videos"), "out": str(run.layout.eval_dir / "video.json")}
    settings = {"world": dataclasses.asdict(cfg.video.world), "evaluate": video_settings(cfg.video.evaluate),
                "models": sorted(models)}  # fmt: skip
    job = run.job("evaluate-video", inputs=list(models.values()), settings=settings, params=params)
    result = run.tasks["video_eval_task"](job=job, config=cfg)
    run.record({"stage": "evaluate video", "seconds": round(result.get("seconds", 0.0), 2)})
    return run.use("eval/video", result["video"])


@flow(name="capfilt-bootstrap", validate_parameters=True)
def bootstrap(config: RunConfig) -> dict[str, Any]:
    """Run (or resume) the CapFilt bootstrap described by `config` in `config.run_dir`.

    Returns a summary: model folders, stage output folders, the report path and one
    row per stage. Holds the run folder's lock, so two runs never write one folder, and,
    with `runner.kind: dask`, the run's one Dask cluster (closed when the flow ends).
    """
    from data.run_lock import run_lock
    from flows.run_record import forget_record, write_record

    _check_remote_run(config)
    config.apply_storage()
    with run_lock(config.run_dir), shard_cluster(config.runner, start_now=config.runs_stage("caption")) as cluster:
        forget_record(config)
        summary = _bootstrap(_Run(config, cluster))
        write_record(config, summary)
        return summary


def _check_remote_run(config: RunConfig) -> None:
    """A run folder on object storage takes its inputs as shards (`data.human|web|test`,
    local or URLs): the demo world and img2dataset fetches are made on a local disk."""
    if not is_remote(config.run_dir):
        return
    if config.data.world is not None or config.data.web_urls:
        what = "data.world (the generated demo world)" if config.data.world is not None else "data.web_urls (an img2dataset fetch)"
        raise ValueError(
            f"run_dir {config.run_dir}: {what} is made on a local disk, not in a run folder on object storage; "
            "generate or fetch it locally (`capfilt synth`, img2dataset), upload the shards, and give them as "
            "data.human / data.web / data.test (local paths or URLs), or use a local run_dir"
        )


def _bootstrap(run: _Run) -> dict[str, Any]:
    cfg, log = run.config, get_run_logger()
    summary: dict[str, Any] = {"run_dir": str(run.root)}
    splits = ingest_stage(run)
    summary["ingest"] = splits
    if not cfg.runs_stage("pretrain"):
        return _finish(run, summary)
    human, web = splits["human"], splits["web"]
    run.tokenizer_shards = human + web
    pretrained = cfg.model.pretrained
    if cfg.needs_pretrain():
        pretrained = _train_now(run, _train_job(run, "pretrain", "pretrain", "pretrain", human + web, None))
    summary["pretrained_model"] = final_model = pretrained  # None: given filter + captioner, no pretraining
    for round_index in range(1, cfg.rounds + 1):
        log.info("bootstrap round %d of %d", round_index, cfg.rounds)
        if not _capfilt_round(run, round_index, pretrained, splits, summary):
            break
        summary["final_model"] = pretrained = final_model = summary.pop("_final")
    if cfg.runs_stage("evaluate"):
        _evaluate_and_report(run, final_model, splits, summary)
    return _finish(run, summary)


def _capfilt_round(run: _Run, round_index: int, pretrained: str, splits: dict[str, Any], summary: dict[str, Any]) -> bool:
    """One bootstrap round from `pretrained`; False when `stop_after` ends the run inside it."""
    cfg, human, web = run.config, splits["human"], splits["web"]
    if not cfg.runs_stage("finetune"):
        return False
    given = {"filter": cfg.model.filter, "captioner": cfg.model.captioner}
    futures = {}
    for role, mode in (("filter", "finetune-filter"), ("captioner", "finetune-captioner")):
        if given[role] is None or round_index > 1:
            job = _train_job(run, mode, mode, role, human, pretrained, round_index)
            futures[role] = (job, _submit_train(run, job))  # the two finetunes run concurrently
    models = {**given, **{role: _trained(run, job, future) for role, (job, future) in futures.items()}}
    summary.update(filter_model=models["filter"], captioner_model=models["captioner"])
    if not cfg.runs_stage("caption"):
        return False
    summary["caption_dir"] = caption_stage(run, web, models["captioner"])
    if not cfg.runs_stage("filter"):
        return False
    summary["filter_dir"] = filter_stage(run, web, models["filter"], summary["caption_dir"])
    if not cfg.runs_stage("assemble"):
        return False
    dataset = assemble_stage(run, human, summary["filter_dir"])
    summary["dataset_dir"] = str(location(dataset[0]).parent) if dataset else None
    if not cfg.runs_stage("final"):
        return False
    job = _train_job(run, "final", "pretrain", "final", dataset, None, round_index)
    summary["_final"] = _train_now(run, job)
    return True


def run_bootstrap(config: RunConfig) -> dict[str, Any]:
    """Run the flow in this process (Prefect's temporary server when no API is set)."""
    return bootstrap(config=config)
