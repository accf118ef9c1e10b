"""Where shard tasks run, and how GPU stages share GPUs.

The task runner is one setting (`RunnerConfig.kind`): threads in the flow process by
default, or Dask through prefect-dask: a `LocalCluster` of worker processes, or the
scheduler at `dask_address`. GPU work is bounded two ways: Dask resources (each GPU
task claims `gpus_per_task` of the `GPU` resource the workers advertise) and, for any
runner, a Prefect global concurrency limit named by `gpu_concurrency`, so two stages
(or two runs) never fight over one GPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from flows.config import RunConfig, RunnerConfig


def build_task_runner(cfg: RunnerConfig) -> TaskRunner:
    """A fresh task runner for `cfg` (a runner is entered once per flow run)."""
    if cfg.kind == "threads":
        return ThreadPoolTaskRunner(max_workers=cfg.max_workers)
    from prefect_dask import DaskTaskRunner  # imported only when asked for

    if cfg.dask_address:
        return DaskTaskRunner(address=cfg.dask_address)
    cluster_kwargs: dict[str, Any] = {
        "n_workers": cfg.dask_workers,
        "threads_per_worker": cfg.dask_threads_per_worker,
        "processes": True,
        "dashboard_address": None,  # no web server on a shared machine
    }
    if cfg.gpus_per_task:
        # Each worker advertises one GPU; a task annotated with GPU=1 takes it whole.
        cluster_kwargs["resources"] = {"GPU": 1}
    return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs=cluster_kwargs)


def uses_gpu(config: RunConfig) -> bool:
    """True when model stages run on a CUDA device."""
    return config.device.startswith("cuda")


@contextlib.contextmanager
def gpu_annotation(config: RunConfig) -> Iterator[None]:
    """Around `.submit`/`.map` of a GPU task: claim Dask GPU resources when configured."""
    if config.runner.kind == "dask" and config.runner.gpus_per_task and uses_gpu(config):
        import dask

        with dask.annotate(resources={"GPU": config.runner.gpus_per_task}):
            yield
    else:
        yield


@contextlib.contextmanager
def gpu_slot(config: RunConfig) -> Iterator[None]:
    """Inside a GPU task: hold one slot of the Prefect global concurrency limit, if named.

    Create the limit once (`prefect gcl create capfilt-gpu --limit 1`); without a server
    limit of that name Prefect lets the task through.
    """
    if config.runner.gpu_concurrency and uses_gpu(config):
        from prefect.concurrency.sync import concurrency

        with concurrency(config.runner.gpu_concurrency, occupy=1):
            yield
    else:
        yield
