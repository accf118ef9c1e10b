"""Caption + filter + assemble over an S3 run folder on a Dask `LocalCluster` of two worker
processes, each with its own temporary folder (no disk shared with the test or each other):
inputs, model and outputs live on S3 only, and the shards equal a local run's byte for byte."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from test_stages_s3 import EXEC, _run_stages, _s3_inputs, _shard_bytes

from data.layout import RunLayout
from tasks.assemble import AssembleConfig, run_assemble
from tasks.caption import CaptionConfig, plan_caption
from tasks.executor import WorkerSpec, write_plan
from tasks.shard_stages import run_stage_worker
from tasks.filter import FilterConfig, plan_filter

pytestmark = pytest.mark.slow


def _private_tmp(base: str, threads: int) -> str:
    """Run on a worker: give it its own temporary folder (model cache and uploads go there),
    and the test process's torch thread count (Dask starts workers with one; a different
    reduction order would change ITM scores in the last bits, which is not what is tested)."""
    import torch

    torch.set_num_threads(threads)
    folder = Path(base) / f"worker-{os.getpid()}"
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["TMPDIR"] = str(folder)
    os.environ.pop("CAPFILT_MODEL_CACHE", None)
    tempfile.tempdir = str(folder)
    return str(folder)


@pytest.fixture(scope="module")
def local_world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from stage_helpers import tiny_model, web_shards

    base = tmp_path_factory.mktemp("dask-s3-world")
    web_shards(base / "web", (5, 4, 3, 4), failed=(1,), garbage=(2,))
    return {"web": base / "web", "model": tiny_model(base / "model")}


def test_dask_workers_run_the_stages_over_s3_like_a_local_run(s3: str, local_world, tmp_path: Path) -> None:
    from distributed import Client, LocalCluster

    local = _run_stages(tmp_path / "local-run", local_world["web"], local_world["model"], tmp_path)
    web, model = _s3_inputs(s3, local_world)
    layout = RunLayout(f"{s3}/run")
    cfg_c, cfg_f = CaptionConfig(execution=EXEC), FilterConfig(execution=EXEC)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, Client(cluster) as client:
        import torch

        folders = client.run(_private_tmp, str(tmp_path / "workers"), torch.get_num_threads())  # address -> its own tmp
        workers = sorted(folders)
        assert len(workers) == 2 and len(set(folders.values())) == 2

        def spread(fn, *args, index: int):
            return client.submit(fn, *args, workers=[workers[index % 2]], pure=False)

        def stage(name: str, stats, items, cfg) -> list:  # one executor worker per Dask worker, each on its own half
            plan = str(write_plan(stats.output, items))
            specs = [WorkerSpec(name, plan, str(stats.output), stats.settings_hash, str(model), cfg, rank, 2) for rank in range(2)]
            return client.gather([spread(run_stage_worker, spec, index=spec.rank) for spec in specs])

        stats, plan = plan_caption([web], layout.stage("caption"), str(model), cfg_c)
        done = stage("caption", stats, plan, cfg_c)
        assert sum(r.shards for r in done) == len(plan) and sum(r.skipped for r in done) == 0 and all(r.shards for r in done)
        caption_dir = stats.output
        fstats, items = plan_filter([web], layout.stage("filter"), str(model), cfg_f, caption_dir)
        assert sum(r.shards for r in stage("filter", fstats, items, cfg_f)) == len(items)
        assembled = spread(run_assemble, [fstats.output / "kept"], layout.stage("assemble"),
                           AssembleConfig(rows_per_shard=4, execution=EXEC), index=1).result()  # fmt: skip
    for stage, folder in (("caption", caption_dir), ("filter", fstats.output), ("assemble", assembled.output)):
        assert _shard_bytes(folder) == _shard_bytes(local[stage].output) and _shard_bytes(folder), stage
    # each worker staged the model from S3 into its own folder: nothing came over a shared disk
    for folder in folders.values():
        assert any((Path(folder) / "capfilt-models").iterdir()), folder
