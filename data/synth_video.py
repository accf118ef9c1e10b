"""`capfilt synth --videos OUT`: short clips of the shapes world, for zero-shot video evaluation.

Each clip shows one scene of `data.synth_world` whose shapes drift over the clip while
the scene (so every caption of it) stays true (`render_clip`); it is encoded with PyAV
(`data.video.encode_video`, lossless H.264 in MP4 by default) and captioned with k of
the scene's correct phrasings, one row each. Layout under OUT (deterministic per seed;
clips draw from their own seed stream, so the image world's numbers never move):

```
OUT/part-NNNNN.parquet (+ .done.json)    kind videos, source human, k captions per clip
OUT/truth/video_scenes.parquet           video_id -> scene (evaluation only)
OUT/truth/video_world.json               settings and counts
```

A rerun skips shards whose completion record matches.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data.ingest_video import video_rows_table, write_videos_shard
from data.shards import is_complete, parquet_bytes, settings_hash, shard_name, write_if_changed
from data.synth_world import RenderConfig, Scene, correct_captions, render_clip, sample_scene
from data.video import CODECS, encode_video

TRUTH_FILE = Path("truth") / "video_scenes.parquet"
WORLD_FILE = Path("truth") / "video_world.json"
# Seed-stream codes of the clip world (the image world's splits use 1-6: `data.synth`).
_CLIP_CODE, _CAPTION_CODE = 7, 8


@dataclass(frozen=True)
class VideoWorldConfig:
    """Sizes of the synthetic video test set (the run config's `video.world` block)."""

    __pydantic_config__ = {"extra": "forbid"}  # a misspelt field in a run config is an error

    seed: int = 0
    clips: int = 40
    frames: int = 16  # encoded frames per clip (evaluation samples some of them)
    fps: int = 8
    captions: int = 5  # correct captions per clip (one row each, shared video_id)
    two_shape_rate: float = 0.5
    drift: float = 0.12  # how far the shapes move over a clip, in unit image coordinates
    codec: str = "h264-lossless"  # one of data.video.CODECS
    rows_per_shard: int = 1000
    render: RenderConfig = field(default_factory=RenderConfig)

    def __post_init__(self) -> None:
        if self.codec not in CODECS:
            raise ValueError(f"codec {self.codec!r} is not one of {sorted(CODECS)}")
        if not 1 <= self.captions <= 5:
            raise ValueError("captions per clip must be 1-5: one-shape scenes have 5 correct phrasings")
        if self.render.image_size % 2:
            raise ValueError("image_size must be even (4:2:0 video codecs need even sides)")


@dataclass
class VideoWorldResult:
    """What `generate_video_world` wrote."""

    clips: int
    rows: int
    shards_written: int
    shards_skipped: int


def clip_scene_and_frames(index: int, cfg: VideoWorldConfig) -> tuple[Scene, list[np.ndarray]]:
    """Clip `index`'s scene and frames, from its own generator (order-free)."""
    rng = np.random.default_rng([cfg.seed, _CLIP_CODE, index])
    scene = sample_scene(rng, cfg.two_shape_rate)
    return scene, render_clip(scene, rng, cfg.render, cfg.frames, cfg.drift)


def generate_video_world(out: Path, cfg: VideoWorldConfig | None = None) -> VideoWorldResult:
    """Write the clips, their captions and their truth under `out` (module docstring)."""
    cfg = cfg or VideoWorldConfig()
    out = Path(out)
    settings = settings_hash(dataclasses.asdict(cfg))
    per_shard = max(1, cfg.rows_per_shard // cfg.captions)  # clips per shard (a clip's rows stay together)
    scenes: list[Scene] = []
    written = skipped = rows = 0
    for index, first in enumerate(range(0, cfg.clips, per_shard)):
        clip_ids = list(range(first, min(cfg.clips, first + per_shard)))
        path = out / shard_name(index)
        fingerprint = settings_hash({"clips": clip_ids})
        if is_complete(path, fingerprint, settings):
            scenes += [sample_scene(np.random.default_rng([cfg.seed, _CLIP_CODE, i]), cfg.two_shape_rate) for i in clip_ids]
            skipped += 1
            rows += len(clip_ids) * cfg.captions
            continue
        table, shard_scenes = _clips_table(clip_ids, cfg)
        write_videos_shard(table, path, fingerprint, settings, {"split": "video-test"})
        scenes += shard_scenes
        written += 1
        rows += table.num_rows
    _write_truth(out, scenes, cfg, settings)
    return VideoWorldResult(clips=cfg.clips, rows=rows, shards_written=written, shards_skipped=skipped)


def _video_id(index: int) -> str:
    return f"video-{index:06d}"


def _clips_table(clip_ids: list[int], cfg: VideoWorldConfig) -> tuple[pa.Table, list[Scene]]:
    rows, scenes = [], []
    for i in clip_ids:
        scene, frames = clip_scene_and_frames(i, cfg)
        data = encode_video(frames, cfg.fps, cfg.codec)
        picks = np.random.default_rng([cfg.seed, _CAPTION_CODE, i]).choice(
            len(correct_captions(scene)), size=cfg.captions, replace=False
        )
        size = cfg.render.image_size
        meta = {"video": data, "duration": cfg.frames / cfg.fps, "fps": float(cfg.fps), "width": size, "height": size,
                "codec": cfg.codec, "sha256": hashlib.sha256(data).hexdigest(), "status": "ok", "source": "human"}  # fmt: skip
        for j, pick in enumerate(picks):
            caption = correct_captions(scene)[int(pick)]
            rows.append({"key": f"{_video_id(i)}-{j}", "video_id": _video_id(i), "caption": caption, **meta})
        scenes.append(scene)
    return video_rows_table(rows), scenes


def _write_truth(out: Path, scenes: list[Scene], cfg: VideoWorldConfig, settings: str) -> None:
    table = pa.table({
        "video_id": [_video_id(i) for i in range(len(scenes))],
        "scene": [s.to_json() for s in scenes],
        "canonical_caption": [correct_captions(s)[0] for s in scenes],
    })  # fmt: skip
    write_if_changed(out / TRUTH_FILE, parquet_bytes(table))  # a rerun leaves the truth untouched
    world = {"config": dataclasses.asdict(cfg), "settings_hash": settings, "clips": len(scenes)}
    write_if_changed(out / WORLD_FILE, json.dumps(world, indent=2, sort_keys=True))


def find_video_truth(folder: Path) -> Path | None:
    """The truth file of a video world (pass the world folder or its ``truth`` folder), or None."""
    folder = Path(folder)
    for candidate in (folder / TRUTH_FILE, folder / TRUTH_FILE.name):
        if candidate.is_file():
            return candidate
    return None


def load_video_truth(folder: Path) -> dict[str, Scene]:
    """video_id -> scene of a video world (evaluation only)."""
    path = find_video_truth(folder)
    if path is None:
        raise FileNotFoundError(f"{folder}: no {TRUTH_FILE}; run `capfilt synth --videos OUT` first")
    t = pq.read_table(path, columns=["video_id", "scene"]).to_pydict()
    return {v: Scene.from_json(s) for v, s in zip(t["video_id"], t["scene"])}
