"""Caption stage: one row per (image, candidate) with provenance, text equal to a per-image
reference with the derived seed, failed rows accounted for, reruns skip, seed changes
write elsewhere."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from stage_helpers import tiny_model, web_shards

import blip_core
from blip_core.image import ImageTransform
from data.images import decode_image
from data.shards import list_shards, read_completion, read_table
from tasks.caption import CaptionConfig, run_caption
from tasks.caption import derive_seed
from tasks.execution import ExecutionConfig

EXEC = ExecutionConfig(batch_size=3, num_workers=0, progress=False)
PROMPT = "a picture of "


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> blip_core.LoadedModel:
    return blip_core.load(tiny_model(tmp_path_factory.mktemp("caption-model")))


@pytest.fixture(scope="module")
def webs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return web_shards(tmp_path_factory.mktemp("caption-in"), (4, 3), failed=(1,), garbage=(2,))


def _reference(loaded: blip_core.LoadedModel, data: bytes, key: str, cfg: CaptionConfig) -> list[str]:
    """The image alone, its seed derived from (run seed, key)."""
    pixels = ImageTransform(loaded.model.config.vision.image_size)(decode_image(data).image)[None]
    ids, mask = loaded.tokenizer.encode([PROMPT], mode="decoder")
    prompt = ids[0, 1 : int(mask.sum()) - 1]
    out = loaded.model.generate(
        pixels, strategy=cfg.strategy, max_length=cfg.max_length, min_length=cfg.min_length,
        top_p=cfg.top_p, num_captions=cfg.num_captions, seeds=[derive_seed(cfg.seed, key)], prompt_ids=prompt,
    )
    return loaded.tokenizer.decode(out[:, 1 + len(prompt) :])


def _rows(folder: Path) -> list[dict]:
    return [r for p in list_shards(folder) for r in read_table(p, "pairs").to_pylist()]


def test_candidates_provenance_and_reference_text(tmp_path: Path, loaded, webs) -> None:
    cfg = CaptionConfig(num_captions=2, max_length=12, min_length=3, execution=EXEC)
    stats = run_caption(webs, tmp_path, loaded, cfg)
    rows = _rows(stats.output)
    web = [r for p in webs for r in read_table(p, "pairs").to_pylist()]
    captioned = [w for w in web if w["status"] == "ok" and not w["jpg"].startswith(b"<html")]
    assert len(captioned) == 3
    assert len(rows) == 2 * len(captioned) == stats.totals["captions"]
    assert stats.totals == {**stats.totals, "input": 7, "kept": 3, "rejected": 0, "failed": 4, "undecodable": 2}
    by_key = {r["key"]: r for r in rows}
    for w in captioned:
        expected = _reference(loaded, w["jpg"], w["key"], cfg)
        for c in range(2):
            row = by_key[f"{w['key']}/syn{c}"]
            assert row["caption"] == expected[c]
            assert not row["caption"].startswith("a picture of")
            assert row["image_id"] == w["image_id"] and row["jpg"] == w["jpg"] and row["sha256"] == w["sha256"]
            assert (row["source"], row["candidate"], row["producer"], row["status"]) == (
                "synthetic", c, loaded.fingerprint, "ok"
            )
    for shard in stats.shards:
        counts = read_completion(stats.output / shard.shard).counts
        assert counts["kept"] + counts["rejected"] + counts["failed"] == counts["input"]


def test_rerun_skips_and_seed_change_writes_elsewhere(tmp_path: Path, loaded, webs) -> None:
    cfg = CaptionConfig(max_length=12, min_length=3, execution=EXEC)
    first = run_caption(webs, tmp_path, loaded, cfg)
    before = _rows(first.output)
    again = run_caption(webs, tmp_path, loaded, CaptionConfig(max_length=12, min_length=3, execution=ExecutionConfig(batch_size=1, num_workers=1, progress=False)))
    assert again.output == first.output and all(s.skipped for s in again.shards)
    # a fresh folder with another batch size writes the same text (per-image seeds)
    regenerated = run_caption(webs, tmp_path / "b", loaded, CaptionConfig(max_length=12, min_length=3, execution=ExecutionConfig(batch_size=2, num_workers=1, progress=False)))
    assert _rows(regenerated.output) == before
    other = run_caption(webs, tmp_path, loaded, CaptionConfig(seed=1, max_length=12, min_length=3, execution=EXEC))
    assert other.output != first.output and _rows(first.output) == before


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_deterministic_strategies(tmp_path: Path, loaded, webs, strategy: str) -> None:
    cfg = CaptionConfig(strategy=strategy, max_length=10, min_length=3, execution=EXEC)
    stats = run_caption(webs[:1], tmp_path, loaded, cfg)
    rows = _rows(stats.output)
    assert len(rows) == 2 and all(r["candidate"] == 0 for r in rows)
    assert all(isinstance(r["caption"], str) for r in rows)
    with pytest.raises(ValueError, match="greedy"):
        CaptionConfig(strategy="greedy", num_captions=2)


def test_settings_hash_ignores_execution(loaded) -> None:
    from tasks.caption import caption_settings

    cpu = torch.device("cpu")
    a = caption_settings(loaded.fingerprint, CaptionConfig(execution=EXEC), cpu)
    b = caption_settings(loaded.fingerprint, CaptionConfig(execution=ExecutionConfig(batch_size=64, num_workers=4)), cpu)
    assert a == b and a["captioner"] == loaded.fingerprint and a["top_p"] == 0.9
