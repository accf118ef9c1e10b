"""The CapFilt bootstrap as one Prefect flow.

ingest (human, web, test) -> pretrain MED -> finetune filter || finetune captioner ->
caption web shards -> filter web + synthetic captions -> assemble D' -> pretrain the
final MED on D' -> evaluate -> report; optionally several rounds (the final model of
round r is the pretrained model of round r + 1).

Every stage is a Prefect task (shard stages: one task per shard, in a sub-flow that
runs on the configured task runner) calling the `tasks/` functions. Rerunning the flow
on the same run folder resumes: finished steps come back from Prefect's cache, which
`flows.caching` keeps in agreement with the completion records, and everything else
skips complete shards itself; training continues from its newest checkpoint.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, unmapped
from prefect.futures import PrefectFuture, as_completed

from flows import artifacts, steps
from flows.caching import StepJob, result_storage
from flows.config import RunConfig
from flows.runners import build_task_runner, gpu_annotation

REPORT_NAME = "report.md"


class _Run:
    """Per-run state: the config, absolute paths, tasks bound to this run's result storage."""

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.root = Path(config.run_dir).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        store = result_storage(self.root)
        names = ("world_task", "ingest_task", "train_task", "plan_stage", "caption_shard_task",
                 "filter_shard_task", "assemble_task", "evaluate_task")  # fmt: skip
        self.tasks = {name: getattr(steps, name).with_options(result_storage=store) for name in names}
        self.rows: list[dict[str, Any]] = []

    def job(self, step: str, **kwargs: Any) -> StepJob:
        return StepJob(step=step, run_dir=str(self.root), **kwargs)

    def record(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        artifacts.publish_stage_table(self.root.name, row)


# ----------------------------------------------------------------------------- data


def _expand(items: list[str]) -> list[str]:
    from tasks.common import expand_inputs

    return [str(p) for p in expand_inputs(items)] if items else []


def ingest_stage(run: _Run) -> dict[str, list[str] | str | None]:
    """Shards per split (human, web, test) and the truth folder, under RUN/ingest."""
    cfg, root = run.config, run.root
    start = time.perf_counter()
    splits: dict[str, list[str] | str | None] = {"human": _expand(cfg.data.human), "web": _expand(cfg.data.web),
                                                 "test": _expand(cfg.data.test), "truth": cfg.data.truth}  # fmt: skip
    world = root / "world"
    if cfg.data.world is not None:
        job = run.job("world", settings={"world": cfg.data.world.model_dump(), "as_urls": cfg.data.serve_local},
                      params={"out": str(world)})  # fmt: skip
        run.tasks["world_task"](job=job, config=cfg)
        _ingest(run, "truth", "link", [str(world / "truth")], dst=root / "truth", pattern="*")
        splits["truth"] = str(root / "truth")
        for split in ("human", "test") + (() if cfg.data.serve_local else ("web",)):
            splits[split] = _ingest(run, split, "link", [str(world / split)])
        if cfg.data.serve_local:
            # the URL list holds the local server's port: key the step on the world's web shards
            splits["web"] = _ingest(run, "web", "urls", [str(world / "web_urls.parquet")], www=str(world / "www"),
                                    key_inputs=[str(world / "web")])  # fmt: skip
    elif cfg.data.web_urls:
        splits["web"] = _ingest(run, "web", "urls", [cfg.data.web_urls], www=None)
    rows = sum(_rows(p) for split in ("human", "web", "test") for p in splits[split] or [])  # type: ignore[union-attr]
    run.record({"stage": "ingest", "input": rows, "shards": sum(len(splits[s] or []) for s in ("human", "web", "test")),
                "seconds": round(time.perf_counter() - start, 2)})  # fmt: skip
    return splits


def _ingest(run: _Run, split: str, mode: str, sources: list[str], www: str | None = None,
            dst: Path | None = None, pattern: str = "part-*", key_inputs: list[str] | None = None) -> list[str]:  # fmt: skip
    dst = dst or run.root / "ingest" / split
    params = {"split": split, "mode": mode, "sources": sources, "dst": str(dst), "www": www, "pattern": pattern,
              "processes": run.config.data.ingest_processes, "threads": run.config.data.ingest_threads}  # fmt: skip
    settings = {"mode": mode, "split": split, "ingest_rows": run.config.data.world.shard_rows if run.config.data.world else None}
    job = run.job(f"ingest-{split}", inputs=key_inputs or sources, settings=settings, params=params)
    return run.tasks["ingest_task"](job=job, config=run.config)["shards"]


def _rows(path: str) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


# ----------------------------------------------------------------------------- training


def _train_job(run: _Run, step: str, mode: str, name: str, data: list[str], init: str | None,
               round_index: int | None = None) -> StepJob:  # fmt: skip
    stage_cfg = {"pretrain": run.config.train.pretrain, "finetune-filter": run.config.train.finetune_filter,
                 "finetune-captioner": run.config.train.finetune_captioner, "final": run.config.train.final}[step]  # fmt: skip
    out = str(run.root / "models" / name)
    kwargs = {"mode": mode, "data": data, "out": out, "init": init, "preset": run.config.model.preset,
              "steps": stage_cfg.steps, "batch_size": stage_cfg.batch_size, "lr": stage_cfg.lr,
              "weight_decay": stage_cfg.weight_decay, "warmup_fraction": stage_cfg.warmup_fraction,
              "image_size": stage_cfg.image_size, "checkpoint_every": stage_cfg.checkpoint_every,
              "seed": stage_cfg.seed, "device": run.config.device,
              "nproc_per_node": run.config.train.nproc_per_node}  # fmt: skip
    settings = {"mode": mode, "preset": run.config.model.preset, **stage_cfg.model_dump()}
    inputs = data + ([init] if init else [])
    index = round_index if round_index and round_index > 1 else None
    return run.job(step, index=index, inputs=inputs, settings=settings, params={"out": out, "kwargs": kwargs})


def _submit_train(run: _Run, job: StepJob) -> PrefectFuture:
    with gpu_annotation(run.config):
        return run.tasks["train_task"].submit(job=job, config=run.config)


def _model_name(round_index: int, role: str) -> str:
    return role if round_index == 1 else f"round-{round_index}/{role}"


# ----------------------------------------------------------------------------- shard stages


@flow(name="capfilt-shards", validate_parameters=False)
def shard_stage(stage: str, jobs: list[StepJob], config: RunConfig) -> list[dict[str, Any]]:
    """Run one task per shard on this sub-flow's task runner; every shard is attempted,
    then the first failure (if any) is raised so the parent flow fails and can resume."""
    store = result_storage(config.run_dir)
    task = {"caption": steps.caption_shard_task, "filter": steps.filter_shard_task}[stage]
    task = task.with_options(result_storage=store)
    progress = artifacts.Progress(stage, len(jobs))
    with gpu_annotation(config):
        futures = task.map(job=jobs, config=unmapped(config))
    for _ in as_completed(list(futures)):
        progress.advance()
    results, errors = [], []
    for future in futures:
        state = future.state
        if state.is_completed():
            results.append(future.result())
        else:
            errors.append(state)
    if errors:
        get_run_logger().error("%s: %d of %d shards failed", stage, len(errors), len(jobs))
        errors[0].result()  # raises the shard's exception
    return results


def _run_shards(run: _Run, stage: str, jobs: list[StepJob]) -> list[dict[str, Any]]:
    start = time.perf_counter()
    sub = shard_stage.with_options(task_runner=build_task_runner(run.config.runner), flow_run_name=f"{stage}")
    results = sub(stage=stage, jobs=jobs, config=run.config)
    run.record(artifacts.stage_row(stage, results, time.perf_counter() - start))
    return results


def _shard_name(src: str) -> str:
    from tasks.common import output_name

    return output_name(Path(src))


def caption_stage(run: _Run, web: list[str], captioner: str) -> str:
    """Caption every web shard; returns the ``caption/<hash>`` folder."""
    plan = run.tasks["plan_stage"](
        job=run.job("plan-caption", inputs=[captioner], settings=run.config.caption.model_dump(exclude={"batch_size"}),
                    params={"model": captioner, "out_dir": str(run.root / "caption")}),  # fmt: skip
        config=run.config,
    )
    jobs = []
    for index, src in enumerate(web):
        name = _shard_name(src)
        params = {"src": src, "name": name, "folder": plan["folder"], "digest": plan["digest"], "model": captioner}
        jobs.append(run.job("caption", index=index, inputs=[src], settings={"digest": plan["digest"]}, params=params))
    _run_shards(run, "caption", jobs)
    return plan["folder"]


def filter_stage(run: _Run, web: list[str], filter_model: str, captions: str | None) -> str:
    """Filter web + synthetic captions of every web shard; returns ``filter/<hash>``."""
    names = [_shard_name(src) for src in web]
    plan_inputs = [filter_model] + ([str(Path(captions) / n) for n in names] if captions else [])
    plan = run.tasks["plan_stage"](
        job=run.job("plan-filter", inputs=plan_inputs, settings=run.config.filter.model_dump(exclude={"batch_size"}),
                    params={"model": filter_model, "out_dir": str(run.root / "filter"), "captions": captions,
                            "names": names}),  # fmt: skip
        config=run.config,
    )
    jobs = []
    for index, (src, name) in enumerate(zip(web, names)):
        cap = str(Path(captions) / name) if captions else None
        params = {"src": src, "name": name, "captions": cap, "folder": plan["folder"], "digest": plan["digest"],
                  "model": filter_model}  # fmt: skip
        inputs = [src] + ([cap] if cap else [])
        jobs.append(run.job("filter", index=index, inputs=inputs, settings={"digest": plan["digest"]}, params=params))
    _run_shards(run, "filter", jobs)
    return plan["folder"]


def assemble_stage(run: _Run, human: list[str], filter_dir: str) -> list[str]:
    """D' = human + kept (web and synthetic); returns its shards."""
    start = time.perf_counter()
    kept = sorted(str(p) for p in (Path(filter_dir) / "kept").glob("part-*.parquet"))
    job = run.job("assemble", inputs=human + kept, settings=run.config.assemble.model_dump(),
                  params={"human": human, "kept": kept, "out_dir": str(run.root / "assemble")})  # fmt: skip
    result = run.tasks["assemble_task"](job=job, config=run.config)
    row = artifacts.stage_row("assemble", [result], time.perf_counter() - start)
    run.record(row)
    return result["shards"]


# ----------------------------------------------------------------------------- the flow


def _finish(run: _Run, summary: dict[str, Any]) -> dict[str, Any]:
    artifacts.publish_summary(run.root.name, run.rows)
    summary["stages"] = run.rows
    return summary


def _evaluate_and_report(run: _Run, final_model: str, splits: dict[str, Any], summary: dict[str, Any]) -> None:
    cfg = run.config
    model_name = Path(final_model).resolve().relative_to(run.root / "models").as_posix()
    params = {"model_name": model_name, "truth": splits["truth"]}
    # evaluate_run also reads the newest filter / caption folders: their names are settings hashes
    scored = {k: summary.get(k) for k in ("filter", "caption")}
    inputs = [final_model, *splits["test"], *([splits["truth"]] if splits["truth"] else [])]
    job = run.job("evaluate", inputs=inputs, settings={**cfg.evaluate.model_dump(exclude={"batch_size", "report"}), **scored},
                  params=params)  # fmt: skip
    start = time.perf_counter()
    summary["metrics"] = run.tasks["evaluate_task"](job=job, config=cfg)["metrics"]
    run.record({"stage": "evaluate", "seconds": round(time.perf_counter() - start, 2)})
    if cfg.evaluate.report:
        from tasks.report import report_task

        summary["report"] = report_task(str(run.root))


@flow(name="capfilt-bootstrap", validate_parameters=True)
def bootstrap(config: RunConfig) -> dict[str, Any]:
    """Run (or resume) the CapFilt bootstrap described by `config` in `config.run_dir`.

    Returns a summary: model folders, stage output folders, the report path and one
    row per stage. Holds the run folder's lock, so two runs never write one folder.
    """
    from data.run_lock import run_lock

    with run_lock(config.run_dir):
        return _bootstrap(_Run(config))


def _bootstrap(run: _Run) -> dict[str, Any]:
    cfg, log = run.config, get_run_logger()
    summary: dict[str, Any] = {"run_dir": str(run.root)}
    splits = ingest_stage(run)
    summary["ingest"] = {k: v for k, v in splits.items()}
    if not cfg.runs_stage("pretrain"):
        return _finish(run, summary)
    human, web = list(splits["human"] or []), list(splits["web"] or [])
    pretrained = cfg.model.pretrained
    if pretrained is None:
        pretrained = _submit_train(run, _train_job(run, "pretrain", "pretrain", "pretrain", human + web, None)).result()["model"]
    summary["pretrain"] = pretrained
    final_model = pretrained
    for round_index in range(1, cfg.rounds + 1):
        log.info("bootstrap round %d of %d", round_index, cfg.rounds)
        if not cfg.runs_stage("finetune"):
            break
        futures = {}
        for role, mode, given in (("filter", "finetune-filter", cfg.model.filter), ("captioner", "finetune-captioner", cfg.model.captioner)):
            if given is None or round_index > 1:
                job = _train_job(run, mode, mode, _model_name(round_index, role), human, pretrained, round_index)
                futures[role] = _submit_train(run, job)  # the two finetunes run concurrently
        models = {role: fut.result()["model"] for role, fut in futures.items()}
        filter_model = models.get("filter", cfg.model.filter)
        captioner = models.get("captioner", cfg.model.captioner)
        summary.update(filter=filter_model, captioner=captioner)
        if not cfg.runs_stage("caption"):
            break
        caption_dir = caption_stage(run, web, captioner)
        summary["caption"] = caption_dir
        if not cfg.runs_stage("filter"):
            break
        filter_dir = filter_stage(run, web, filter_model, caption_dir)
        summary["filter"] = filter_dir
        if not cfg.runs_stage("assemble"):
            break
        dataset = assemble_stage(run, human, filter_dir)
        summary["assemble"] = str(Path(dataset[0]).parent) if dataset else None
        if not cfg.runs_stage("final"):
            break
        final_job = _train_job(run, "final", "pretrain", _model_name(round_index, "final"), dataset, None, round_index)
        final_model = _submit_train(run, final_job).result()["model"]
        summary["final"] = pretrained = final_model
    if cfg.runs_stage("evaluate"):
        _evaluate_and_report(run, final_model, splits, summary)
    return _finish(run, summary)


def run_bootstrap(config: RunConfig) -> dict[str, Any]:
    """Run the flow in this process (Prefect's temporary server when no API is set)."""
    return bootstrap(config=config)
