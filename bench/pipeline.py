"""Input pipeline (issue 16): pipeline efficiency, and linear cost in shards and rows.

    PYTHONPATH=. python bench/pipeline.py --part efficiency --presets tiny,base
    PYTHONPATH=. python bench/pipeline.py --part linear
    PYTHONPATH=. python bench/pipeline.py --part loader --loader-shards 16 --loader-workers 2

Table 1, efficiency: the caption / filter stage end to end (`run_caption` / `run_filter`:
Parquet in, decode, model, decide, Parquet + records out) against the same model on the
same batches already decoded in memory (the stage's own plan and image stream, drained
first; then only the stage's model loop: `filter._score`, `caption._generate_batch`).
efficiency = model-only time / stage time, in CPU seconds of the process (best of
`--repeats` after a warm-up; `num_workers=0` keeps all the work in the process; one
torch thread by default, since on a shared CPU idle OpenMP threads spin and bill CPU
time that is not work). The rest is split into read + plan (Parquet,
tokenising, ordering), decode (the image stream, in-process here: `num_workers=0`, so
decoding does not overlap the model on this CPU) and write (decide, tables, atomic
files, fsyncs, records; the remainder). Photo-like 640x480 JPEGs (`data.synth_photo`),
distinct bytes per row, random-weight models: tiny (64 px) and base (ViT-B/16 + BERT-base
at 384 px).

Table 2, linear cost (tiny model): the same rows as 1 / 8 / 64 shards, then 4x / 16x the
rows at the 8-shard size (so 8 / 32 / 128 shards); each run in a fresh child process:
CPU and wall ms per row, peak resident memory of the child (ru_maxrss), and the
per-shard fixed costs: wall ms in the data writes + completion records, fsyncs, files.
A batch never spans two shards (each shard's outputs are those of its own batches), so
shards smaller than a batch pay in model efficiency, not in bookkeeping.

Table 3, loader: one `ImageStream` over a run's shards against one per shard (as
`filter_shard` gives each of the flow's per-shard tasks), tiny filter with workers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import blip_core  # noqa: E402
from blip_core.med import MED  # noqa: E402
from data.shards import shard_name, write_shard  # noqa: E402
from data.synth_photo import photo_jpeg  # noqa: E402
from tasks.caption import CaptionConfig, Captioner, _generate_batch, run_caption  # noqa: E402
from tasks.execution import ExecutionConfig, inference_context, progress_bar  # noqa: E402
from tasks.executor import PlanItem  # noqa: E402
from tasks.filter import FilterConfig, Judge, _score, run_filter  # noqa: E402

WORDS = "a an the red blue green small big dog cat square circle on in grass table two photo of man woman".split()
SCHEMA = pa.schema([("key", pa.string()), ("image_id", pa.string()), ("source", pa.string()), ("caption", pa.string()),
                    ("jpg", pa.binary()), ("status", pa.string()), ("width", pa.int32()), ("height", pa.int32())])  # fmt: skip


def make_model(preset: str, folder: Path | None = None) -> blip_core.LoadedModel:
    """A random MED (captions sharpened to end, as bench/stages.py does), saved when `folder`."""
    from stages import _peaky, _tokenizer

    tokenizer = _tokenizer(preset, np.random.default_rng(0))
    torch.manual_seed(0)
    model = MED(blip_core.preset(preset).with_tokenizer(tokenizer)).eval()
    _peaky(model)
    if folder is not None:
        return blip_core.load(blip_core.save(model, tokenizer, folder))
    return blip_core.LoadedModel(model, tokenizer, f"random-{preset}", "capfilt-med")


def make_shards(folder: Path, rows: int, per_shard: int, width: int, height: int, distinct: int = 32) -> list[Path]:
    """Web pair shards; `distinct` photo-like JPEGs cycled, each row's bytes made unique by a
    trailing counter after the JPEG's end (same pixels, so no row is deduplicated)."""
    rng = np.random.default_rng(1)
    images = [photo_jpeg(i, width, height) for i in range(min(rows, distinct))]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s, start in enumerate(range(0, rows, per_shard)):
        batch = []
        for i in range(start, min(rows, start + per_shard)):
            batch.append({"key": f"k{i:06d}", "image_id": f"k{i:06d}", "source": "web", "status": "ok",
                          "caption": " ".join(rng.choice(WORDS, int(rng.integers(4, 14)))),
                          "jpg": images[i % len(images)] + i.to_bytes(4, "little"), "width": width, "height": height})  # fmt: skip
        path = folder / shard_name(s)
        write_shard(pa.Table.from_pylist(batch, schema=SCHEMA), path, kind="pairs")
        paths.append(path)
    return paths


REPEATS = [1]  # timed calls per measurement (best of), set from --repeats
THREADS = [1]  # torch threads, set from --threads


def _timed(fn: Any) -> float:
    """Best CPU seconds of this process (all its threads) over REPEATS calls, after one
    untimed warm-up call. With num_workers=0 all the work is in this process; on a shared
    CPU, CPU time measures the work where the wall clock measures the neighbours."""
    fn()
    best = float("inf")
    for _ in range(REPEATS[0]):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return best


# ----------------------------------------------------------------------------- efficiency


def _drain(stage: Any, src: Path) -> tuple[Any, list[Any]]:
    """The stage's plan of `src` and its image batches, decoded into memory."""
    with stage.stream([lambda: stage.read(PlanItem(0, str(src), src.name))]) as stream:
        state, batches = stream.take(0)
        return state, list(batches)


def filter_efficiency(loaded: Any, shard: Path, execution: ExecutionConfig, tmp: Path) -> dict[str, float]:
    cfg = FilterConfig(execution=execution)
    judge = Judge.build(loaded, cfg)
    runs = iter(range(10))
    stage = lambda: run_filter([shard], tmp / f"filter-{next(runs)}", loaded, cfg)  # noqa: E731
    read = _timed(lambda: judge.read(PlanItem(0, str(shard), shard.name)))
    decode = _timed(lambda: _drain(judge, shard))
    state, batches = _drain(judge, shard)
    bar = progress_bar(0, "", False)
    model = lambda: _score(loaded.model, state.plan, iter(batches), cfg, judge.device, judge.precision, bar)  # noqa: E731
    return {"model": _timed(model), "stage": _timed(stage), "read": read, "decode": decode - read}


def caption_efficiency(loaded: Any, shard: Path, execution: ExecutionConfig, tmp: Path) -> dict[str, float]:
    cfg = CaptionConfig(execution=execution)
    captioner = Captioner.build(loaded, cfg)
    runs = iter(range(10))
    stage = lambda: run_caption([shard], tmp / f"caption-{next(runs)}", loaded, cfg)  # noqa: E731
    read = _timed(lambda: captioner.read(PlanItem(0, str(shard), shard.name)))
    decode = _timed(lambda: _drain(captioner, shard))
    state, batches = _drain(captioner, shard)
    keys = state.web.column("key").to_pylist()

    def model() -> None:
        with inference_context(captioner.device, captioner.precision):
            for rows, (pixels, _) in zip(state.batches, batches):
                _generate_batch(loaded, pixels, [keys[r] for r in rows], captioner.prompt_ids, cfg)

    return {"model": _timed(model), "stage": _timed(stage), "read": read, "decode": decode - read}


def efficiency(args: argparse.Namespace, tmp: Path) -> None:
    print(f"\npipeline efficiency on CPU ({torch.get_num_threads()} torch threads, num_workers 0, 640x480 JPEGs, "
          f"decode reduced; CPU seconds, best of {REPEATS[0]} after a warm-up)\n")  # fmt: skip
    print("| model | stage | images | batch | stage img/s | model-only img/s | efficiency | read+plan | decode | model | write+records |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for preset in args.presets.split(","):
        n = args.base_images if preset == "base" else args.tiny_images
        batch = args.base_batch if preset == "base" else args.tiny_batch
        loaded = make_model(preset)
        shard = make_shards(tmp / f"web-{preset}", n, n, 640, 480)[0]
        execution = ExecutionConfig(batch_size=batch, num_workers=0, progress=False)
        for name, fn in (("filter", filter_efficiency), ("caption", caption_efficiency)):
            t = fn(loaded, shard, execution, tmp)
            write = max(0.0, t["stage"] - t["read"] - t["decode"] - t["model"])
            share = lambda x: f"{100 * x / t['stage']:.1f} %"  # noqa: E731
            print(f"| {preset} | {name} | {n} | {batch} | {n / t['stage']:.1f} | {n / t['model']:.1f} | "
                  f"**{100 * t['model'] / t['stage']:.1f} %** | {share(t['read'])} | {share(t['decode'])} | "
                  f"{share(t['model'])} | {share(write)} |", flush=True)  # fmt: skip


# ----------------------------------------------------------------------------- linear cost


def child(stage: str, model_dir: Path, web: Path, out: Path) -> None:
    """One stage run in this process; prints seconds, fsyncs and files written as JSON."""
    fsyncs = [0]
    real_fsync = os.fsync

    def counting(fd: int) -> None:
        fsyncs[0] += 1
        real_fsync(fd)

    os.fsync = counting
    import tasks.lifecycle as lifecycle

    writing = [0.0]  # wall seconds in the lifecycle's data writes and completion records

    def timed(fn: Any) -> Any:
        def call(*a: Any, **k: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                writing[0] += time.perf_counter() - start

        return call

    lifecycle.write_shard, lifecycle.write_completion = timed(lifecycle.write_shard), timed(lifecycle.write_completion)
    loaded = blip_core.load(model_dir)
    execution = ExecutionConfig(batch_size=32, num_workers=0, progress=False)
    start, cpu = time.perf_counter(), time.process_time()
    if stage == "caption":
        stats = run_caption([web], out, loaded, CaptionConfig(strategy="greedy", max_length=12, execution=execution))
    else:
        stats = run_filter([web], out, loaded, FilterConfig(execution=execution))
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    files = sum(1 for p in out.rglob("*") if p.is_file())
    print(json.dumps({"seconds": seconds, "cpu": cpu, "rows": stats.totals["input"], "shards": len(stats.shards),
                      "fsyncs": fsyncs[0], "files": files, "writing": writing[0]}))  # fmt: skip


def _run_child(stage: str, model_dir: Path, web: Path, out: Path) -> dict[str, Any]:
    proc = subprocess.Popen([sys.executable, __file__, "--threads", str(THREADS[0]), "--child", stage, str(model_dir), str(web), str(out)],
                            stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    _, status, usage = os.wait4(proc.pid, 0)
    output = proc.stdout.read().decode() if proc.stdout else ""
    if status != 0:
        raise RuntimeError(f"child {stage} {web} failed with status {status}")
    return {**json.loads(output.strip().splitlines()[-1]), "peak_mib": usage.ru_maxrss / 1024}


def linear(args: argparse.Namespace, tmp: Path) -> None:
    n = args.linear_rows
    model_dir = tmp / "tiny-model"
    make_model("tiny", model_dir)
    configs = [(f"{n} rows, 1 shard", n, n), (f"{n} rows, 8 shards", n, n // 8), (f"{n} rows, 64 shards", n, n // 64),
               (f"4x: {4 * n} rows, {4 * 8} shards", 4 * n, n // 8),
               (f"16x: {16 * n} rows, {16 * 8} shards", 16 * n, n // 8)]  # fmt: skip
    print(f"\nlinear cost (tiny model, 64x64 JPEGs, batch 32, num_workers 0, {THREADS[0]} torch thread(s); caption greedy "
          "max 12 tokens; each run a fresh process)\n")  # fmt: skip
    print("| stage | input | CPU ms per row | vs first row | wall ms per row | peak MiB | write+records ms per shard | fsyncs per shard | files per shard |")
    print("|---|---|---|---|---|---|---|---|---|")
    for stage in ("caption", "filter"):
        first = None
        for label, rows, per_shard in configs:
            web = tmp / f"web-{rows}-{per_shard}"
            if not web.exists():
                make_shards(web, rows, per_shard, 64, 64, distinct=64)
            r = _run_child(stage, model_dir, web, tmp / f"out-{stage}-{rows}-{per_shard}")
            per_row = 1000 * r["cpu"] / r["rows"]
            first = first or per_row
            print(f"| {stage} | {label} | {per_row:.2f} | {per_row / first:.2f}x | {1000 * r['seconds'] / r['rows']:.2f} | "
                  f"{r['peak_mib']:.0f} | {1000 * r['writing'] / r['shards']:.1f} | {r['fsyncs'] / r['shards']:.1f} | "
                  f"{r['files'] / r['shards']:.1f} |", flush=True)  # fmt: skip


def loader(args: argparse.Namespace, tmp: Path) -> None:
    """One loader per stage run (`run_filter`) vs a loader per shard (`filter_shard` per
    shard, as the flow's per-shard tasks do), with decoding workers: wall seconds."""
    from tasks.filter import filter_shard

    loaded = make_model("tiny")
    shards = make_shards(tmp / "web-loader", args.loader_shards * 32, 32, 640, 480)
    execution = ExecutionConfig(batch_size=32, num_workers=args.loader_workers, progress=False)
    cfg = FilterConfig(execution=execution)
    start = time.perf_counter()
    stats = run_filter(shards, tmp / "loader-one", loaded, cfg)
    one = time.perf_counter() - start
    start = time.perf_counter()
    for src in shards:
        filter_shard(src, None, tmp / "loader-per" / stats.settings_hash, loaded, cfg, stats.settings_hash)
    per = time.perf_counter() - start
    print(f"\none loader vs a loader per shard (tiny filter, {len(shards)} shards x 32 rows of 640x480 JPEGs, "
          f"{args.loader_workers} decoding workers, wall seconds)\n")  # fmt: skip
    print("| loader | seconds | per shard | ratio |")
    print("|---|---|---|---|")
    print(f"| one per stage run | {one:.2f} | {one / len(shards):.3f} | 1.00x |")
    print(f"| one per shard | {per:.2f} | {per / len(shards):.3f} | {per / one:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("efficiency", "linear", "loader", "all"), default="all")
    parser.add_argument("--loader-shards", type=int, default=16)
    parser.add_argument("--loader-workers", type=int, default=2)
    parser.add_argument("--presets", default="tiny,base")
    parser.add_argument("--tiny-images", type=int, default=512)
    parser.add_argument("--base-images", type=int, default=32)
    parser.add_argument("--tiny-batch", type=int, default=64)
    parser.add_argument("--base-batch", type=int, default=8)
    parser.add_argument("--linear-rows", type=int, default=256, help="1x rows (a multiple of 64)")
    parser.add_argument("--repeats", type=int, default=3, help="efficiency: timed calls per measurement (best of)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, also in the linear-cost children (0 = torch's default)")
    parser.add_argument("--child", nargs=4, metavar=("STAGE", "MODEL", "WEB", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    REPEATS[0], THREADS[0] = args.repeats, args.threads
    if args.child:
        stage, model_dir, web, out = args.child
        child(stage, Path(model_dir), Path(web), Path(out))
        return
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        if args.part in ("efficiency", "all"):
            efficiency(args, tmp)
        if args.part in ("linear", "all"):
            linear(args, tmp)
        if args.part in ("loader", "all"):
            loader(args, tmp)
    print("\nThe machine is shared with other jobs: absolute rates move between runs; the ratios come from one run.")


if __name__ == "__main__":
    main()
