"""Prefect overhead of the bootstrap's shard tasks, and a flow over 1,000 small shards.

Each shard task here does what a real shard task does around its work: compute the
cache key from the input's fingerprint (`flows.caching.step_cache_key`), copy one small
pairs shard with `write_shard` + a completion record, record its outputs, and persist
its JSON result under the run folder. The same copies run in a plain Python loop, so

    overhead per task = (flow wall time - plain loop time) / shards.

A rerun of the same flow finds every result in the cache (the resume path). Each
configuration runs in a fresh process (its own Prefect temporary server), and the flow
process's resident memory is sampled, to show it stays bounded as shards grow.

    .venv/bin/python bench/orchestration.py                # 100 and 1000 shards
    .venv/bin/python bench/orchestration.py --shards 200   # one size
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flows.caching import StepJob  # noqa: E402

ROWS_PER_SHARD = 8
MEMORY_SAMPLE_S = 0.05


def _make_inputs(folder: Path, shards: int) -> list[Path]:
    import pyarrow as pa

    from data.shards import shard_name, write_shard

    paths = []
    for i in range(shards):
        keys = [f"s{i}-r{j}" for j in range(ROWS_PER_SHARD)]
        table = pa.table({"key": keys, "image_id": keys, "source": ["web"] * ROWS_PER_SHARD,
                          "caption": ["a red circle"] * ROWS_PER_SHARD, "status": ["ok"] * ROWS_PER_SHARD})  # fmt: skip
        path = folder / shard_name(i)
        write_shard(table, path, kind="pairs")
        paths.append(path)
    return paths


def copy_shard(src: Path, dst: Path) -> int:
    """The unit of work: read a shard, write it under its output name, then its record."""
    from data.shards import CompletionRecord, file_fingerprint, read_table, write_completion, write_shard

    table = read_table(src, "pairs")
    write_shard(table, dst, kind="pairs")
    record = CompletionRecord(shard=dst.name, kind="pairs", counts={"input": table.num_rows},
                              input_fingerprint=file_fingerprint(src), settings_hash="bench")  # fmt: skip
    write_completion(dst, record)
    return table.num_rows


class _PeakRss:
    """Samples this process's resident memory in a thread; `.peak` in MiB."""

    def __init__(self) -> None:
        import psutil

        self.proc = psutil.Process()
        self.peak = self.now()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def now(self) -> float:
        return self.proc.memory_info().rss / 2**20

    def _run(self) -> None:
        while not self._stop.wait(MEMORY_SAMPLE_S):
            self.peak = max(self.peak, self.now())

    def __enter__(self) -> _PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _measure(shards: int, workers: int) -> dict:
    """Run inside a fresh process: plain loop, flow (cold), flow (cached)."""
    from prefect import flow, task, unmapped

    from flows.caching import record_outputs, result_storage, step_cache_key

    root = Path(tempfile.mkdtemp(prefix="capfilt-bench-"))
    inputs = _make_inputs(root / "in", shards)
    start = time.perf_counter()
    for src in inputs:
        copy_shard(src, root / "plain" / src.name)
    plain_s = time.perf_counter() - start

    @task(cache_key_fn=step_cache_key, persist_result=True, result_serializer="json", task_run_name="{job.label}")
    def shard_task(job: StepJob, out_dir: str) -> dict:
        dst = Path(out_dir) / Path(job.inputs[0]).name
        rows = copy_shard(Path(job.inputs[0]), dst)
        record_outputs(job, [str(dst)])
        return {"shard": dst.name, "counts": {"input": rows}}

    @flow(name="capfilt-bench-shards", validate_parameters=False)
    def shard_flow(jobs: list[StepJob], out_dir: str) -> int:
        bound = shard_task.with_options(result_storage=result_storage(root / "run"))
        futures = bound.map(job=jobs, out_dir=unmapped(out_dir))
        return sum(f.result()["counts"]["input"] for f in futures)

    jobs = [StepJob(step="copy", index=i, run_dir=str(root / "run"), inputs=[str(p)], settings={"v": 1})
            for i, p in enumerate(inputs)]  # fmt: skip
    from prefect.task_runners import ThreadPoolTaskRunner

    runner_flow = shard_flow.with_options(task_runner=ThreadPoolTaskRunner(max_workers=workers))
    runner_flow(jobs=jobs[:2], out_dir=str(root / "warmup"))  # starts the temporary server
    timings = {}
    with _PeakRss() as rss:
        base = rss.now()
        for name in ("cold", "cached"):
            start = time.perf_counter()
            rows = runner_flow(jobs=jobs, out_dir=str(root / "flow"))
            timings[name] = time.perf_counter() - start
            assert rows == shards * ROWS_PER_SHARD
    return {
        "shards": shards, "workers": workers, "plain_s": plain_s, "flow_s": timings["cold"],
        "cached_s": timings["cached"], "overhead_ms": 1000 * (timings["cold"] - plain_s) / shards,
        "cached_ms": 1000 * timings["cached"] / shards, "rss_base_mib": base, "rss_peak_mib": rss.peak,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, nargs="*", default=[100, 1000])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_measure(args.shards[0], args.workers)))
        return
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "WARNING",
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}  # fmt: skip
    rows = []
    for shards in args.shards:
        done = subprocess.run([sys.executable, __file__, "--child", "--shards", str(shards), "--workers", str(args.workers)],
                              env=env, capture_output=True, text=True, check=True)  # fmt: skip
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print("| shards | plain loop s | flow s (cold) | overhead ms/task | flow s (all cached) | cached ms/task | flow RSS before -> peak MiB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shards']} | {r['plain_s']:.2f} | {r['flow_s']:.1f} | {r['overhead_ms']:.1f} | {r['cached_s']:.1f} | "
              f"{r['cached_ms']:.1f} | {r['rss_base_mib']:.0f} -> {r['rss_peak_mib']:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
