"""The run folder says which outputs are current, and a moved run folder resumes as it was.

Through the CLI, as a user meets it: a quick demo; the folder moved elsewhere and rerun
(nothing recomputed: every shard, record, checkpoint and model keeps its inode and mtime);
then `capfilt run` with another filter threshold, then with the original settings. After
each run the catalog's views, the report and the evaluation describe that run, not the
one whose files happen to be newest.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
PY = ROOT / ".venv" / "bin" / "python"
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
       "NO_ALBUMENTATIONS_UPDATE": "1", "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
_RESULTS = (".parquet", ".done.json", ".safetensors", "training.json", "trainer_state.json", "metrics.json")


def _capfilt(*args: str) -> str:
    done = subprocess.run([str(PY), "-m", "flows.cli", *args], env=ENV, cwd=ROOT, capture_output=True, text=True,
                          timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def _results(root: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime_ns) of every shard, completion record, model and metrics file (not the
    world's URL list, which names the port the demo serves its images on this time)."""
    return {str(p.relative_to(root)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in root.rglob("*")
            if p.is_file() and p.name.endswith(_RESULTS) and ".prefect" not in p.parts
            and p.name != "web_urls.parquet"}  # fmt: skip


def _query(run: Path, sql: str) -> list[dict]:
    return [json.loads(line) for line in _capfilt("query", str(run), sql, "--format", "json").splitlines() if line]


def _report_row(run: Path, stage: str) -> list[str]:
    """The accounting table's row of `stage` in report.md: shards, input, kept, rejected, failed."""
    for line in (run / "report.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells and cells[0] == stage and len(cells) >= 6 and cells[1].isdigit():
            return cells[1:6]
    raise AssertionError(f"no {stage} row in {run / 'report.md'}")


def _run(run: Path, config: Path, **values: object) -> None:
    config.write_text(json.dumps({"preset": "demo-quick", "run_dir": str(run), **values}))  # JSON is YAML
    _capfilt("run", "--config", str(config))


def _describes(run: Path, threshold: float) -> dict[str, object]:
    """Check views, report and metrics all describe the run made with `threshold`; return them."""
    assert _query(run, "SELECT DISTINCT threshold FROM scored") == [{"threshold": pytest.approx(threshold)}]
    kept = _query(run, "SELECT count(*) AS n FROM scored WHERE keep")[0]["n"]
    scored = _query(run, "SELECT count(*) AS n FROM scored")[0]["n"]
    dataset = _query(run, "SELECT count(*) AS n FROM dataset")[0]["n"]
    human = _query(run, "SELECT count(*) AS n FROM human")[0]["n"]
    assert _report_row(run, "filter")[1:3] == [str(scored), str(kept)]
    assert int(_report_row(run, "assemble")[2]) == dataset
    assert dataset <= human + kept
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    current = json.loads((run / "current.json").read_text())["current"]
    synthetic_kept = _query(run, "SELECT count(*) AS n FROM scored WHERE keep AND source = 'synthetic'")[0]["n"]
    assert metrics["filter_detection"]["threshold"] == pytest.approx(threshold)
    assert metrics["captioner"]["kept"] == synthetic_kept
    assert Path(metrics["model_dir"]).as_posix().endswith(current["model/final"])
    return {"kept": kept, "dataset": dataset, "retrieval": metrics["retrieval"], "current": current}


def test_moved_run_resumes_untouched_and_views_follow_the_latest_settings(tmp_path: Path) -> None:
    first = tmp_path / "first"
    _capfilt("demo", "--quick", "--out", str(first))
    original = _describes(first, 0.5)

    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    os.rename(first, moved)
    before = _results(moved)
    _capfilt("demo", "--quick", "--out", str(moved))
    after = _results(moved)
    assert sorted(k for k in before if after.get(k) != before[k]) == []  # nothing recomputed, nothing rewritten
    assert sorted(set(after) - set(before)) == []
    assert not any(Path(p).is_absolute() for p in json.loads((moved / "current.json").read_text())["current"].values())

    config = tmp_path / "run.yaml"
    _run(moved, config, filter={"threshold": 0.3})
    lower = _describes(moved, 0.3)
    assert lower["current"]["filter"] != original["current"]["filter"]
    assert lower["kept"] > original["kept"]  # a lower threshold keeps more

    _run(moved, config)  # the original settings again: their outputs are current again, and reused
    again = _describes(moved, 0.5)
    assert again["current"] == original["current"]
    assert (again["kept"], again["dataset"], again["retrieval"]) == (original["kept"], original["dataset"], original["retrieval"])
    assert re.fullmatch(r"models/final/[0-9a-f]{12}/final", again["current"]["model/final"])
