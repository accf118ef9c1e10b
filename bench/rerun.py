"""Rerunning a finished quick demo: where the seconds go, through the flow and from the run record.

    .venv/bin/python bench/rerun.py [--out runs/bench-rerun] [--repeats 3]

Runs `capfilt demo --quick` once into OUT (unless it already finished there), then times,
`--repeats` times each, as a user types them:

- `capfilt --help`: the command line's own imports (the floor of any command);
- the rerun through the flow: ``RUN/run.json`` removed first, so the flow starts Prefect's
  temporary server, opens a flow run and a task run per stage, finds every stage's
  completion records and rewrites the report (what every rerun cost before the record);
- the rerun answered by the run record (``flows.run_record``): no Prefect at all.

Prints a Markdown table of median wall seconds and the ratio to the flow rerun.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

CAPFILT = Path(sys.executable).parent / "capfilt"
ENV_NOTE = "NO_ALBUMENTATIONS_UPDATE=1 PREFECT_SERVER_ANALYTICS_ENABLED=false TOKENIZERS_PARALLELISM=false"


def _timed(argv: list[str], before: object = None) -> float:
    if callable(before):
        before()
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench-rerun")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    out = Path(args.out)
    demo = [str(CAPFILT), "demo", "--quick", "--out", str(out)]
    if not (out / "run.json").is_file():
        print(f"first run into {out} ...", file=sys.stderr)
        subprocess.run(demo, check=True, stdout=subprocess.DEVNULL)
    record = out / "run.json"

    def through_flow() -> None:
        record.unlink(missing_ok=True)  # the flow writes it again at its end

    cases = {
        "`capfilt --help` (imports only)": ([str(CAPFILT), "--help"], None),
        "rerun through the flow (no run record)": (demo, through_flow),
        "rerun answered by the run record": (demo, None),
    }
    medians = {}
    for name, (argv, before) in cases.items():
        times = []
        for _ in range(args.repeats):
            times.append(_timed(argv, before))
        medians[name] = statistics.median(times)
    base = medians["rerun through the flow (no run record)"]
    print(f"\nrerun of a finished `capfilt demo --quick` ({args.repeats} runs each, median; env: {ENV_NOTE})\n")
    print("| command | wall s | vs flow rerun |")
    print("|---|---:|---:|")
    for name, seconds in medians.items():
        print(f"| {name} | {seconds:.1f} | {seconds / base:.2f}x |")


if __name__ == "__main__":
    main()
