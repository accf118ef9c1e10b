"""Assemble stage: D' = human + kept pairs, exact duplicates dropped (human wins), rejected
and failed rows dropped and counted, resharded with per-shard accounting, provenance kept."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest
from stage_helpers import web_rows, write_pairs

from data.schema import SCORED
from data.shards import list_shards, read_completion, read_table, write_shard
from tasks.assemble import AssembleConfig, normalised_caption, run_assemble
from tasks.execution import ExecutionConfig

EXEC = ExecutionConfig(progress=False)


def _scored(path: Path, rows: list[dict], keep: list[bool], score: list[float]) -> Path:
    table = pa.Table.from_pylist(
        [
            {**r, "itm_score": s, "keep": k, "reject_reason": None if k else "itm_below_threshold",
             "threshold": 0.5, "judge": "judge123"}
            for r, k, s in zip(rows, keep, score)
        ],
        schema=SCORED,
    )
    write_shard(table, path, kind="scored")
    return path


@pytest.fixture()
def inputs(tmp_path: Path) -> tuple[Path, Path]:
    human = [dict(r, source="human") for r in web_rows(0, 3)]
    human[2]["sha256"] = None  # hashed from the bytes by assemble
    write_pairs(tmp_path / "human" / "part-00000.parquet", human)
    web = web_rows(100, 5, failed=(4,))
    web[0] = {**web[0], "jpg": human[1]["jpg"], "sha256": human[1]["sha256"],
              "caption": "  " + human[1]["caption"].upper() + " "}  # duplicate of a human pair
    syn = [dict(r, key=r["key"] + "/syn0", source="synthetic", caption="x " + r["caption"]) for r in web[:4]]
    syn[3] = {**syn[2], "key": "w0102/syn1"}  # exact duplicate of another synthetic pair
    kept = tmp_path / "kept"
    _scored(kept / "part-00000.parquet", web, [True, True, False, True, False], [0.9, 0.8, 0.1, 0.7, None])
    _scored(kept / "part-00001.parquet", syn, [True, True, True, True], [0.6, 0.7, 0.8, 0.8])
    return tmp_path / "human", kept


def test_dedupe_reshard_accounting_and_provenance(tmp_path: Path, inputs) -> None:
    human, kept = inputs
    stats = run_assemble([human, kept], tmp_path / "out", AssembleConfig(rows_per_shard=3, execution=EXEC))
    shards = list_shards(stats.output)
    rows = [r for p in shards for r in read_table(p, "dataset").to_pylist()]
    # 3 human + web (w0101, w0103) + synthetic (syn of w0100..w0102; w0102/syn1 is a duplicate)
    assert [r["key"] for r in rows] == ["w0000", "w0001", "w0002", "w0101", "w0103", "w0100/syn0", "w0101/syn0", "w0102/syn0"]
    assert [len(read_table(p, "dataset")) for p in shards] == [3, 3, 2]
    totals = stats.totals
    assert totals == {**totals, "input": 12, "kept": 8, "duplicate": 2, "rejected_by_filter": 1, "rejected": 3, "failed": 1}
    for p in shards:
        c = read_completion(p).counts
        assert c["kept"] + c["rejected"] + c["failed"] == c["input"] and c["kept"] == len(read_table(p, "dataset"))
    by_key = {r["key"]: r for r in rows}
    assert by_key["w0000"]["source"] == "human" and by_key["w0000"]["itm_score"] is None and by_key["w0000"]["keep"]
    assert by_key["w0002"]["sha256"] is not None
    assert by_key["w0101/syn0"]["source"] == "synthetic" and by_key["w0101/syn0"]["judge"] == "judge123"
    assert by_key["w0101/syn0"]["itm_score"] == pytest.approx(0.7)


def test_rerun_skips_and_changed_inputs_write_elsewhere(tmp_path: Path, inputs) -> None:
    human, kept = inputs
    cfg = AssembleConfig(rows_per_shard=3, execution=EXEC)
    first = run_assemble([human, kept], tmp_path / "out", cfg)
    mtimes = {p: p.stat().st_mtime_ns for p in list_shards(first.output)}
    again = run_assemble([human, kept], tmp_path / "out", cfg)
    assert again.output == first.output and all(s.skipped for s in again.shards) and again.totals == first.totals
    assert {p: p.stat().st_mtime_ns for p in list_shards(first.output)} == mtimes
    # a lost middle shard is rewritten, the others are not
    list_shards(first.output)[1].unlink()
    healed = run_assemble([human, kept], tmp_path / "out", cfg)
    assert [s.skipped for s in healed.shards] == [True, False, True] and healed.totals == first.totals
    # without the human shard nothing is overwritten: a new folder
    other = run_assemble([kept], tmp_path / "out", cfg)
    assert other.output != first.output and other.totals["kept"] == 6  # w0100 is no longer a duplicate


def test_sources_take_one_source_after_another_and_count_the_rest(tmp_path: Path, inputs) -> None:
    human, kept = inputs
    web_part, syn_part = list_shards(kept)
    # a kept shard holding web and synthetic rows, as the filter writes them, given first
    mixed = read_table(syn_part, "scored").slice(0, 2)
    _scored(tmp_path / "mixed" / "part-00000.parquet", [*read_table(web_part, "scored").slice(1, 1).to_pylist(),
            *mixed.to_pylist()], [True, True, True], [0.8, 0.6, 0.7])
    inputs = [tmp_path / "mixed", human, kept]
    cfg = AssembleConfig(rows_per_shard=4, dedupe=False, sources=("human", "web"), execution=EXEC)
    stats = run_assemble(inputs, tmp_path / "out", cfg)
    keys = [r["key"] for p in list_shards(stats.output) for r in read_table(p, "dataset").to_pylist()]
    # human first although its shard is not; then web over all inputs in order; no synthetic
    assert keys == ["w0000", "w0001", "w0002", "w0101", "w0100", "w0101", "w0103"]
    totals = stats.totals
    assert totals == {**totals, "input": 3 + 3 + 5 + 4, "kept": 7, "excluded_source": 2 + 4, "failed": 1}
    assert "excluded_source" in read_completion(list_shards(stats.output)[-1]).counts  # counted in the last shard
    every = run_assemble(inputs, tmp_path / "out", AssembleConfig(rows_per_shard=4, dedupe=False, execution=EXEC))
    assert every.output != stats.output and every.totals["kept"] == 7 + 2 + 4  # all sources, input order

def test_normalised_caption() -> None:
    got = normalised_caption(pa.array(["  A  Dog\tRUNS ", None, "a dog runs"])).to_pylist()
    assert got == ["a dog runs", "", "a dog runs"]


def test_cli_takes_several_inputs_after_one_flag(tmp_path: Path, inputs) -> None:
    import json

    import typer
    from typer.testing import CliRunner

    from flows.commands.stages import register

    app = typer.Typer()
    register(app)
    human, kept = inputs
    shards = [str(p) for p in list_shards(kept)]
    args = ["assemble", "--input", str(human), *shards, "--output", str(tmp_path / "cli"), "--rows-per-shard", "4", "--no-progress"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["totals"]["kept"] == 8 and summary["shards"] == 2 and summary["stage"] == "assemble"


def test_capfilt_end_to_end_on_the_synthetic_world(tmp_path: Path) -> None:
    """caption -> filter -> assemble from Python on `data.synth` shards: totals chain up."""
    from stage_helpers import tiny_model

    from data.synth import SynthConfig, generate_world
    from tasks.caption import CaptionConfig, run_caption
    from tasks.filter import FilterConfig, run_filter

    generate_world(tmp_path / "world", SynthConfig(human_images=6, web_images=12, test_images=2, rows_per_shard=5))
    web, human = tmp_path / "world" / "web", tmp_path / "world" / "human"
    model = tiny_model(tmp_path / "model")
    quick = ExecutionConfig(batch_size=4, num_workers=0, progress=False)
    captions = run_caption([web], tmp_path / "caption", model, CaptionConfig(max_length=10, min_length=3, execution=quick))
    web_rows_total = captions.totals["input"]
    assert captions.totals["captions"] == captions.totals["kept"] and len(captions.shards) == 3
    filtered = run_filter([web], tmp_path / "filter", model, FilterConfig(execution=quick), caption_dir=captions.output)
    assert filtered.totals["input"] == web_rows_total + captions.totals["captions"]
    dataset = run_assemble([human, filtered.output / "kept"], tmp_path / "assemble", AssembleConfig(rows_per_shard=7, execution=EXEC))
    human_rows = sum(len(read_table(p, "pairs")) for p in list_shards(human))
    assert dataset.totals["input"] == human_rows + filtered.totals["kept"]
    assert dataset.totals["kept"] == sum(len(read_table(p, "dataset")) for p in list_shards(dataset.output))
