"""Zero-shot video evaluation with a tiny random MED: synthetic clips, real encoded files
(mp4/h264, webm/vp9, a corrupt file), the CLI, and a static clip read back from disk."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

import blip_core
from blip_core.config import preset
from blip_core.image import ImageTransform
from blip_core.med import MED
from blip_core.tokenizer import build_tokenizer
from data.ingest_video import ingest_videos
from data.synth_video import VideoWorldConfig, clip_scene_and_frames, generate_video_world
from data.synth_world import RenderConfig, all_scenes, correct_captions, weak_captions
from data.video import encode_video
from tasks.video_eval import VideoEvalConfig, embed_video_set, evaluate_video_models, read_video_set

FAST = VideoEvalConfig(frames=4, rerank_k=4, caption_strategy="greedy", max_caption_tokens=8, device="cpu")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    captions = [c for s in all_scenes() for c in correct_captions(s) + weak_captions(s)]
    tok = build_tokenizer(captions, vocab_size=200)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("model")
    blip_core.save(MED(preset("tiny").with_tokenizer(tok)), tok, folder)
    return folder


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("videos")
    generate_video_world(out, VideoWorldConfig(seed=1, clips=6, frames=8, captions=2, render=RenderConfig(image_size=32)))
    return out


def _metrics_are_percentages(section: dict) -> None:
    for direction in ("t2v", "v2t"):
        for k in (1, 5, 10):
            assert 0.0 <= section[f"{direction}_R@{k}"] <= 100.0
        assert section[f"{direction}_R@1"] <= section[f"{direction}_R@5"] <= section[f"{direction}_R@10"]


def test_synthetic_clips_are_evaluated_and_a_rerun_reuses_the_result(model_dir, clips, tmp_path):
    out = tmp_path / "eval" / "video.json"
    result = evaluate_video_models({"final": model_dir}, [clips], out, clips, FAST)
    r = result["models"]["final"]
    assert (r["n_videos"], r["n_texts"], r["frames"], r["skipped"]) == (6, 12, 4, {})
    for name in ("retrieval", "retrieval_id", "retrieval_itc"):
        _metrics_are_percentages(r[name])
    assert r["retrieval"]["t2v_R@10"] == 100.0  # 6 clips: every clip is within the top 10
    assert set(r["captioning"]) == {"BLEU-4", "CIDEr", "scene_exact", "scene_true"}
    assert r["timing"]["embed_videos_per_s"] > 0
    assert json.loads(out.read_text())["models"]["final"]["fingerprint"] == r["fingerprint"]
    again = evaluate_video_models({"final": model_dir}, [clips], out, clips, FAST)
    assert again["models"]["final"]["timing"] == r["timing"]  # stored, not recomputed


def _real_folder(root: Path) -> Path:
    """Two clips of the shapes world as mp4/h264 and webm/vp9, and a corrupt .mp4."""
    root.mkdir()
    cfg = VideoWorldConfig(frames=8, render=RenderConfig(image_size=32))
    rows = []
    for i, (name, codec) in enumerate((("a.mp4", "h264"), ("b.webm", "vp9"))):
        scene, frames = clip_scene_and_frames(i, cfg)
        (root / name).write_bytes(encode_video(frames, fps=8, codec=codec))
        rows += [(name, c) for c in correct_captions(scene)[:2]]
    good = (root / "a.mp4").read_bytes()
    (root / "corrupt.mp4").write_bytes(good[:48] + bytes(len(good) - 48))
    rows.append(("corrupt.mp4", "a red circle on the left"))
    (root / "captions.csv").write_text("path,caption\n" + "".join(f"{p},{c}\n" for p, c in rows))
    return root


def test_real_encoded_files_and_a_corrupt_one(model_dir, tmp_path):
    folder = _real_folder(tmp_path / "real")
    stats = ingest_videos(folder, tmp_path / "shards")
    assert (stats.input, stats.ok, stats.failed) == (5, 4, 1)
    result = evaluate_video_models({"m": model_dir}, [tmp_path / "shards"], tmp_path / "video.json", None, FAST)
    r = result["models"]["m"]
    assert (r["n_videos"], r["n_texts"]) == (2, 4)
    assert sum(r["skipped"].values()) == 1 and set(r["skipped"]) <= {"undecodable", "truncated", "empty"}
    _metrics_are_percentages(r["retrieval"])


def test_cli_evaluate_videos_prints_and_writes(model_dir, clips, tmp_path):
    from flows.commands.evaluate import register

    app = typer.Typer()
    register(app)
    out = tmp_path / "v.json"
    args = ["evaluate", "--videos", str(clips), "--frames", "2", "--model", str(model_dir), "--out", str(out),
            "--rerank-k", "4", "--strategy", "greedy", "--device", "cpu"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    printed = json.loads(result.output[: result.output.rindex("}") + 1])
    assert printed["frames"] == 2 and printed["truth"] == str(clips)  # the world's truth, found beside the clips
    assert "t2v_R@1" in printed["retrieval"] and "v2t_R@10" in printed["retrieval"]
    assert json.loads(out.read_text())["models"]["model"]["n_videos"] == 6


def test_a_static_clip_on_disk_scores_as_its_image(model_dir, tmp_path):
    """Lossless clips of one repeated frame, decoded back: the same ITC features as the images."""
    from data.ingest_video import video_rows_table, write_videos_shard

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(3)]
    rows = [{"key": f"k{i}", "video_id": f"v{i}", "source": "human", "caption": "a red circle on the left",
             "video": encode_video([img] * 6, fps=6, codec="ffv1"), "status": "ok"} for i, img in enumerate(images)]  # fmt: skip
    shard = tmp_path / "part-00000.parquet"
    write_videos_shard(video_rows_table(rows), shard, "x", "y")
    loaded = blip_core.load(model_dir)
    videos = read_video_set([shard], FAST, 32)
    from PIL import Image

    pixels = torch.stack([ImageTransform(32)(Image.fromarray(img)) for img in images])
    with torch.no_grad():
        features, _ = embed_video_set(loaded.model, videos, batch_size=2)
        expected = loaded.model.image_features(loaded.model.encode_image(pixels))
    torch.testing.assert_close(features, expected, rtol=0, atol=1e-5)


def test_cli_evaluate_videos_refuses_a_url_in_one_line_and_writes_no_local_s3_folder(tmp_path, monkeypatch):
    from flows.commands.evaluate import register

    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["evaluate", "--videos", "s3://bucket/clips", "--model", "m"])
    assert result.exit_code == 2 and "s3://bucket/clips is a URL" in result.output  # issue 23: never ./s3:/bucket
    assert list(tmp_path.iterdir()) == []
