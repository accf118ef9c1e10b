"""Where shard stages run: a few long-lived workers, in the flow process or on Dask.

A caption or filter stage is one Prefect task (`flows.steps.shard_stage_task`) that runs
`world` workers (`tasks.executor.run_worker`), each loading the stage's model once and
streaming its share of the stage's plan file through one image loader; what Prefect
tracks grows with stages, never with shards. The runner is one setting
(`RunnerConfig.kind`):

- ``threads``: `max_workers` worker threads in the flow process (1 by default: one
  model using the process's cores, as the stage commands do);
- ``dask``: one worker per thread of the run's ONE Dask cluster (`ShardCluster`): the
  scheduler at `dask_address` (a cluster the user runs, left running), or a
  `LocalCluster` started in the background when the flow begins and closed when it ends,
  also on an error. A worker that dies takes its share with it; the scheduler runs that
  share again on another worker, which skips the shards already complete (their
  records), so nothing is lost or written twice.

Workers report shards done as Dask events (threads: a callback), so the stage's bar and
Prefect progress artifact count shards on any runner. GPU work is bounded by Dask
resources (each worker claims `gpus_per_task` of the `GPU` resource the workers
advertise) and, for any runner, a Prefect global concurrency limit named by
`gpu_concurrency`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import uuid
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

from prefect.logging import get_logger

from flows.config import RunConfig, RunnerConfig
from flows.faults import maybe_fault
from tasks.executor import WorkerResult, WorkerSpec
from tasks.shard_stages import run_stage_worker

logger = get_logger("capfilt.runners")


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
    started; an external cluster is the user's and stays up.
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
        import dask
        import distributed

        # non-daemonic worker processes may start the image loader's decoding processes; set
        # for this process, so a worker the nanny restarts after a crash gets it too
        dask.config.set({"distributed.worker.daemon": False})

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


# ----------------------------------------------------------------------------- stage workers

Notify = Callable[[int], None]  # called with each shard's plan index as it is done


def stage_worker(spec: WorkerSpec, config: RunConfig, notify: Notify | None = None, slot: int | None = None) -> WorkerResult:
    """One worker of a shard stage, wherever it runs: the run's storage options in this
    process, its own GPU when the machine has several (`slot`: the rank, or the Dask
    worker's number), the GPU slot, fault injection per shard (`CAPFILT_FAULT=filter:2`)."""
    config.apply_storage()
    spec = _on_own_gpu(spec, spec.rank if slot is None else slot)
    with gpu_slot(config):
        return run_stage_worker(spec, before=partial(maybe_fault, spec.stage), on_done=notify)


def pin_device(device: str, slot: int, count: int) -> str:
    """``cuda`` on a machine of `count` GPUs: the `slot`-th one (``cuda:{slot % count}``), so
    the workers of one machine spread over its GPUs; any other device as it is."""
    return f"cuda:{slot % count}" if device == "cuda" and count > 1 else device


def _on_own_gpu(spec: WorkerSpec, slot: int) -> WorkerSpec:
    device = spec.config.execution.device
    if device != "cuda":
        return spec
    import torch

    pinned = pin_device(device, slot, torch.cuda.device_count())
    execution = dataclasses.replace(spec.config.execution, device=pinned)
    return dataclasses.replace(spec, config=dataclasses.replace(spec.config, execution=execution))


Shares = Callable[[int], list[WorkerSpec]]  # worker slots -> one spec per worker (rank of world)


def run_on_threads(shares: Shares, config: RunConfig, notify: Notify) -> list[WorkerResult | BaseException]:
    """`runner.max_workers` workers in threads of the flow process; a worker's exception is its result."""
    specs = shares(config.runner.max_workers)
    if len(specs) == 1:
        return [_outcome(partial(stage_worker, specs[0], config, notify))]
    with concurrent.futures.ThreadPoolExecutor(len(specs), thread_name_prefix="capfilt-stage") as pool:
        futures = [pool.submit(_outcome, partial(stage_worker, spec, config, notify)) for spec in specs]
        return [future.result() for future in futures]


def _outcome(call: Callable[[], WorkerResult]) -> WorkerResult | BaseException:
    try:
        return call()
    except Exception as exc:  # noqa: BLE001 - the stage raises it after the other workers finish
        return exc


def run_on_dask(address: str, shares: Shares, config: RunConfig, notify: Notify) -> list[WorkerResult | BaseException]:
    """One worker per thread of the cluster at `address`, each one task (one connection for
    the count and the tasks); workers send each shard done as an event. A task whose worker
    dies is run again elsewhere by the scheduler."""
    import distributed

    topic = f"capfilt-shards-{uuid.uuid4().hex}"
    resources = {"GPU": config.runner.gpus_per_task} if config.runner.gpus_per_task and uses_gpu(config) else None

    def on_event(event: tuple[float, dict[str, Any]]) -> None:  # (timestamp, message)
        notify(int(event[1]["index"]))

    with distributed.Client(address, set_as_default=False, timeout=WORKER_EXIT_S) as client:
        client.subscribe_topic(topic, on_event)
        specs = shares(max(1, sum(client.nthreads().values())))
        futures = [client.submit(_dask_stage_worker, spec, config, topic, key=f"{spec.stage}-worker-{spec.rank}-{topic}",
                                 resources=resources, pure=False) for spec in specs]  # fmt: skip
        outcomes = [_outcome(future.result) for future in futures]  # each waits; all run at once
        client.unsubscribe_topic(topic)
    return outcomes


def _dask_stage_worker(spec: WorkerSpec, config: RunConfig, topic: str) -> WorkerResult:
    """On a Dask worker: run the spec, logging each shard done to the flow's `topic`."""
    from distributed import get_worker

    worker = get_worker()
    notify = lambda index: worker.log_event(topic, {"index": index})  # noqa: E731
    slot = worker.name if isinstance(worker.name, int) else 0  # a LocalCluster numbers its workers 0, 1, ...
    result = stage_worker(_in_process_loader(spec), config, notify, slot)
    result.worker = str(worker.address)
    return result


def _in_process_loader(spec: WorkerSpec) -> WorkerSpec:
    """A daemonic worker process (an external cluster's nanny default) may not start the
    loader's decoding processes: decode in the worker's own process instead, and say how
    to get them (the run's LocalCluster starts non-daemonic workers)."""
    import multiprocessing

    if not multiprocessing.current_process().daemon or spec.config.execution.num_workers == 0:
        return spec
    logger.warning("this Dask worker is a daemonic process, so images are decoded in it, without loader processes; "
                   "start workers with DASK_DISTRIBUTED__WORKER__DAEMON=False to decode in parallel")  # fmt: skip
    execution = dataclasses.replace(spec.config.execution, num_workers=0)
    return dataclasses.replace(spec, config=dataclasses.replace(spec.config, execution=execution))
