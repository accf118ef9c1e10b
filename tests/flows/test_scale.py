"""The flow at real shard counts (issue 22): 2,000 one-row web shards, caption + filter with
given models, Prefect's default settings (its 512 KiB parameter limit included)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.flows.conftest import write_tiny_web_shards

pytestmark = pytest.mark.slow

SHARDS = 2000
OUTCOMES = ("kept", "rejected", "failed")


def _records(folder: Path) -> dict[str, dict[str, int]]:
    """Shard name -> counts of every completion record in `folder`."""
    from data.shards import read_completion

    records = {}
    for path in sorted(folder.glob("part-*.done.json")):
        record = read_completion(path)
        assert record is not None, f"unreadable completion record {path}"
        records[record.shard] = record.counts
    return records


def _mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("part-*")}


@pytest.mark.timeout(2700)  # 832 s at load 5-12 on the 2 cores (torch's threads contend), a few minutes idle
def test_flow_over_2000_shards(tmp_path: Path, prefect_harness, random_tiny_model) -> None:
    """Every web row of 2,000 shards is captioned and judged, each shard leaves its kept /
    rejected / failed triple with records, and a second run does no shard work."""
    from flows.bootstrap import bootstrap
    from flows.config import load_config

    rows = write_tiny_web_shards(tmp_path / "web", rows=SHARDS, shards=SHARDS)
    cfg = load_config({
        "run_dir": str(tmp_path / "run"), "data": {"web": [str(tmp_path / "web")]},
        "model": {"filter": str(random_tiny_model), "captioner": str(random_tiny_model)},
        "caption": {"max_length": 8}, "stages": {"stop_after": "filter"}, "runner": {"kind": "threads"},
    })  # fmt: skip
    summary = bootstrap(config=cfg)

    stages = {r["stage"]: r for r in summary["stages"]}
    caption, filt = stages["caption"], stages["filter"]
    assert caption["shards"] == filt["shards"] == SHARDS
    assert caption["input"] == rows and caption["kept"] + caption["rejected"] + caption["failed"] == rows
    assert filt["input"] == rows + caption["kept"]  # each web caption + one synthetic per captioned image
    assert filt["kept"] + filt["rejected"] + filt["failed"] == filt["input"]

    captions = _records(Path(summary["caption_dir"]))
    assert len(captions) == SHARDS and sum(c["input"] for c in captions.values()) == rows
    assert all(c["kept"] + c["rejected"] + c["failed"] == c["input"] for c in captions.values())
    filter_dir = Path(summary["filter_dir"])
    triples = {outcome: _records(filter_dir / outcome) for outcome in OUTCOMES}
    for outcome in OUTCOMES:  # one shard and one record per input shard in each outcome folder
        assert len(list((filter_dir / outcome).glob("part-*.parquet"))) == SHARDS, outcome
        assert sorted(triples[outcome]) == sorted(captions), outcome
    judged = triples["kept"]  # each record of a triple holds the shard's counts
    assert sum(c["web_input"] for c in judged.values()) == rows
    assert all(c["kept"] + c["rejected"] + c["failed"] == c["input"] for c in judged.values())

    before = _mtimes(tmp_path / "run")
    again = bootstrap(config=cfg)  # in-process: through the flow, not answered by RUN/run.json
    rerun = {r["stage"]: r for r in again["stages"]}
    for stage in ("caption", "filter"):
        assert rerun[stage]["input"] == stages[stage]["input"], stage
        assert rerun[stage]["skipped_shards"] == SHARDS, rerun[stage]  # every shard skipped by its record
    after = _mtimes(tmp_path / "run")
    assert {k: v for k, v in after.items() if k in before} == before  # no shard rewritten
