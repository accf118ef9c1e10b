"""Thresholds afterwards: the decision rule written once (`tasks.decide`), and assemble
re-deciding keep / reject from the filter's stored scores (no model) with its own
threshold or top-k, giving the rows a filter run at that threshold would have kept."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from stage_helpers import caption, tiny_model, web_rows, web_shards, write_pairs

from data.schema import SCORED
from data.shards import list_shards, read_completion, read_table, settings_hash, write_shard
from tasks.assemble import AssembleConfig, assemble_settings, run_assemble
from tasks.decide import DecisionRule, decide
from tasks.execution import ExecutionConfig
from tasks.filter import FilterConfig, run_filter

EXEC = ExecutionConfig(batch_size=4, num_workers=0, progress=False)
F, T = False, True


# ----------------------------------------------------------------------------- the rule


def test_decide_by_hand() -> None:
    nan = np.nan
    score = np.array([0.9, 0.4, nan, 0.7, 0.6, 0.8, 0.2, nan], dtype=np.float32)
    failed = np.array([F, F, F, F, F, F, F, T])
    nonempty = np.array([T, T, F, T, T, T, T, T])
    is_syn = np.array([F, F, F, T, T, T, T, T])
    image = np.array([0, 1, 2, 0, 0, 0, 1, 1])
    plain = decide(score, failed, nonempty, is_syn, image, DecisionRule(0.5))
    assert plain.keep.tolist() == [T, F, F, T, T, T, F, F]
    assert plain.reason == [None, "itm_below_threshold", "empty_caption", None, None, None, "itm_below_threshold", None]
    top2 = decide(score, failed, nonempty, is_syn, image, DecisionRule(0.5, top_k=2))
    assert top2.keep.tolist() == [T, F, F, T, F, T, F, F]  # image 0 keeps its 0.8 and 0.7 synthetic captions
    assert top2.reason[4] == "not_top_k"
    low = decide(score, failed, nonempty, is_syn, image, DecisionRule(0.1, top_k=1))
    assert low.keep.tolist() == [T, T, F, F, F, T, T, F]  # web rows are never limited by top-k
    assert low.reason == [None, None, "empty_caption", "not_top_k", "not_top_k", None, None, None]
    per_row = decide(score, failed, nonempty, is_syn, image, DecisionRule(np.array([0.95, 0.3, 0, 0, 0, 0, 0, 0], np.float32)))
    assert per_row.keep.tolist() == [F, T, F, T, T, T, T, F]


def test_top_k_ties_follow_the_tiebreak() -> None:
    score = np.array([0.7, 0.7, 0.7], dtype=np.float32)
    args = (score, np.zeros(3, bool), np.ones(3, bool), np.ones(3, bool), np.zeros(3, int), DecisionRule(0.5, 1))
    assert decide(*args).keep.tolist() == [T, F, F]  # row order by default
    assert decide(*args, tiebreak=np.array([2, 0, 1])).keep.tolist() == [F, T, F]


# ----------------------------------------------------------------------------- fabricated scored shards


def _scored(path: Path, rows: list[dict]) -> Path:
    write_shard(pa.Table.from_pylist([{**r, "judge": "j"} for r in rows], schema=SCORED), path, kind="scored")
    return path


def _row(base: dict, score: float | None, keep: bool, reason: str | None, **extra) -> dict:
    return {**base, "itm_score": score, "keep": keep, "reject_reason": reason, "threshold": 0.5, **extra}


@pytest.fixture()
def filtered(tmp_path: Path) -> tuple[Path, Path]:
    """A human shard and a filter folder as a filter at 0.5 (no top-k) writes it: two web rows
    (0.9 kept, 0.35 rejected), an empty web caption, a failed row; three synthetic captions
    of image 100 (0.8, 0.45, 0.6) and one of image 101 (0.2)."""
    write_pairs(tmp_path / "human" / "part-00000.parquet", [dict(r, source="human") for r in web_rows(0, 2)])
    web = web_rows(100, 4, failed=(3,))
    syn = [dict(web[i], key=f"{web[i]['key']}/syn{c}", source="synthetic", caption=f"syn {i} {c}", candidate=c)
           for i, c in ((0, 0), (0, 1), (0, 2), (1, 0))]  # fmt: skip
    filt = tmp_path / "filter" / "h"
    _scored(filt / "kept" / "part-00000.parquet", [
        _row(web[0], 0.9, T, None), _row(syn[0], 0.8, T, None), _row(syn[2], 0.6, T, None)])  # fmt: skip
    _scored(filt / "rejected" / "part-00000.parquet", [
        _row(web[1], 0.35, F, "itm_below_threshold"), _row(dict(web[2], caption="  "), None, F, "empty_caption"),
        _row(syn[1], 0.45, F, "itm_below_threshold"), _row(syn[3], 0.2, F, "itm_below_threshold")])  # fmt: skip
    _scored(filt / "failed" / "part-00000.parquet", [_row(dict(web[3], status="failed"), None, F, None)])
    return tmp_path / "human", filt


def _dataset(stats) -> list[dict]:
    return [r for p in list_shards(stats.output) for r in read_table(p, "dataset").to_pylist()]


def _keys(stats) -> set[str]:
    return {r["key"] for r in _dataset(stats)}


HUMAN = {"w0000", "w0001"}


def test_a_lower_threshold_keeps_rows_the_filter_rejected(tmp_path: Path, filtered) -> None:
    human, filt = filtered
    cfg = AssembleConfig(threshold=0.4, execution=EXEC)
    stats = run_assemble([human, filt / "kept", filt / "rejected"], tmp_path / "out", cfg)
    assert _keys(stats) == HUMAN | {"w0100", "w0100/syn0", "w0100/syn1", "w0100/syn2"}
    rows = {r["key"]: r for r in _dataset(stats)}
    assert rows["w0100/syn1"]["keep"] and rows["w0100/syn1"]["reject_reason"] is None
    assert rows["w0100/syn1"]["threshold"] == pytest.approx(0.4) and rows["w0100"]["threshold"] == pytest.approx(0.4)
    assert rows["w0000"]["threshold"] is None  # human rows were never judged
    assert stats.totals == {**stats.totals, "input": 9, "kept": 6, "rejected_by_filter": 3, "failed": 0}
    higher = run_assemble([human, filt / "kept", filt / "rejected"], tmp_path / "out",
                          AssembleConfig(threshold=0.7, execution=EXEC))  # fmt: skip
    assert _keys(higher) == HUMAN | {"w0100", "w0100/syn0"} and higher.output != stats.output


def test_top_k_ranks_an_images_captions_across_kept_and_rejected(tmp_path: Path, filtered) -> None:
    human, filt = filtered
    inputs = [human, filt / "kept", filt / "rejected"]
    stats = run_assemble(inputs, tmp_path / "out", AssembleConfig(threshold=0.4, top_k=2, execution=EXEC))
    assert _keys(stats) == HUMAN | {"w0100", "w0100/syn0", "w0100/syn2"}  # 0.8 and 0.6; 0.45 is third
    # top_k alone: each row's stored threshold (0.5), at most one synthetic caption per image
    alone = run_assemble(inputs, tmp_path / "out", AssembleConfig(top_k=1, execution=EXEC))
    assert _keys(alone) == HUMAN | {"w0100", "w0100/syn0"}
    assert {r["threshold"] for r in _dataset(alone) if r["source"] != "human"} == {0.5}


def test_accounting_covers_kept_rejected_and_failed_inputs(tmp_path: Path, filtered) -> None:
    human, filt = filtered
    cfg = AssembleConfig(threshold=0.0, rows_per_shard=3, execution=EXEC)
    stats = run_assemble([human, filt / "kept", filt / "rejected", filt / "failed"], tmp_path / "out", cfg)
    # threshold 0 keeps every scored row; the empty caption stays rejected and the failed row failed
    assert _keys(stats) == HUMAN | {"w0100", "w0101", "w0100/syn0", "w0100/syn1", "w0100/syn2", "w0101/syn0"}
    totals = stats.totals
    assert totals == {**totals, "input": 10, "kept": 8, "rejected": 1, "failed": 1}
    for p in list_shards(stats.output):
        c = read_completion(p).counts
        assert c["kept"] + c["rejected"] + c["failed"] == c["input"] and c["kept"] == read_table(p, "dataset").num_rows


def test_default_path_keeps_its_hash_and_verdicts(tmp_path: Path, filtered) -> None:
    human, filt = filtered
    cfg = AssembleConfig(execution=EXEC)
    settings = assemble_settings(cfg)
    assert settings == {"rows_per_shard": 10_000, "dedupe": True}  # what the folders made before these options hash
    stats = run_assemble([human, filt / "kept"], tmp_path / "out", cfg)
    stage = json.loads((stats.output / "stage.json").read_text())["settings"]
    assert stats.settings_hash == settings_hash(stage) and set(stage) == {"stage", "rows_per_shard", "dedupe", "inputs"}
    assert _keys(stats) == HUMAN | {"w0100", "w0100/syn0", "w0100/syn2"}  # the filter's verdicts as stored
    # the rejected shards as inputs without a threshold: still the stored verdicts
    both = run_assemble([human, filt / "kept", filt / "rejected"], tmp_path / "out", cfg)
    assert _keys(both) == _keys(stats)
    assert assemble_settings(AssembleConfig(threshold=0.5))["threshold"] == 0.5


def test_config_refuses_bad_values() -> None:
    with pytest.raises(ValueError, match="threshold"):
        AssembleConfig(threshold=1.5)
    with pytest.raises(ValueError, match="top_k"):
        AssembleConfig(top_k=0)


# ----------------------------------------------------------------------------- against a real filter run


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory):
    """A tiny random MED, two web shards with two synthetic captions per ok image."""
    import blip_core

    root = tmp_path_factory.mktemp("rethreshold")
    loaded = blip_core.load(tiny_model(root / "model"))
    (root / "web").mkdir()
    webs = web_shards(root / "web", (6, 5), failed=(2,))
    for web in webs:
        rows = [{**r, "key": f"{r['key']}/syn{c}", "source": "synthetic", "caption": caption(hash((r["key"], c)) % 997)}
                for r in read_table(web, "pairs").to_pylist() if r["status"] == "ok" for c in range(2)]  # fmt: skip
        write_pairs(root / "cap" / web.name, [{k: v for k, v in r.items() if k not in ("candidate", "producer")} for r in rows])
    return root, loaded, webs


def _filter(real, threshold: float, top_k: int | None = None) -> Path:
    root, loaded, webs = real
    cfg = FilterConfig(threshold=threshold, top_k=top_k, execution=EXEC)
    return run_filter(webs, root / "filter", loaded, cfg, caption_dir=root / "cap").output


@pytest.mark.parametrize("top_k", [None, 1])
def test_rethreshold_equals_a_filter_run_at_that_threshold(tmp_path: Path, real, top_k) -> None:
    first = _filter(real, 0.5)
    scores = np.concatenate([read_table(p, "scored", columns=["itm_score"])["itm_score"].to_numpy()
                             for p in list_shards(first / "kept") + list_shards(first / "rejected")])  # fmt: skip
    threshold = float(np.median(scores))  # splits the tiny model's scores in two, whatever they are
    redo = run_assemble([first / "kept", first / "rejected"], tmp_path / "redo",
                        AssembleConfig(threshold=threshold, top_k=top_k, dedupe=False, execution=EXEC))  # fmt: skip
    direct = _filter(real, threshold, top_k)
    made = run_assemble([direct / "kept"], tmp_path / "direct", AssembleConfig(dedupe=False, execution=EXEC))
    got, want = _dataset(redo), _dataset(made)
    assert 0 < len(got) < len(scores)
    assert {r["key"] for r in got} != {r["key"] for p in list_shards(first / "kept") for r in read_table(p, "scored").to_pylist()}
    assert sorted(r["key"] for r in got) == sorted(r["key"] for r in want)
    assert {r["threshold"] for r in got} == {float(np.float32(threshold))}
