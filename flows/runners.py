"""Where shard tasks run, and how GPU stages share GPUs.

The task runner is one setting (`RunnerConfig.kind`): threads in the flow process by
default, or Dask through prefect-dask. A flow run uses ONE Dask cluster for all its
shard stages (`ShardCluster`): the scheduler at `dask_address` (a `dask-scheduler`,
dask-jobqueue or Kubernetes cluster the user runs, left running afterwards), or a
`LocalCluster` of worker processes started in the background when the flow begins and
closed when it ends, also on an error. Each stage's `DaskTaskRunner` connects to that
address.

Workers report their task runs to the flow's own Prefect API: the flow hands its API URL
to the workers (their environment for a LocalCluster, the serialized settings of every
task for any cluster), so no worker starts a temporary Prefect server of its own.

GPU work is bounded two ways: Dask resources (each GPU task claims `gpus_per_task` of
the `GPU` resource the workers advertise) and, for any runner, a Prefect global
concurrency limit named by `gpu_concurrency`, so two stages (or two runs) never fight
over one GPU.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
from collections.abc import Iterator
from typing import Any

from prefect.logging import get_logger
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from flows.config import RunConfig, RunnerConfig

logger = get_logger("capfilt.runners")


def build_task_runner(cfg: RunnerConfig, address: str | None = None) -> TaskRunner:
    """A fresh task runner for `cfg` (a runner is entered once per stage sub-flow run).

    Dask: connects to `address` (the run's `ShardCluster`), else to `cfg.dask_address`;
    with neither, prefect-dask starts a LocalCluster of its own for this one stage.
    """
    if cfg.kind == "threads":
        return ThreadPoolTaskRunner(max_workers=cfg.max_workers)
    from prefect_dask import DaskTaskRunner  # imported only when asked for

    address = address or cfg.dask_address
    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs=local_cluster_kwargs(cfg))


def local_cluster_kwargs(cfg: RunnerConfig, api_url: str | None = None) -> dict[str, Any]:
    """`distributed.LocalCluster` arguments for `cfg`: worker processes, the dashboard on a free port, and
    `PREFECT_API_URL` in the workers' environment when the flow's API is known."""
    kwargs: dict[str, Any] = {
        "n_workers": cfg.dask_workers,
        "threads_per_worker": cfg.dask_threads_per_worker,
        "processes": True,
        # a free port: `None` still serves the scheduler's HTTP routes on 8787, which two runs on one
        # machine would both want
        "dashboard_address": ":0",
    }
    if cfg.gpus_per_task:
        # Each worker advertises one GPU; a task annotated with GPU=1 takes it whole.
        kwargs["resources"] = {"GPU": 1}
    if api_url:
        kwargs["env"] = {"PREFECT_API_URL": api_url}  # the Nanny starts its worker with it
    return kwargs


def flow_api_url() -> str | None:
    """The Prefect API this flow run reports to (its temporary server's URL when no
    `PREFECT_API_URL` is set); None outside a flow run."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    if ctx is None or ctx.client is None:
        return None
    return str(ctx.client.api_url).rstrip("/")


class ShardCluster:
    """The one Dask cluster of a flow run, shared by all its shard stages.

    `address()` gives the scheduler address: `cfg.dask_address` as is, or the run's
    LocalCluster. `start()` begins starting that LocalCluster in a background thread, so
    its worker processes start and import the stage modules (torch, transformers:
    seconds each) while the flow's earlier stages run; `address()` waits for it (or
    starts it, when nobody called `start()`). `close()` closes only a cluster this object
    started; an external cluster is the user's and stays up. `api_settings()` is the
    context every stage sub-flow runs in, so the tasks it sends to workers carry the
    flow's API URL.
    """

    def __init__(self, cfg: RunnerConfig, api_url: str | None) -> None:
        self.cfg = cfg
        self.api_url = api_url
        self.cluster: Any = None  # a distributed.LocalCluster once started
        self._starting: concurrent.futures.Future[Any] | None = None

    def start(self) -> None:
        """Start the run's LocalCluster in the background (nothing for `dask_address`)."""
        if self.cfg.dask_address or self._starting is not None:
            return
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="capfilt-dask-start")
        self._starting = pool.submit(self._start_local)
        pool.shutdown(wait=False)

    def _start_local(self) -> Any:
        import distributed

        kwargs = {**local_cluster_kwargs(self.cfg, self.api_url), "preload": [WORKER_PRELOAD]}
        cluster = distributed.LocalCluster(**kwargs)
        logger.info("Dask LocalCluster for this run: scheduler %s, %d workers", cluster.scheduler_address,
                    self.cfg.dask_workers)  # fmt: skip
        return cluster

    def address(self) -> str:
        if self.cfg.dask_address:
            return self.cfg.dask_address
        if self.cluster is None:
            self.start()
            assert self._starting is not None
            self.cluster = self._starting.result()  # re-raises a failed start
        return str(self.cluster.scheduler_address)

    @contextlib.contextmanager
    def api_settings(self) -> Iterator[None]:
        """Within the block, Prefect settings name the flow's API explicitly: the context
        prefect-dask serializes with each task then points its worker at this API."""
        from prefect.settings import PREFECT_API_URL, temporary_settings

        if self.api_url and not PREFECT_API_URL.value():
            with temporary_settings(updates={PREFECT_API_URL: self.api_url}):
                yield
        else:
            yield

    def close(self) -> None:
        """Close the LocalCluster this run started: every worker's heartbeat is stopped
        first (closing a worker mid-heartbeat logs a CommClosedError traceback), then each
        worker process is asked to stop and given `WORKER_EXIT_S` to exit (a worker that imported torch takes seconds to
        shut its interpreter down on a busy machine; the Nanny's own 4 s wait would kill it
        and log a warning), then the scheduler closes. An external cluster is untouched."""
        cluster, self.cluster = self.cluster, None
        if cluster is None and self._starting is not None and self._starting.exception() is None:
            cluster = self._starting.result()  # started in the background, never used
        self._starting = None
        if cluster is None:
            return
        nannies = list(cluster.workers.values())
        _stop_heartbeats(cluster.scheduler_address)

        async def stop_workers() -> None:
            await asyncio.gather(*(nanny.close(timeout=WORKER_EXIT_S) for nanny in nannies))

        cluster.sync(stop_workers)
        cluster.close(timeout=WORKER_EXIT_S)


async def _quiet_worker(dask_worker: Any) -> None:
    """On a worker: stop its heartbeat and let one in flight finish (closing a worker
    mid-heartbeat logs a CommClosedError traceback, a race inside distributed)."""
    dask_worker.periodic_callbacks["heartbeat"].stop()
    await asyncio.sleep(HEARTBEAT_SETTLE_S)


def _stop_heartbeats(address: str) -> None:
    """Quiet every worker of the cluster at `address` before it is closed."""
    import distributed

    with distributed.Client(address, set_as_default=False, timeout=WORKER_EXIT_S) as client:
        client.run(_quiet_worker)


WORKER_EXIT_S = 60
HEARTBEAT_SETTLE_S = 0.5  # a heartbeat is one small round trip to the scheduler
WORKER_PRELOAD = "flows.worker_preload"  # imported by each LocalCluster worker as it starts


def _is_loopback(url: str) -> bool:
    """True when `url` (http://... or tcp://...) names this machine's loopback."""
    from urllib.parse import urlsplit

    return (urlsplit(url).hostname or "") in {"127.0.0.1", "localhost", "::1"}


@contextlib.contextmanager
def shard_cluster(cfg: RunnerConfig, start_now: bool = False) -> Iterator[ShardCluster | None]:
    """Around a flow run: its `ShardCluster` (None on threads), started in the background
    at once with `start_now` (the run reaches a shard stage), closed when the block ends,
    by return, error or KeyboardInterrupt alike."""
    if cfg.kind != "dask":
        yield None
        return
    cluster = ShardCluster(cfg, flow_api_url())
    if cfg.dask_address and cluster.api_url and _is_loopback(cluster.api_url) and not _is_loopback(cfg.dask_address):
        logger.warning("Prefect API %s is on this machine only; workers of %s on other machines cannot report their "
                       "task runs: start `prefect server start --host 0.0.0.0` and set PREFECT_API_URL to its "
                       "address", cluster.api_url, cfg.dask_address)  # fmt: skip
    try:
        if start_now:
            cluster.start()
        yield cluster
    finally:
        cluster.close()


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
