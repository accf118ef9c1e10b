"""Video decoding (PyAV), video ingestion and the synthetic clip world."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from data.ingest_video import VideoIngestConfig, ingest_videos
from data.schema import SchemaError
from data.shards import list_shards, read_completion, read_table, write_shard
from data.synth_video import VideoWorldConfig, clip_scene_and_frames, generate_video_world, load_video_truth
from data.synth_world import RenderConfig, caption_matches_scene
from data.video import CODECS, VideoLimits, encode_video, sample_frames, sample_times


def _moving_bar(n: int, size: int = 32) -> list[np.ndarray]:
    """Frame i has a white column at x = i (its index is readable from the pixels)."""
    frames = []
    for i in range(n):
        a = np.full((size, size, 3), 60, np.uint8)
        a[:, i % size] = 255
        frames.append(a)
    return frames


def _bar_position(image) -> int:
    return int(np.asarray(image.convert("L"), dtype=np.float32).mean(axis=0).argmax())


@pytest.mark.parametrize("codec", sorted(CODECS))
def test_frames_are_sampled_uniformly_in_every_codec(codec):
    data = encode_video(_moving_bar(24), fps=8, codec=codec)  # 3 s
    decoded = sample_frames(data, 8)
    assert decoded.ok, decoded.error
    assert decoded.info is not None and decoded.info.duration_s == pytest.approx(3.0, abs=0.01)
    assert decoded.times == pytest.approx(sample_times(3.0, 8), abs=1e-3)  # 0, 3/8, 6/8, ...
    assert [_bar_position(f) for f in decoded.frames] == [0, 3, 6, 9, 12, 15, 18, 21]
    assert all(f.size == (32, 32) and f.mode == "RGB" for f in decoded.frames)


def test_a_long_video_is_sampled_by_seeking_not_by_decoding_it_all():
    frames = _moving_bar(8 * 300, size=16)  # 5 minutes at 8 fps, a keyframe every 16 frames
    data = encode_video(frames, fps=8, codec="h264", gop=16)
    decoded = sample_frames(data, 8)
    assert decoded.ok, decoded.error
    assert decoded.times == pytest.approx([i * 37.5 for i in range(8)], abs=1e-3)
    assert decoded.decoded < 8 * 20  # about one GOP per target, not 2400 frames


@pytest.mark.parametrize(
    "data, kind",
    [(b"", "empty"), (b"\x00" * 2000, "undecodable"), (b"<!doctype html><html></html>", "undecodable")],
)
def test_bad_bytes_become_a_reason_not_an_exception(data, kind):
    decoded = sample_frames(data, 8)
    assert not decoded.ok and decoded.error.startswith(kind + ":")


def test_limits_and_truncation_are_reasons():
    data = encode_video(_moving_bar(80), fps=8, codec="vp9")  # 10 s
    assert sample_frames(data, 4, VideoLimits(max_duration_s=5)).error.startswith("too_long:")
    assert sample_frames(data, 4, VideoLimits(max_bytes=100)).error.startswith("too_large:")
    assert sample_frames(data, 4, VideoLimits(max_frame_pixels=100)).error.startswith("too_large:")
    cut = sample_frames(data[: len(data) // 2], 4)
    assert cut.error.split(":")[0] in ("truncated", "undecodable")


def test_videos_schema_is_checked(tmp_path):
    with pytest.raises(SchemaError):
        write_shard(pa.table({"key": ["a"], "status": ["ok"]}), tmp_path / "part-00000.parquet", "videos")


def _folder_of_videos(root):
    root.mkdir()
    (root / "a.mp4").write_bytes(encode_video(_moving_bar(16), codec="h264"))
    (root / "b.webm").write_bytes(encode_video(_moving_bar(16), codec="vp9"))
    (root / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x17" * 500)
    return root


def test_ingest_videos_accounts_for_every_row(tmp_path):
    root = _folder_of_videos(tmp_path / "clips")
    rows = [("a.mp4", "a bar moves"), ("a.mp4", "a white bar"), ("b.webm", "a bar again"), ("broken.mp4", "x"),
            ("gone.mp4", "y")]  # fmt: skip
    (root / "captions.jsonl").write_text("".join(json.dumps({"path": p, "caption": c}) + "\n" for p, c in rows))
    out = tmp_path / "out"
    stats = ingest_videos(root, out, VideoIngestConfig(rows_per_shard=3))
    assert (stats.input, stats.ok, stats.failed) == (5, 3, 2)
    assert stats.failures == {"file_not_found": 1, "undecodable": 1}
    table = pa.concat_tables([read_table(p, "videos") for p in list_shards(out)])
    assert table.column("caption").to_pylist() == [c for _, c in rows]
    by_key = {r["caption"]: r for r in table.to_pylist()}
    assert by_key["a bar moves"]["video_id"] == by_key["a white bar"]["video_id"] != by_key["a bar again"]["video_id"]
    assert by_key["a bar again"]["codec"] == "vp9" and by_key["a bar moves"]["codec"] == "h264"
    assert by_key["x"]["status"] == "failed" and by_key["x"]["video"] is None
    assert read_completion(list_shards(out)[0]).counts == {"input": 3, "ok": 3, "failed": 0}
    again = ingest_videos(root / "captions.jsonl", out, VideoIngestConfig(rows_per_shard=3))
    assert (again.shards_written, again.shards_skipped, again.input) == (0, 2, 5)


def test_ingest_reads_msrvtt_annotations(tmp_path):
    root = tmp_path / "msrvtt"
    root.mkdir()
    for vid in ("video0", "video1"):
        (root / f"{vid}.mp4").write_bytes(encode_video(_moving_bar(8), codec="h264"))
    ann = {"videos": [{"video_id": "video0", "id": 0}, {"video_id": "video1", "id": 1}],
           "sentences": [{"caption": "first", "video_id": "video0", "sen_id": 0},
                         {"caption": "second", "video_id": "video0", "sen_id": 1},
                         {"caption": "third", "video_id": "video1", "sen_id": 2}]}  # fmt: skip
    (root / "test_videodatainfo.json").write_text(json.dumps(ann))
    stats = ingest_videos(root, tmp_path / "out")
    assert (stats.input, stats.ok) == (3, 3)
    table = read_table(list_shards(tmp_path / "out")[0], "videos")
    assert table.column("video_id").to_pylist() == ["video-video0", "video-video0", "video-video1"]


def test_synthetic_clips_drift_and_keep_their_scene_true(tmp_path):
    cfg = VideoWorldConfig(clips=6, frames=8, captions=3, render=RenderConfig(image_size=32))
    scene, frames = clip_scene_and_frames(0, cfg)
    assert len(frames) == 8 and frames[0].shape == (32, 32, 3)
    still = VideoWorldConfig(clips=6, frames=8, render=RenderConfig(image_size=32, pixel_noise=0.0))
    _, clean = clip_scene_and_frames(0, still)
    assert (clean[0] != clean[-1]).any(axis=-1).sum() > 10  # the shapes moved, not only the noise
    assert len(np.unique(clean[0].reshape(-1, 3), axis=0)) == len(np.unique(clean[-1].reshape(-1, 3), axis=0))
    result = generate_video_world(tmp_path / "videos", cfg)
    assert (result.clips, result.rows, result.shards_written) == (6, 18, 1)
    truth = load_video_truth(tmp_path / "videos")
    table = read_table(list_shards(tmp_path / "videos")[0], "videos")
    for row in table.to_pylist():
        assert caption_matches_scene(row["caption"], truth[row["video_id"]])
        assert sample_frames(row["video"], 4).ok
    assert generate_video_world(tmp_path / "videos", cfg).shards_skipped == 1
