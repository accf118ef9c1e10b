"""The miniature Table 1: dataset assembly, the table, and (slow) a whole micro run."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from data.shards import list_shards, read_table, shard_name, write_shard
from data.synth import SynthConfig, generate_world
from tasks.ablation import (
    AblationConfig,
    AblationResult,
    beats,
    build_datasets,
    dataset_rows,
    finetune_recipe,
    format_table,
    mean_spread,
    paired,
    run_ablation,
)


def test_mean_spread_and_beats() -> None:
    assert mean_spread([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2)))
    assert mean_spread([5.0]) == (5.0, 0.0)
    assert math.isnan(mean_spread([])[0])
    assert beats([10.0, 10.0], [5.0, 5.0])
    # difference 4, spreads 1.41 + 1.41 = 2.83 -> beats; difference 2 -> not
    assert beats([5.0, 7.0], [1.0, 3.0])
    assert not beats([3.0, 5.0], [1.0, 3.0])


def test_paired_differences_against_hand_computed_values() -> None:
    # per-seed differences 2, 4, 3: mean 3, sd 1, t = 3 / (1 / sqrt 3) = 5.196 > 2.920 (2 df)
    p = paired([12.0, 24.0, 33.0], [10.0, 20.0, 30.0])
    assert (p.mean, p.sd, p.wins, p.n) == (3.0, 1.0, 3, 3)
    assert p.t == pytest.approx(3 * math.sqrt(3))
    assert p.significant
    # the unpaired check misses this: spreads 10.5 + 10.0 dwarf the mean difference of 3
    assert not beats([12.0, 24.0, 33.0], [10.0, 20.0, 30.0])
    # differences 1, -1, 3: mean 1, sd 2, t = 0.866 -> not shown; one seed lost
    q = paired([11.0, 19.0, 33.0], [10.0, 20.0, 30.0])
    assert (q.mean, q.sd, q.wins) == (1.0, 2.0, 2) and not q.significant
    # identical positive differences: t is infinite; a single seed proves nothing
    assert paired([2.0, 3.0], [1.0, 2.0]).significant
    assert not paired([5.0], [1.0]).significant
    # NaN pairs are dropped; unequal lengths are a caller error
    assert paired([1.0, float("nan"), 4.0], [0.0, 0.0, 1.0]).n == 2
    with pytest.raises(ValueError):
        paired([1.0, 2.0], [1.0])


def test_config_rejects_unknown_rows_and_bad_queue() -> None:
    with pytest.raises(ValueError, match="unknown ablation rows"):
        AblationConfig(rows=("cf", "oracle"))
    with pytest.raises(ValueError, match="multiple of batch_size"):
        AblationConfig(batch_size=100, queue_size=150)
    with pytest.raises(ValueError, match="caption_strategy"):
        AblationConfig(caption_strategy="topk")
    with pytest.raises(ValueError, match="rounds must be at least 1"):
        AblationConfig(rounds=0)


def test_later_rounds_finetune_in_blips_proportions() -> None:
    cfg = AblationConfig()
    assert finetune_recipe(cfg, 1) is cfg  # round 1: the long finetune, as configured
    later = finetune_recipe(cfg, 2)
    # 6 epochs of 1,000 human pairs at batch 64 = 93.75 -> 94 steps; lr 2e-3 x 1e-5 / 3e-4
    assert later.finetune_steps == 94
    assert later.finetune_lr == pytest.approx(2e-3 / 30)
    assert finetune_recipe(dataclasses.replace(cfg, human_images=640, batch_size=32, queue_size=64), 3).finetune_steps == 120


def test_a_rerun_with_other_settings_is_refused_before_any_work(tmp_path: Path) -> None:
    from tasks.ablation import SETTINGS_FILE, _check_settings

    first = AblationConfig(out_dir=str(tmp_path), seeds=(0,))
    _check_settings(first, tmp_path)
    assert json.loads((tmp_path / SETTINGS_FILE).read_text())["caption_strategy"] == "nucleus"
    # more seeds, fewer rows, more rounds, other threads: the same experiment, continued
    _check_settings(AblationConfig(out_dir=str(tmp_path), seeds=(0, 1, 2), rows=("cf",), rounds=2, threads=1), tmp_path)
    with pytest.raises(ValueError, match=r"caption_strategy: 'nucleus' -> 'beam'.*another --out"):
        run_ablation(AblationConfig(out_dir=str(tmp_path), caption_strategy="beam"))
    assert sorted(p.name for p in tmp_path.iterdir()) == [SETTINGS_FILE]  # nothing was made
    # a folder made before a setting existed: the setting counts as its default there
    saved = json.loads((tmp_path / SETTINGS_FILE).read_text())
    del saved["human_vague_rate"], saved["mix_units"]
    (tmp_path / SETTINGS_FILE).write_text(json.dumps(saved))
    # ... or what such folders were made with, where today's default differs
    with pytest.raises(ValueError, match="mix_units: 1 -> 8"):
        _check_settings(first, tmp_path)
    first = dataclasses.replace(first, mix_units=1)
    _check_settings(first, tmp_path)
    with pytest.raises(ValueError, match="human_vague_rate: 0.0 -> 0.25"):
        _check_settings(dataclasses.replace(first, human_vague_rate=0.25), tmp_path)


def _result() -> AblationResult:
    values = {row: {m: [] for m in ("TR@1", "IR@1", "TR@5", "IR@5", "ITC TR@1", "ITC IR@1", "B@4", "CIDEr", "exact caps %")}
              for row in ("no_cf", "cf", "human")}
    for row, base in (("no_cf", 50.0), ("cf", 70.0), ("human", 60.0)):
        for m in values[row]:
            values[row][m] = [base, base + 2.0]
    values["human"]["exact caps %"] = [float("nan"), float("nan")]
    return AblationResult(
        config={"seeds": [0, 1]}, values=values,
        dataset_rows={"no_cf": {"human": 10, "web": 40, "total": 50}, "cf": {"human": 10, "web": 20, "synthetic": 30}},
        capfilt={"filter": {"roc_auc": 0.95, "precision": 1.0, "recall": 0.7, "keep_rate_junk": 0.0},
                 "captioner": {"exact": 0.6, "true": 0.9, "exact_among_kept": 0.8}},
    )


def test_format_table() -> None:
    md = format_table(_result())
    assert "| human + raw web (no C, no F) | 10/40/0 | 51.0 ± 1.4 |" in md
    assert "| human + filtered web + filtered synthetic (C+F) | 10/20/30 | 71.0 ± 1.4 |" in md
    assert "78.4 / 60.7" in md and "38.6 / 129.7" in md  # the paper's rows
    assert "| human only (control) | 0/0/0 |" in md and "n/a" in md
    assert "C+F vs no_cf on TR@1: +20.0 -> beats; paired +20.0 ± 0.0, won 2/2 seeds -> better" in md
    assert "filter ROC-AUC 0.950 -> >= 0.9" in md and "junk 0.0%" in md
    assert "round" not in md  # one round: the table says nothing of rounds


def test_format_table_of_a_second_round() -> None:
    result = dataclasses.replace(_result(), config={"seeds": [0, 1], "rounds": 2},
                                 capfilt_rounds=[{"filter": {"roc_auc": 0.8, "roc_auc_weak_vs_noise": 0.7}}])
    md = format_table(result)
    # the CapFilt rows train on round 2's data; no-C/F and the control do not depend on CapFilt
    assert "| human + filtered web + filtered synthetic (C+F), round 2 | 10/20/30 |" in md
    assert "| human + raw web (no C, no F) | 10/40/0 |" in md
    assert "CapFilt (round 2 of 2, from round 1's C+F model; one run, seed 0): filter ROC-AUC on web noise 0.950" in md
    assert "Earlier rounds' filter ROC-AUC: round 1 0.800 (weak 0.700)." in md


def test_build_datasets(tmp_path: Path) -> None:
    world = tmp_path / "world"
    generate_world(world, SynthConfig(seed=1, human_images=8, web_images=10, test_images=2, test_captions=1,
                                      rows_per_shard=6))
    webs = [read_table(p, "pairs") for p in list_shards(world / "web")]  # two shards: 6 + 4 rows
    caption_dir, filter_dir = tmp_path / "caption" / "h", tmp_path / "filter" / "h"
    for i, web in enumerate(webs):
        syn = web.set_column(web.schema.get_field_index("source"), "source", pa.array(["synthetic"] * web.num_rows))
        syn = syn.set_column(0, "key", pc.binary_join_element_wise(web["key"], pa.scalar("/syn0"), "")).cast(web.schema)
        write_shard(syn, caption_dir / shard_name(i), "pairs")
        # as the filter writes them: per web shard, its kept web rows, then its kept synthetic ones
        kept = pa.concat_tables([web.slice(0, 2), syn.slice(0, 3)])
        kept = kept.append_column("keep", pa.array([True] * kept.num_rows))
        write_shard(kept, filter_dir / "kept" / shard_name(i), "scored")
    folders = build_datasets(tmp_path, world, caption_dir, filter_dir, ["no_cf", "filter", "captioner", "cf", "human"])
    assert dataset_rows(folders["no_cf"]) == {"human": 8, "web": 10, "total": 18}
    assert dataset_rows(folders["filter"]) == {"human": 8, "web": 4, "total": 12}
    assert dataset_rows(folders["captioner"]) == {"human": 8, "synthetic": 10, "total": 28, "web": 10}
    assert dataset_rows(folders["cf"]) == {"human": 8, "synthetic": 6, "total": 18, "web": 4}
    assert dataset_rows(folders["human"]) == {"human": 8, "total": 8}
    assert folders["cf"].parent == tmp_path / "datasets" / "cf"
    # every kept web pair before any synthetic one, each in shard order (the paper's concatenation)
    keys = [k for p in list_shards(folders["cf"]) for k in read_table(p, "dataset")["key"].to_pylist()]
    web_keys = [w["key"][i].as_py() for w in webs for i in (0, 1)]
    assert keys[8:] == web_keys + [f"{w['key'][i].as_py()}/syn0" for w in webs for i in (0, 1, 2)]
    # complete datasets are not rebuilt
    before = {p: p.stat().st_mtime_ns for p in list_shards(folders["cf"])}
    assert build_datasets(tmp_path, world, caption_dir, filter_dir, ["cf"])["cf"] == folders["cf"]
    assert {p: p.stat().st_mtime_ns for p in list_shards(folders["cf"])} == before


@pytest.mark.slow
def test_micro_ablation_runs_and_resumes(tmp_path: Path) -> None:
    cfg = AblationConfig(out_dir=str(tmp_path / "abl"), seeds=(0,), rows=("no_cf", "cf", "human"), human_images=64,
                         web_images=128, test_images=16, test_captions=2, pretrain_steps=4, finetune_steps=2,
                         batch_size=16, queue_size=32, eval_caption_strategy="greedy", threads=1)
    result = run_ablation(cfg)
    table = (tmp_path / "abl" / "table.md").read_text()
    assert "C+F" in table and "78.4 / 60.7" in table
    assert set(result.values) == {"no_cf", "cf", "human"}
    data = json.loads((tmp_path / "abl" / "table.json").read_text())
    assert data["dataset_rows"]["no_cf"]["total"] == 64 + 128
    assert 0.0 <= data["capfilt"]["filter"]["roc_auc"] <= 1.0 or math.isnan(data["capfilt"]["filter"]["roc_auc"])
    # a rerun finds every model and evaluation complete and gives the same numbers
    again = run_ablation(cfg)
    assert again.values == result.values
    # new seeds replicate the table on the folder's own CapFilt: nothing of it is redone
    filter_model = tmp_path / "abl" / "models" / "filter" / "final" / "config.json"
    made = filter_model.stat().st_mtime_ns
    replica = run_ablation(dataclasses.replace(cfg, seeds=(1,)))
    assert filter_model.stat().st_mtime_ns == made
    same = json.dumps(replica.capfilt, sort_keys=True) == json.dumps(result.capfilt, sort_keys=True)  # NaN-safe
    assert same and replica.dataset_rows == result.dataset_rows
    assert (tmp_path / "abl" / "models" / "cf-s1" / "final" / "config.json").is_file()
    # a second round: CapFilt again from round 1's C+F model (seed 0); round 1 is not redone
    two = run_ablation(dataclasses.replace(cfg, rounds=2))
    root = tmp_path / "abl" / "round-2"
    assert filter_model.stat().st_mtime_ns == made
    assert (tmp_path / "abl" / "models" / "cf-s0" / "final" / "config.json").is_file()  # round 2's base
    made_with = json.loads((root / "models" / "filter" / "final" / "training.json").read_text())
    later = finetune_recipe(cfg, 2)  # 6 epochs of 64 human pairs at batch 16: 24 steps, not round 1's 2
    assert made_with["steps"] == later.finetune_steps == 24
    assert made_with["train_config"]["lr"] == pytest.approx(later.finetune_lr)
    assert (root / "models" / "cf-s0" / "final" / "config.json").is_file() and (root / "eval" / "cf-s0.json").is_file()
    assert not (root / "models" / "no_cf-s0").exists()  # no C/F and human-only do not depend on CapFilt
    assert two.values["no_cf"] == result.values["no_cf"] and two.values["human"] == result.values["human"]
    assert len(two.capfilt_rounds) == 1
    assert json.dumps(two.capfilt_rounds[0], sort_keys=True) == json.dumps(result.capfilt, sort_keys=True)
    assert "C+F), round 2 |" in (tmp_path / "abl" / "table.md").read_text()
