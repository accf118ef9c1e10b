"""Seeded fault-injection sweep: SIGKILL every stage at many rename points, rerun, count
what was lost (must be 0); then push the hostile corpus through the pipeline and count
each outcome.

    python bench/faults.py --faults 4 --kills 2 --seed 0

For each stage (synthetic-world and human-list ingestion, caption, filter, assemble,
train) the command runs once uninterrupted in this process (its renames are the kill
points), then `--faults` times in a fresh folder as a real process that is SIGKILLed at a
seeded rename (before it, after it, or with its temporary file cut in half), `--kills`
times in a row (the later kills land in the reruns), and once more to the end. Every
output is compared with the uninterrupted run (tables, completion records, models).
The machinery lives in tests/reliability/reliability_harness.py, which the test suite
runs with one fault per stage.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "reliability")]

from reliability_harness import build_world, run_hostile_pipeline, stage_cases, summary_line, sweep  # noqa: E402

from data.shards import list_shards, read_table  # noqa: E402


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--faults", type=int, default=4, help="faulty runs per stage")
    parser.add_argument("--kills", type=int, default=2, help="SIGKILLs in a row per faulty run (then one clean rerun)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stages", default="synth,ingest-human,caption,filter,assemble,train")
    parser.add_argument("--no-hostile", action="store_true", help="skip the hostile-input pass")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the folders here (default: a temporary one)")
    return parser.parse_args()


def _why(outcome: str, row: dict) -> str:
    if outcome == "rejected":
        return row["reject_reason"]
    return (row["error"] or "").split(":")[0] if outcome == "failed" else "-"


def _hostile(root: Path, model: Path) -> int:
    """Run the hostile corpus; print each outcome; return rows ending wrongly (0 expected)."""
    result = run_hostile_pipeline(root, model)
    cases = {c.key: c for c in result["cases"]}
    ends: dict[str, list[str]] = {}
    outcomes: Counter = Counter()
    folder = result["filter"].output
    for outcome in ("kept", "rejected", "failed"):
        for path in list_shards(folder / outcome):
            for row in read_table(path, "scored", columns=["key", "source", "reject_reason", "error"]).to_pylist():
                if row["source"] == "web":
                    ends.setdefault(row["key"], []).append(outcome)
                    outcomes[(outcome, _why(outcome, row))] += 1
    wrong = [k for k, c in cases.items() if len(ends.get(k, [])) != 1 or (ends[k][0] == "failed") != (c.expect == "failed")]
    kinds = Counter(k.split("-")[0] for k in cases)
    print(f"\nbad inputs tried: {len(cases)} URL-list rows ({kinds['img']} hostile images, {kinds['cap']} hostile "
          f"captions, {len(cases) - kinds['img'] - kinds['cap']} duplicate / missing / empty / non-HTTP URLs)")  # fmt: skip
    for (outcome, why), n in sorted(outcomes.items()):
        print(f"  {outcome:<9} {why:<22} {n:>3}")
    totals = result["filter"].totals
    print(f"  web rows ending exactly once as expected: {len(cases) - len(wrong)} of {len(cases)}")
    print(f"  filter rows (web + synthetic): input {totals['input']} = kept {totals['kept']} + rejected "
          f"{totals['rejected']} + failed {totals['failed']}")  # fmt: skip
    return len(wrong)


def main() -> None:
    args = _args()
    root = args.workdir or Path(tempfile.mkdtemp(prefix="capfilt-faults-"))
    root.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    world = build_world(root / "world")
    cases = stage_cases(world)
    results = []
    for index, name in enumerate(args.stages.split(",")):
        results.append(sweep(cases[name], root / "sweep", faults=args.faults, seed=args.seed + index, kills_per_fault=args.kills))
        print(summary_line(results[-1]), flush=True)
        for problem in results[-1].problems:
            print("   PROBLEM:", problem[:500])
    total = {k: sum(getattr(r, k) for r in results) for k in ("faults", "reruns", "rows_checked", "rows_lost")}
    problems = sum(len(r.problems) for r in results)
    print(f"{'all':<13} faults injected {total['faults']}  reruns {total['reruns']}  rows checked {total['rows_checked']}  "
          f"rows lost {total['rows_lost']}  problems {problems}")  # fmt: skip
    if not args.no_hostile:
        problems += _hostile(root / "hostile", world["model"])
    print(f"\n{time.perf_counter() - start:.0f} s; seed {args.seed}, {args.faults} faulty runs x {args.kills} kills per stage")
    if args.workdir is None:
        shutil.rmtree(root, ignore_errors=True)
    if total["rows_lost"] or problems:
        sys.exit(1)


if __name__ == "__main__":
    main()
