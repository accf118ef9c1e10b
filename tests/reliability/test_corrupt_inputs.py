"""Corrupt inputs: a truncated or non-Parquet shard among good ones, a corrupt caption
shard, checkpoints with missing / extra / mis-shaped tensors. Each gives an error that
names the file; the other shards of the stage complete, and the stage says which did not."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from safetensors.torch import load_file, save_file

import blip_core
from data.shards import list_shards, read_completion
from tasks.assemble import AssembleConfig, run_assemble
from tasks.caption import CaptionConfig, run_caption
from tasks.execution import ExecutionConfig
from tasks.lifecycle import StageIncompleteError
from tasks.filter import FilterConfig, run_filter

EXECUTION = ExecutionConfig(num_workers=0, progress=False, batch_size=4)
CAPTION = CaptionConfig(max_length=10, min_length=3, execution=EXECUTION)
FILTER = FilterConfig(threshold=0.5, execution=EXECUTION)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.fixture()
def damaged_web(world: dict[str, Path], tmp_path: Path) -> tuple[Path, list[Path]]:
    """A copy of the web shards with shard 1 cut in half and shard 2 replaced by text."""
    web = tmp_path / "web"
    shutil.copytree(world["web"], web)
    _truncate(web / "part-00001.parquet")
    (web / "part-00002.parquet").write_text("key,caption\nnot,parquet\n")
    return web, [web / "part-00001.parquet", web / "part-00002.parquet"]


def _same_shards(got: Path, want: Path, names: list[str]) -> None:
    for name in names:
        assert pq.read_table(got / name).equals(pq.read_table(want / name)), name
        assert read_completion(got / name).counts == read_completion(want / name).counts


def test_caption_finishes_good_shards_and_names_the_bad(world: dict[str, Path], damaged_web, tmp_path: Path) -> None:
    web, bad = damaged_web
    with pytest.raises(StageIncompleteError) as info:
        run_caption([web], tmp_path / "caption", world["model"], CAPTION)
    error = info.value
    assert sorted(error.failures) == sorted(str(p) for p in bad)
    assert all(str(p) in str(error) for p in bad) and "2 of 4 input shards did not complete" in str(error)
    assert "not a readable Parquet file" in error.failures[str(bad[0])]
    folder = error.stats.output
    assert [s.shard for s in error.stats.shards] == ["part-00000.parquet", "part-00003.parquet"]
    assert [p.name for p in list_shards(folder)] == ["part-00000.parquet", "part-00003.parquet"]
    _same_shards(folder, world["captions"], ["part-00000.parquet", "part-00003.parquet"])
    assert not list(folder.glob("*.tmp"))
    # the fix is to replace the bad inputs; the rerun then completes only those
    for path in bad:
        shutil.copy(world["web"] / path.name, path)
    stats = run_caption([web], tmp_path / "caption", world["model"], CAPTION)
    assert [s.skipped for s in stats.shards] == [True, False, False, True]


def test_filter_finishes_good_shards_and_names_a_corrupt_caption_shard(world: dict[str, Path], tmp_path: Path) -> None:
    captions = tmp_path / "captions"
    shutil.copytree(world["captions"], captions)
    _truncate(captions / "part-00003.parquet")
    with pytest.raises(StageIncompleteError) as info:
        run_filter([world["web"]], tmp_path / "filter", world["model"], FILTER, caption_dir=captions)
    assert list(info.value.failures) == [str(world["web"] / "part-00003.parquet")]
    assert str(captions / "part-00003.parquet") in info.value.failures[str(world["web"] / "part-00003.parquet")]
    kept = info.value.stats.output / "kept"
    assert [p.name for p in list_shards(kept)] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]


def test_filter_skips_past_a_truncated_web_shard(world: dict[str, Path], damaged_web, tmp_path: Path) -> None:
    web, bad = damaged_web
    with pytest.raises(StageIncompleteError) as info:
        run_filter([web], tmp_path / "filter", world["model"], FILTER, caption_dir=world["captions"])
    assert sorted(info.value.failures) == sorted(str(p) for p in bad)
    folder = info.value.stats.output
    for outcome in ("kept", "rejected", "failed"):
        assert [p.name for p in list_shards(folder / outcome)] == ["part-00000.parquet", "part-00003.parquet"]


def test_assemble_refuses_a_corrupt_input_before_writing(world: dict[str, Path], tmp_path: Path) -> None:
    """D' is resharded from all inputs at once, so one unreadable input stops it whole."""
    kept = tmp_path / "kept"
    shutil.copytree(world["kept"], kept)
    _truncate(kept / "part-00001.parquet")
    with pytest.raises(Exception, match="part-00001.parquet") as info:
        run_assemble([world["human"], kept], tmp_path / "assemble", AssembleConfig(rows_per_shard=7, execution=EXECUTION))
    assert str(kept) in str(info.value)
    assert not list((tmp_path / "assemble").rglob("part-*.parquet"))


# ----------------------------------------------------------------------------- checkpoints


def _model_copy(world: dict[str, Path], tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(world["model"], folder)
    return folder


def _edit_weights(folder: Path, edit) -> None:
    weights = load_file(str(folder / "model.safetensors"))
    save_file(edit(dict(weights)), str(folder / "model.safetensors"))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda w: {k: v for k, v in w.items() if k != "itm_head.weight"}, r"missing \['itm_head.weight'\]"),
        (lambda w: {**w, "stowaway.weight": w["itm_head.weight"].clone()}, r"unexpected \['stowaway.weight'\]"),
    ],
    ids=["missing-tensor", "extra-tensor"],
)
def test_checkpoint_with_missing_or_extra_tensors_is_named(world, tmp_path: Path, edit, message: str) -> None:
    folder = _model_copy(world, tmp_path)
    _edit_weights(folder, edit)
    with pytest.raises(ValueError, match=message) as info:
        run_caption([world["web"]], tmp_path / "caption", folder, CAPTION)
    assert str(folder / "model.safetensors") in str(info.value)
    assert not (tmp_path / "caption").exists()  # refused before any folder was made


def test_checkpoint_whose_config_does_not_match_is_named(world, tmp_path: Path) -> None:
    folder = _model_copy(world, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["med"]["text"]["intermediate_size"] *= 2
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="tensors do not match") as info:
        blip_core.load(folder)
    assert str(folder / "config.json") in str(info.value) and str(folder / "model.safetensors") in str(info.value)


def test_truncated_weights_file_is_named(world, tmp_path: Path) -> None:
    folder = _model_copy(world, tmp_path)
    _truncate(folder / "model.safetensors")
    with pytest.raises(ValueError, match="not a readable safetensors file") as info:
        run_filter([world["web"]], tmp_path / "filter", folder, FILTER)
    assert str(folder / "model.safetensors") in str(info.value)


def test_resume_from_a_damaged_training_checkpoint_names_the_file(world, tmp_path: Path) -> None:
    from blip_core.train.checkpoint import latest_checkpoint
    from tasks.train import train_stage

    out = tmp_path / "train"
    options = {"max_steps": 2, "batch_size": 4, "checkpoint_every": 2, "warmup_steps": 1, "progress": False, "device": "cpu"}
    train_stage(out, [world["human"]], "finetune-filter", init=world["model"], augment=False, **options)
    checkpoint = latest_checkpoint(out / "checkpoints")
    weights = load_file(str(checkpoint / "model.safetensors"))
    weights.pop(sorted(weights)[0])
    save_file(weights, str(checkpoint / "model.safetensors"))
    shutil.rmtree(out / "final")
    with pytest.raises(Exception, match="missing") as info:
        train_stage(out, [world["human"]], "finetune-filter", init=world["model"], augment=False, **options)
    assert str(checkpoint / "model.safetensors") in str(info.value)
    assert not (out / "final").exists()
