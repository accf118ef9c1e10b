"""A new threshold afterwards vs the filter stage, on a run folder (e.g. the quick demo's).

Times, in one process, best of `--repeats`: `run_filter` at `--threshold` over the run's
web and caption shards (model loaded once, outside the timing) and `run_assemble` with
`threshold` over human + the current filter folder's kept and rejected shards (no model),
each into a fresh temporary folder so nothing is skipped. Prints one JSON line.

    PYTHONPATH=. .venv/bin/python bench/rethreshold.py RUN --threshold 0.3
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import blip_core
from data.layout import RunLayout
from tasks.assemble import AssembleConfig, run_assemble
from tasks.execution import ExecutionConfig
from tasks.filter import FilterConfig, run_filter


def _best(repeats: int, work) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            result = work(Path(out))
            best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--threshold", type=float, default=0.3)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    layout = RunLayout(args.run)
    filter_dir, caption_dir = layout.current_stage("filter"), layout.current_stage("caption")
    model = blip_core.load(layout.resolve(layout.read_current()["model/filter"]))
    execution = ExecutionConfig(progress=False, num_workers=0)
    fcfg = FilterConfig(threshold=args.threshold, execution=execution)
    filter_s, fstats = _best(args.repeats, lambda out: run_filter([layout.ingest("web")], out, model, fcfg, caption_dir))
    acfg = AssembleConfig(threshold=args.threshold, execution=execution)
    inputs = [layout.ingest("human"), filter_dir / "kept", filter_dir / "rejected"]
    assemble_s, astats = _best(args.repeats, lambda out: run_assemble(inputs, out, acfg))
    print(json.dumps({
        "threshold": args.threshold, "filter_rows": fstats.totals["input"], "filter_s": round(filter_s, 3),
        "assemble_rows": astats.totals["input"], "assemble_kept": astats.totals["kept"],
        "assemble_s": round(assemble_s, 3), "ratio": round(filter_s / assemble_s, 1),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
