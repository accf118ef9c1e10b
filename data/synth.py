"""`capfilt synth OUT`: write the synthetic world's pair shards, its truth and its URL list.

Layout written under OUT (deterministic per seed; a rerun rewrites only shards whose
completion record does not match, and identical bytes either way):

```
OUT/human/part-NNNNN.parquet (+ .done.json)   kind pairs, source human, correct captions
OUT/web/part-NNNNN.parquet                    kind pairs, source web, noisy captions
OUT/test/part-NNNNN.parquet                   kind pairs, source human, k captions per image
OUT/truth/scenes.parquet                      image_id -> scene (evaluation only)
OUT/truth/web_captions.parquet                web key -> caption kind (evaluation only)
OUT/truth/world.json                          settings and counts
OUT/www/images/*.png, OUT/web_urls.parquet    with as_urls: the web set as a crawl sees it
```

No pipeline stage reads `truth/`; evaluation does, through `load_truth`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from data.defaults import DEFAULT_BASE_URL
from data.shards import (
    CompletionRecord,
    is_complete,
    settings_hash,
    shard_name,
    parquet_bytes,
    write_if_changed,
    write_completion,
    write_shard,
)
from data.synth_world import (
    CAPTION_KINDS,
    RenderConfig,
    Scene,
    correct_captions,
    junk_caption,
    render_scene,
    sample_scene,
    weak_captions,
)

SPLITS = ("human", "web", "test")
_SPLIT_CODE = {"human": 1, "web": 2, "test": 3, "kinds": 4, "captions": 5, "extras": 6}
URL_LIST_NAME = "web_urls.parquet"
# Kinds of the extra URL-list rows that cannot yield an image (with as_urls).
BROKEN_KINDS = ("missing", "corrupt", "html")


@dataclass(frozen=True)
class SynthConfig:
    """Sizes and noise rates of the synthetic world."""

    seed: int = 0
    human_images: int = 1000
    human_captions: int = 1  # correct captions per human image (one row each)
    # Share of human captions that are true but vague (a weak caption instead of a full one),
    # as some COCO captions are; 0 keeps every human caption fully specified.
    human_vague_rate: float = 0.0
    web_images: int = 4000
    test_images: int = 500
    test_captions: int = 5  # correct captions per test image (one row each, shared image_id)
    two_shape_rate: float = 0.5  # fraction of images with two shapes and a relation
    # Web caption kinds, in CAPTION_KINDS order: correct, weak (true but vague), swapped, junk.
    web_rates: tuple[float, float, float, float] = (0.25, 0.35, 0.20, 0.20)
    rows_per_shard: int = 1000
    render: RenderConfig = field(default_factory=RenderConfig)
    # with as_urls: extra URL-list rows per broken kind (404, truncated PNG, HTML page)
    broken_per_kind: int = 2

    def __post_init__(self) -> None:
        if len(self.web_rates) != len(CAPTION_KINDS) or abs(sum(self.web_rates) - 1.0) > 1e-6:
            raise ValueError(f"web_rates must be {len(CAPTION_KINDS)} rates {CAPTION_KINDS} summing to 1, got {self.web_rates}")
        if not 0.0 <= self.human_vague_rate <= 1.0:
            raise ValueError(f"human_vague_rate must be in [0, 1], got {self.human_vague_rate}")
        if self.test_captions > 5 or self.human_captions > 5:
            raise ValueError("at most 5 captions per image: one-shape scenes have 5 correct phrasings")


@dataclass
class SplitData:
    """One split in memory: per image its id, scene and PNG bytes; per row its caption."""

    image_ids: list[str]
    scenes: list[Scene]
    pngs: list[bytes]
    rows: list[tuple[str, int, str]]  # (key, image index, caption)
    kinds: list[str] | None = None  # web only: caption kind per row


@dataclass
class SynthResult:
    """What `generate_world` wrote: rows per split, shards written / skipped."""

    rows: dict[str, int]
    shards_written: int
    shards_skipped: int
    kind_counts: dict[str, int]
    url_list: Path | None = None


def world_settings(cfg: SynthConfig) -> dict[str, Any]:
    """The settings a world records and is hashed by. Fields added later appear only when set
    away from their default, so worlds written before them stay complete, byte for byte."""
    values = dataclasses.asdict(cfg)
    if values["human_vague_rate"] == 0.0:
        del values["human_vague_rate"]
    return values


def world_hash(cfg: SynthConfig) -> str:
    """The settings hash of a world's shards and truth."""
    return settings_hash(world_settings(cfg))


def generate_world(out: Path, cfg: SynthConfig, as_urls: bool = False, base_url: str = DEFAULT_BASE_URL) -> SynthResult:
    """Generate the world and write it under `out` (layout in the module docstring).

    Safe to rerun: generation is a pure function of `cfg`, and shards whose completion
    record matches (same split slice, same settings) are left as they are.
    """
    out = Path(out)
    splits = {name: build_split(name, cfg) for name in SPLITS}
    written = skipped = 0
    settings = world_hash(cfg)
    for name, split in splits.items():
        w, s = _write_split(out / name, name, split, cfg, settings)
        written, skipped = written + w, skipped + s
    _write_truth(out / "truth", splits, cfg)
    web = splits["web"]
    assert web.kinds is not None
    kind_counts = {kind: web.kinds.count(kind) for kind in CAPTION_KINDS}
    url_list = write_www(out, web, cfg, base_url) if as_urls else None
    rows = {name: len(split.rows) for name, split in splits.items()}
    return SynthResult(rows=rows, shards_written=written, shards_skipped=skipped, kind_counts=kind_counts, url_list=url_list)


def build_split(name: str, cfg: SynthConfig) -> SplitData:
    """Scenes, images and captions of one split, deterministic in (cfg.seed, name)."""
    n_images = {"human": cfg.human_images, "web": cfg.web_images, "test": cfg.test_images}[name]
    scenes, pngs = _render_split(name, n_images, cfg)
    image_ids = [f"{name}-{i:06d}" for i in range(n_images)]
    rng = np.random.default_rng([cfg.seed, _SPLIT_CODE["captions"], _SPLIT_CODE[name]])
    if name == "web":
        kinds = _assign_kinds(n_images, cfg)
        rows = [(f"{image_ids[i]}-0", i, _web_caption(i, kinds[i], scenes, rng)) for i in range(n_images)]
        return SplitData(image_ids, scenes, pngs, rows, kinds)
    per_image = cfg.test_captions if name == "test" else cfg.human_captions
    vague_rate = cfg.human_vague_rate if name == "human" else 0.0
    vague_rng = np.random.default_rng([cfg.seed, _SPLIT_CODE["captions"], _SPLIT_CODE[name], 1])  # own stream
    rows = []
    for i, scene in enumerate(scenes):
        phrasings = correct_captions(scene)
        for j, pick in enumerate(rng.choice(len(phrasings), size=per_image, replace=False)):
            caption = phrasings[int(pick)]
            if vague_rate and vague_rng.random() < vague_rate:
                vague = weak_captions(scene)
                caption = vague[int(vague_rng.integers(len(vague)))]
            rows.append((f"{image_ids[i]}-{j}", i, caption))
    return SplitData(image_ids, scenes, pngs, rows)


def _render_split(name: str, n_images: int, cfg: SynthConfig) -> tuple[list[Scene], list[bytes]]:
    scenes: list[Scene] = []
    pngs: list[bytes] = []
    for i in range(n_images):
        rng = np.random.default_rng([cfg.seed, _SPLIT_CODE[name], i])  # per image: order-free
        scene = sample_scene(rng, cfg.two_shape_rate)
        scenes.append(scene)
        pngs.append(_png(render_scene(scene, rng, cfg.render)))
    return scenes, pngs


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _assign_kinds(n: int, cfg: SynthConfig) -> list[str]:
    """Exactly round(rate * n) rows of each kind (remainder to 'correct'), shuffled."""
    counts = [int(round(rate * n)) for rate in cfg.web_rates]
    counts[0] += n - sum(counts)
    kinds = [kind for kind, count in zip(CAPTION_KINDS, counts) for _ in range(count)]
    order = np.random.default_rng([cfg.seed, _SPLIT_CODE["kinds"]]).permutation(n)
    return [kinds[int(i)] for i in order]


def _web_caption(index: int, kind: str, scenes: list[Scene], rng: np.random.Generator) -> str:
    scene = scenes[index]
    if kind == "correct":
        options = correct_captions(scene)
    elif kind == "weak":
        options = weak_captions(scene)
    elif kind == "swapped":
        other = _other_scene(index, scenes, rng)
        options = correct_captions(other) if other is not None else (junk_caption(rng),)
    else:
        return junk_caption(rng)
    return options[int(rng.integers(len(options)))]


def _other_scene(index: int, scenes: list[Scene], rng: np.random.Generator) -> Scene | None:
    """The scene of a random other image that differs from this image's scene."""
    for _ in range(100):
        other = scenes[int(rng.integers(len(scenes)))]
        if other != scenes[index]:
            return other
    return None


# ---------------------------------------------------------------- writing


def _write_split(folder: Path, name: str, split: SplitData, cfg: SynthConfig, settings: str) -> tuple[int, int]:
    """Write a split's rows as pairs shards of `cfg.rows_per_shard`; returns (written, skipped)."""
    written = skipped = 0
    size = max(1, cfg.rows_per_shard)
    for index, start in enumerate(range(0, len(split.rows), size)):
        rows = split.rows[start : start + size]
        path = folder / shard_name(index)
        fingerprint = settings_hash({"split": name, "shard": index, "first": rows[0][0], "rows": len(rows)})
        if is_complete(path, fingerprint, settings):
            skipped += 1
            continue
        write_shard(_pairs_table(name, split, rows, cfg), path, "pairs")
        counts = {"input": len(rows), "ok": len(rows), "failed": 0}
        write_completion(path, CompletionRecord(path.name, "pairs", counts, fingerprint, settings, {"split": name}))
        written += 1
    return written, skipped


def _pairs_table(name: str, split: SplitData, rows: list[tuple[str, int, str]], cfg: SynthConfig) -> pa.Table:
    pngs = [split.pngs[i] for _, i, _ in rows]
    size = cfg.render.image_size
    n = len(rows)
    return pa.table(
        {
            "key": pa.array([key for key, _, _ in rows], pa.string()),
            "image_id": pa.array([split.image_ids[i] for _, i, _ in rows], pa.string()),
            "source": pa.array(["web" if name == "web" else "human"] * n, pa.string()),
            "caption": pa.array([caption for _, _, caption in rows], pa.string()),
            "jpg": pa.array(pngs, pa.binary()),
            "width": pa.array([size] * n, pa.int32()),
            "height": pa.array([size] * n, pa.int32()),
            "sha256": pa.array([hashlib.sha256(b).hexdigest() for b in pngs], pa.string()),
            "status": pa.array(["ok"] * n, pa.string()),
        }
    )


def _write_parquet(table: pa.Table, path: Path) -> None:
    write_if_changed(path, parquet_bytes(table))


def _write_text(text: str, path: Path) -> None:
    write_if_changed(path, text)


def _write_truth(folder: Path, splits: dict[str, SplitData], cfg: SynthConfig) -> None:
    """Scenes of every image and the kind of every web caption (evaluation only)."""
    image_ids, split_names, scene_json, n_shapes, canonical = [], [], [], [], []
    for name, split in splits.items():
        for image_id, scene in zip(split.image_ids, split.scenes):
            image_ids.append(image_id)
            split_names.append(name)
            scene_json.append(scene.to_json())
            n_shapes.append(len(scene.things))
            canonical.append(correct_captions(scene)[0])
    scenes = pa.table(
        {
            "image_id": image_ids,
            "split": split_names,
            "n_shapes": pa.array(n_shapes, pa.int32()),
            "scene": scene_json,
            "canonical_caption": canonical,
        }
    )
    _write_parquet(scenes, folder / "scenes.parquet")
    web = splits["web"]
    assert web.kinds is not None
    kinds = pa.table(
        {
            "key": [key for key, _, _ in web.rows],
            "image_id": [web.image_ids[i] for _, i, _ in web.rows],
            "kind": web.kinds,
            "caption": [caption for _, _, caption in web.rows],
        }
    )
    _write_parquet(kinds, folder / "web_captions.parquet")
    world = {
        "config": world_settings(cfg),
        "settings_hash": world_hash(cfg),
        "rows": {name: len(split.rows) for name, split in splits.items()},
        "web_kinds": {kind: web.kinds.count(kind) for kind in CAPTION_KINDS},
        "noisy_kinds": ["swapped", "junk"],  # what a filter should reject
    }
    _write_text(json.dumps(world, indent=2, sort_keys=True), folder / "world.json")


# ---------------------------------------------------------------- the web set as a crawl


def write_www(out: Path, web: SplitData, cfg: SynthConfig, base_url: str = DEFAULT_BASE_URL) -> Path:
    """Lay the web images out as files under ``OUT/www`` and write the URL list.

    Besides every web image, the list holds `cfg.broken_per_kind` rows of each
    BROKEN_KINDS: a URL with no file (404), a truncated PNG and an HTML page, so an
    ingestion shows each failure. Their truth goes to ``truth/url_extras.parquet``.
    Returns the URL list's path (``OUT/web_urls.parquet``, see `write_url_list`).
    """
    www = Path(out) / "www"
    (www / "images").mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, str]] = []
    for key, i, caption in web.rows:
        rel = f"images/{web.image_ids[i]}.png"
        write_if_changed(www / rel, web.pngs[i])
        rows.append({"key": key, "image_id": web.image_ids[i], "caption": caption, "path": rel})
    extras = _broken_rows(www, web, cfg)
    rows += [{"key": key, "image_id": key, "caption": caption, "path": rel} for key, caption, rel, _ in extras]
    _write_parquet(
        pa.table({"key": [k for k, _, _, kind in extras], "kind": [kind for _, _, _, kind in extras]}),
        Path(out) / "truth" / "url_extras.parquet",
    )
    return write_url_list(Path(out), base_url, rows)


def _broken_rows(www: Path, web: SplitData, cfg: SynthConfig) -> list[tuple[str, str, str, str]]:
    """(key, caption, path, kind) rows that cannot give an image; writes their files."""
    rng = np.random.default_rng([cfg.seed, _SPLIT_CODE["extras"]])
    rows = []
    for j in range(cfg.broken_per_kind):
        sample = web.pngs[j % max(1, len(web.pngs))] if web.pngs else b""
        caption = correct_captions(web.scenes[j % len(web.scenes)])[0] if web.scenes else junk_caption(rng)
        rows.append((f"web-missing-{j}", caption, f"images/missing-{j}.png", "missing"))
        corrupt = f"images/corrupt-{j}.png"
        write_if_changed(www / corrupt, sample[: len(sample) // 2])
        rows.append((f"web-corrupt-{j}", caption, corrupt, "corrupt"))
        page = f"pages/offer-{j}.html"
        write_if_changed(www / page, b"<!doctype html><html><body><h1>Deals!</h1></body></html>\n")
        rows.append((f"web-html-{j}", junk_caption(rng), page, "html"))
    return rows


def write_url_list(out: Path, base_url: str, rows: list[dict[str, str]] | None = None) -> Path:
    """Write ``OUT/web_urls.parquet`` (key, image_id, url, caption, path) under `base_url`.

    `rows` hold key, image_id, caption and path (relative to ``OUT/www``). Called with
    only `out` and `base_url`, it rewrites the existing list for a new base: the demo
    serves ``OUT/www`` on a free port and points the list at it.
    """
    path = Path(out) / URL_LIST_NAME
    if rows is None:
        rows = pq.read_table(path, columns=["key", "image_id", "caption", "path"]).to_pylist()
    base = base_url.rstrip("/")
    table = pa.table(
        {
            "key": pa.array([r["key"] for r in rows], pa.string()),
            "image_id": pa.array([r["image_id"] for r in rows], pa.string()),
            "url": pa.array([f"{base}/{r['path']}" for r in rows], pa.string()),
            "caption": pa.array([r["caption"] for r in rows], pa.string()),
            "path": pa.array([r["path"] for r in rows], pa.string()),
        }
    )
    _write_parquet(table, path)
    return path


# ---------------------------------------------------------------- reading the truth


@dataclass
class WorldTruth:
    """The truth of a world: each image's scene, each web row's caption kind."""

    scenes: dict[str, Scene]  # image_id -> scene
    web_kinds: dict[str, str]  # web key -> one of CAPTION_KINDS (or BROKEN_KINDS for URL extras)

    def is_noisy(self, key: str) -> bool:
        """True for web rows a filter should reject (swapped or junk captions)."""
        return self.web_kinds.get(key) in ("swapped", "junk")


def load_truth(folder: Path) -> WorldTruth:
    """Read ``truth/`` (pass the world folder or its ``truth`` folder)."""
    folder = Path(folder)
    if (folder / "truth").is_dir():
        folder = folder / "truth"
    scenes_path, kinds_path = folder / "scenes.parquet", folder / "web_captions.parquet"
    for path in (scenes_path, kinds_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no synthetic-world truth here; run `capfilt synth OUT` first")
    scenes_table = pq.read_table(scenes_path, columns=["image_id", "scene"]).to_pydict()
    scenes = {i: Scene.from_json(s) for i, s in zip(scenes_table["image_id"], scenes_table["scene"])}
    kinds_table = pq.read_table(kinds_path, columns=["key", "kind"]).to_pydict()
    kinds = dict(zip(kinds_table["key"], kinds_table["kind"]))
    extras = folder / "url_extras.parquet"
    if extras.is_file():
        extra = pq.read_table(extras).to_pydict()
        kinds.update(zip(extra["key"], extra["kind"]))
    return WorldTruth(scenes=scenes, web_kinds=kinds)
