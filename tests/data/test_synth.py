"""The synthetic world: deterministic, schema-valid, exact rates, and a grammar that judges itself."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data.shards import is_complete, list_shards, read_completion, read_table
from data.synth import SynthConfig, generate_world, load_truth, write_url_list
from data.synth_world import (
    RenderConfig,
    Scene,
    Thing,
    all_scenes,
    caption_is_true,
    caption_kind,
    caption_matches_scene,
    correct_captions,
    render_scene,
    scene_of_caption,
    weak_captions,
)

SMALL = SynthConfig(seed=3, human_images=12, web_images=40, test_images=6, rows_per_shard=16)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("world")
    generate_world(out, SMALL, as_urls=True)
    return out


def _rows(folder: Path) -> list[dict]:
    return [row for path in list_shards(folder) for row in read_table(path, "pairs").to_pylist()]


def test_scene_space_and_canonical_relations() -> None:
    scenes = all_scenes()
    assert len(scenes) == 144 + 612
    assert len(set(scenes)) == len(scenes)
    assert all(s.relation in (None, "above", "left of") for s in scenes)


def test_grammar_judges_every_generated_caption() -> None:
    for scene in all_scenes()[::7]:
        exact = correct_captions(scene)
        assert len(exact) >= 5
        for caption in exact:
            assert caption_matches_scene(caption, scene)
            assert scene_of_caption(caption) == scene
            assert caption_kind(caption.upper() + ".", scene) == "correct"
        for caption in weak_captions(scene):
            assert caption_is_true(caption, scene)
            assert not caption_matches_scene(caption, scene)
            assert scene_of_caption(caption) is None
            assert caption_kind(caption, scene) == "weak"


def test_inverse_phrasing_matches_and_other_scenes_do_not() -> None:
    scene = Scene(things=(Thing("circle", "red"), Thing("square", "blue")), relation="above")
    assert caption_matches_scene("A blue square below a red circle.", scene)
    assert not caption_matches_scene("a blue square above a red circle", scene)
    assert caption_kind("a blue square above a red circle", scene) == "wrong"
    assert caption_kind("click here for deals", scene) == "other"
    assert caption_is_true("two shapes", scene)
    assert not caption_is_true("a red shape", scene)  # one-shape alt text is false for two shapes
    lone = Scene(things=(Thing("triangle", "orange", "small"),), position="left")
    assert caption_kind("an orange triangle on the left", lone) == "weak"  # no size: true but vague
    assert caption_matches_scene("a small orange triangle on the left", lone)  # "an" read as "a"
    assert correct_captions(lone)[0] == "a small orange triangle on the left"


def test_render_puts_the_shape_where_the_scene_says() -> None:
    rng = np.random.default_rng(0)
    cfg = RenderConfig(pixel_noise=0.0, colour_jitter=0)
    for position, half in (("left", "x<"), ("right", "x>"), ("top", "y<"), ("bottom", "y>")):
        scene = Scene(things=(Thing("square", "red", "small"),), position=position)
        img = render_scene(scene, rng, cfg).astype(int)  # (S, S, 3)
        redness = img[..., 0] - img[..., 1]
        ys, xs = np.nonzero(redness > 100)
        coord = xs.mean() if half[0] == "x" else ys.mean()
        assert (coord < 16) if half[1] == "<" else (coord > 16), position


def test_world_layout_schema_and_counts(world: Path) -> None:
    human, web, test = _rows(world / "human"), _rows(world / "web"), _rows(world / "test")
    assert len(human) == 12 and len(web) == 40 and len(test) == 6 * 5
    assert {r["source"] for r in human + test} == {"human"} and {r["source"] for r in web} == {"web"}
    keys = [r["key"] for r in human + web + test]
    assert len(set(keys)) == len(keys)
    assert all(r["status"] == "ok" and r["width"] == 32 for r in human + web + test)
    img = Image.open(io.BytesIO(web[0]["jpg"]))
    assert img.size == (32, 32) and img.mode == "RGB"
    for folder in ("human", "web", "test"):
        for path in list_shards(world / folder):
            record = read_completion(path)
            assert record is not None and record.counts["input"] == record.counts["ok"]


def test_test_set_has_five_distinct_correct_captions_per_image(world: Path) -> None:
    truth = load_truth(world)
    by_image: dict[str, list[str]] = {}
    for row in _rows(world / "test"):
        by_image.setdefault(row["image_id"], []).append(row["caption"])
    assert len(by_image) == 6
    for image_id, captions in by_image.items():
        assert len(set(captions)) == 5
        assert all(caption_matches_scene(c, truth.scenes[image_id]) for c in captions)


def test_web_kinds_have_exact_rates_and_mean_what_they_say(world: Path) -> None:
    truth = load_truth(world)
    web = _rows(world / "web")
    kinds = [truth.web_kinds[r["key"]] for r in web]
    assert {k: kinds.count(k) for k in set(kinds)} == {"correct": 10, "weak": 14, "swapped": 8, "junk": 8}
    for row, kind in zip(web, kinds):
        scene = truth.scenes[row["image_id"]]
        judged = caption_kind(row["caption"], scene)
        expected = {"correct": "correct", "weak": "weak", "swapped": "wrong", "junk": "other"}[kind]
        assert judged == expected, (row["caption"], kind)
        assert truth.is_noisy(row["key"]) == (kind in ("swapped", "junk"))


def test_same_seed_same_bytes_other_seed_differs(world: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    generate_world(again, SMALL)
    for folder in ("human", "web", "test"):
        a = [r["sha256"] + r["caption"] for r in _rows(world / folder)]
        b = [r["sha256"] + r["caption"] for r in _rows(again / folder)]
        assert a == b
    other = tmp_path / "other"
    generate_world(other, SynthConfig(**{**SMALL.__dict__, "seed": 4}))
    assert [r["sha256"] for r in _rows(other / "web")] != [r["sha256"] for r in _rows(world / "web")]


def test_rerun_skips_complete_shards(world: Path) -> None:
    before = {p: p.stat().st_mtime_ns for p in list_shards(world / "web")}
    result = generate_world(world, SMALL, as_urls=True)
    assert result.shards_written == 0 and result.shards_skipped == len(list_shards(world / "human")) + len(before) + len(
        list_shards(world / "test")
    )
    assert {p: p.stat().st_mtime_ns for p in list_shards(world / "web")} == before
    record = read_completion(list_shards(world / "web")[0])
    assert record is not None
    assert not is_complete(list_shards(world / "web")[0], record.input_fingerprint, "other-settings")


def test_url_list_points_at_files_and_broken_extras(world: Path) -> None:
    urls = pq.read_table(world / "web_urls.parquet").to_pylist()
    truth = load_truth(world)
    assert len(urls) == 40 + 3 * SMALL.broken_per_kind
    extras = [u for u in urls if truth.web_kinds[u["key"]] in ("missing", "corrupt", "html")]
    assert len(extras) == 3 * SMALL.broken_per_kind
    for u in urls:
        exists = (world / "www" / u["path"]).is_file()
        assert exists == (truth.web_kinds[u["key"]] != "missing")
    write_url_list(world, "http://127.0.0.1:9/")
    moved = pq.read_table(world / "web_urls.parquet").to_pylist()
    assert moved[0]["url"] == "http://127.0.0.1:9/" + urls[0]["path"]
    assert [m["key"] for m in moved] == [u["key"] for u in urls]


def test_vague_human_captions_are_opt_in_true_and_touch_nothing_else(world: Path, tmp_path: Path) -> None:
    import dataclasses

    vague = tmp_path / "vague"
    generate_world(vague, dataclasses.replace(SMALL, human_vague_rate=0.5), as_urls=True)
    truth = load_truth(vague)
    human = _rows(vague / "human")
    exact = [caption_matches_scene(r["caption"], truth.scenes[r["image_id"]]) for r in human]
    assert all(caption_is_true(r["caption"], truth.scenes[r["image_id"]]) for r in human)
    assert 0 < exact.count(False) < len(human)  # some vague, some full
    assert all(r["caption"] in weak_captions(truth.scenes[r["image_id"]]) for r, e in zip(human, exact) if not e)
    default = _rows(world / "human")  # the default world: every human caption full
    assert all(caption_matches_scene(r["caption"], load_truth(world).scenes[r["image_id"]]) for r in default)
    for split in ("web", "test"):  # other splits, and the human images, are the same as without vague captions
        assert _rows(vague / split) == _rows(world / split)
    assert [r["jpg"] for r in human] == [r["jpg"] for r in default]
    with pytest.raises(ValueError, match="human_vague_rate"):
        SynthConfig(human_vague_rate=1.5)
    # a world written before the field existed is still complete: its hash and truth omit the default
    from data.shards import settings_hash
    from data.synth import world_hash

    old_style = dataclasses.asdict(SMALL)
    del old_style["human_vague_rate"]
    assert world_hash(SMALL) == settings_hash(old_style) != world_hash(dataclasses.replace(SMALL, human_vague_rate=0.5))
    assert generate_world(world, SMALL, as_urls=True).shards_written == 0
