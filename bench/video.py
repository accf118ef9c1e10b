"""Zero-shot video: batched frame encoding vs a per-frame loop, and the demo's models on clips.

    PYTHONPATH=. python bench/video.py --clips 64 --frames 8 --threads 1
    PYTHONPATH=. python bench/video.py --run /work/wt/video-demo --threads 1   # + the zero-shot table

Table 1 (throughput): the same synthetic clips (drifting shapes, `data.synth_video`) through
`tasks.video_eval.embed_video_set` (every frame of `--batch` clips in one vision-encoder call)
and through a reference loop that encodes one frame per call, in one run; the ratio is the
speed-up, and both must give the same video features. Decoding (PyAV, seeking) is timed
on the clips' encoded bytes. Model: `--model DIR`, else a random tiny MED at 32 px.

Table 2 (with `--run RUN`): the run's final and pretrain (no C/F) models on the run's
synthetic clips (``RUN/world/videos``, written by the demo) at 1 and `--frames` frames:
t2v / v2t R@1/5 (scene hits), next to the image R@1 of ``RUN/eval/metrics.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def _model(path: str | None):
    import blip_core
    from blip_core.config import preset
    from blip_core.med import MED
    from blip_core.tokenizer import build_tokenizer

    if path:
        return blip_core.load(Path(path)).model
    torch.manual_seed(0)
    tok = build_tokenizer(["a red circle on the left", "two shapes"] * 4, vocab_size=64)
    return MED(preset("tiny").with_tokenizer(tok)).eval()


def _clips(n: int, frames: int, size: int) -> tuple[torch.Tensor, list[bytes]]:
    """(n, frames, 3, S, S) uint8 clips of the shapes world, and each clip encoded (h264 lossless)."""
    from blip_core.image import ImageTransform
    from data.synth_video import VideoWorldConfig, clip_scene_and_frames
    from data.video import encode_video
    from PIL import Image

    cfg, transform = VideoWorldConfig(frames=frames), ImageTransform(size)
    pixels, encoded = [], []
    for i in range(n):
        _, arrays = clip_scene_and_frames(i, cfg)
        pixels.append(torch.stack([transform.pixels(Image.fromarray(a)) for a in arrays]))
        encoded.append(encode_video(arrays, 8, cfg.codec))
    return torch.stack(pixels), encoded


@torch.no_grad()
def _per_frame_loop(model, pixels: torch.Tensor) -> torch.Tensor:
    """The reference: one vision-encoder call per frame, then BLIP's mean of projections."""
    import torch.nn.functional as F

    from blip_core.image import normalise

    out = []
    for clip in pixels:
        cls = [model.encode_image(normalise(frame[None]))[:, 0] for frame in clip]  # n x (1, Dv)
        out.append(F.normalize(model.vision_proj(torch.cat(cls)).mean(0), dim=-1))
    return torch.stack(out)


def _best(fn, repeats: int) -> tuple[float, object]:
    best, value = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - start)
    return best, value


def throughput(args: argparse.Namespace) -> None:
    from data.video import sample_frames
    from tasks.video_eval import VideoSet, embed_video_set

    model = _model(args.model)
    size = model.config.vision.image_size
    pixels, encoded = _clips(args.clips, args.frames, size)
    videos = VideoSet([str(i) for i in range(args.clips)], pixels, ["x"], ["0"])
    embed_video_set(model, videos, args.batch)  # warm up
    t_batched, (batched, _) = _best(lambda: embed_video_set(model, videos, args.batch), args.repeats)
    t_loop, looped = _best(lambda: _per_frame_loop(model, pixels), args.repeats)
    t_decode, _ = _best(lambda: [sample_frames(b, args.frames) for b in encoded], 1)
    agree = torch.allclose(batched, looped, atol=1e-4)
    n = args.clips
    print(f"\n{n} clips x {args.frames} frames at {size} px, {torch.get_num_threads()} threads, "
          f"batch {args.batch} clips; features agree: {agree}\n")  # fmt: skip
    print("| path | seconds | videos/s | frames/s |")
    print("|---|---|---|---|")
    print(f"| batched (one encoder call per {args.batch} clips) | {t_batched:.3f} | {n / t_batched:.0f} | {n * args.frames / t_batched:.0f} |")
    print(f"| per-frame loop (reference) | {t_loop:.3f} | {n / t_loop:.0f} | {n * args.frames / t_loop:.0f} |")
    print(f"| speed-up | | {t_loop / t_batched:.1f}x | |")
    print(f"| decode (PyAV, seeking, h264-lossless mp4) | {t_decode:.3f} | {n / t_decode:.0f} | {n * args.frames / t_decode:.0f} |")


def zero_shot_table(args: argparse.Namespace) -> None:
    from data.layout import MODEL_ENTRY, RunLayout
    from tasks.video_eval import VideoEvalConfig, evaluate_video_models

    layout = RunLayout(Path(args.run))
    models = {name: layout.current(MODEL_ENTRY + name) for name in ("pretrain", "final")}
    models = {k: v for k, v in models.items() if v is not None}
    clips = layout.world / "videos"
    metrics = layout.metrics
    image = json.loads(metrics.read_text()).get("retrieval", {}) if metrics.is_file() else {}
    print(f"\nzero-shot video on {clips} (scene hits), models of {args.run}\n")
    print("| model | frames | clips | t2v R@1 | t2v R@5 | t2v R@10 | v2t R@1 | v2t R@5 | ITC-only t2v R@1 | image IR@1 | image TR@1 | s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for frames in sorted({1, args.frames}):
        cfg = VideoEvalConfig(frames=frames, captions=False, device="cpu")
        start = time.perf_counter()
        result = evaluate_video_models(models, [clips], None, clips, cfg)
        seconds = (time.perf_counter() - start) / max(1, len(models))
        for name, r in result["models"].items():
            ret, itc = r["retrieval"], r["retrieval_itc"]
            img = image if name == "final" else {}
            print(f"| {name} | {frames} | {r['n_videos']} | {ret['t2v_R@1']:.1f} | {ret['t2v_R@5']:.1f} | "
                  f"{ret['t2v_R@10']:.1f} | {ret['v2t_R@1']:.1f} | {ret['v2t_R@5']:.1f} | {itc['t2v_R@1']:.1f} | "
                  f"{img.get('IR@1', float('nan')):.1f} | {img.get('TR@1', float('nan')):.1f} | {seconds:.1f} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=64)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16, help="clips per vision-encoder call")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--model", default=None, help="a model folder (default: random tiny MED)")
    parser.add_argument("--run", default=None, help="a demo run folder: also print the zero-shot table")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    throughput(args)
    if args.run:
        zero_shot_table(args)


if __name__ == "__main__":
    main()
