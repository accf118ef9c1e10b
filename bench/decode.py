"""Reduced JPEG decode (issue 16): images/s per core, and the ITM score change it causes.

    PYTHONPATH=. python bench/decode.py --images 24 --itm-model base

Table 1: photo-like JPEGs (`data.synth_photo`, quality 90) at 1600x1200, 640x480 and
256x256, to the model size S (384 = BLIP base, 224), on one core (torch and PIL single
threaded): full decode + the exact bicubic resize (`decode_image` then
`ImageTransform.pixels`) vs reduced decode (`decode_image(reduce_to=S)`, libjpeg at
1/2-1/8 scale) + the same resize vs the stage pipeline (`tasks.image_batches.ImageStream`,
num_workers=0, decode exact and reduced: bytes out of Arrow, decode, resize, batch,
normalise; "pipeline / direct" is its rate over the bare reduced decode + resize). Best of
`--repeats` passes over the same bytes, all in one run, so the ratios compare like
with like; timed in CPU seconds of the process (one thread), so a shared machine's
neighbours do not enter the rates.

Table 2: P(match) of each image with one caption, reduced vs exact decode at 384 px, on
a random MED (`--itm-model base`: ViT-B/16 + BERT-base, the paper's CapFilt size;
`tiny`: the test model at 384 px; `none`: skip). A random model is a stand-in for
a trained one: its scores do depend on the image (the spread across images is shown).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pyarrow as pa
import torch

from blip_core.image import ImageTransform
from data.images import decode_image
from data.synth_photo import photo_jpeg

SIZES = ((1600, 1200), (640, 480), (256, 256))
TARGETS = (384, 224)
_WORDS = ["a", "red", "blue", "square", "circle", "on", "the", "grass", "dog", "two", "small", "big"]


def _best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()  # CPU seconds of this one-thread process: the work, not the neighbours
        fn()
        best = min(best, time.process_time() - start)
    return best


def _direct(images: list[bytes], size: int, reduce_to: int | None) -> None:
    transform = ImageTransform(size)
    for data in images:
        transform.pixels(decode_image(data, reduce_to=reduce_to).image)


def _pipeline(jpg: pa.Array, size: int, batch: int, decode: str = "reduced") -> None:
    from tasks.execution import ExecutionConfig
    from tasks.image_batches import image_batches, index_batches

    batches = index_batches(np.arange(len(jpg)), batch)
    execution = ExecutionConfig(num_workers=0, device="cpu")
    for _ in image_batches(jpg, batches, ImageTransform(size), execution, torch.device("cpu"), decode):
        pass


def throughput(args: argparse.Namespace) -> None:
    print(f"\nimages/s on one core ({args.images} JPEGs per size, quality 90, best of {args.repeats})\n")
    print("| source | S | full decode + resize | reduced decode + resize | pipeline (full) | pipeline (reduced) | reduced / full | pipeline / direct (reduced) | decoded size |")
    print("|---|---|---|---|---|---|---|---|---|")
    for width, height in SIZES:
        images = [photo_jpeg(i, width, height) for i in range(args.images)]
        jpg = pa.array(images, pa.binary())
        for size in TARGETS:
            full = _best(lambda: _direct(images, size, None), args.repeats)
            reduced = _best(lambda: _direct(images, size, size), args.repeats)
            pipe_full = _best(lambda: _pipeline(jpg, size, args.batch, "exact"), args.repeats)
            pipe = _best(lambda: _pipeline(jpg, size, args.batch), args.repeats)
            shown = decode_image(images[0], reduce_to=size).image.size
            n = len(images)
            print(f"| {width}x{height} | {size} | {n / full:.0f} | {n / reduced:.0f} | {n / pipe_full:.0f} | {n / pipe:.0f} | "
                  f"{full / reduced:.2f}x | {reduced / pipe:.2f} | {shown[0]}x{shown[1]} |")  # fmt: skip


def _random_model(name: str, size: int):
    from blip_core.config import preset
    from blip_core.med import MED
    from blip_core.tokenizer import build_tokenizer

    torch.manual_seed(0)
    tokenizer = build_tokenizer([" ".join(_WORDS)] * 4, vocab_size=200)
    return MED(preset(name).with_tokenizer(tokenizer).with_image_size(size)).eval(), tokenizer


@torch.no_grad()
def itm_change(args: argparse.Namespace, size: int = 384) -> None:
    from tasks.execution import ExecutionConfig
    from tasks.image_batches import image_batches, index_batches

    model, tokenizer = _random_model(args.itm_model, size)
    shapes = [(1600, 1200)] * (args.itm_images // 2) + [(640, 480)] * (args.itm_images - args.itm_images // 2)
    jpg = pa.array([photo_jpeg(100 + i, w, h) for i, (w, h) in enumerate(shapes)], pa.binary())
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(_WORDS, size=6)) for _ in shapes]
    ids, mask = tokenizer.encode(texts, mode="itm", max_length=35)
    batches = index_batches(np.arange(len(jpg)), 4)
    execution = ExecutionConfig(num_workers=0, device="cpu")
    scores = {}
    start = time.perf_counter()
    for decode in ("exact", "reduced"):
        out = []
        for rows, (pixels, _) in zip(batches, image_batches(jpg, batches, ImageTransform(size), execution, torch.device("cpu"), decode)):
            out.append(model.itm_probability(pixels, ids[rows], mask[rows]).numpy())
        scores[decode] = np.concatenate(out)
    change = np.abs(scores["reduced"] - scores["exact"])
    print(f"\nITM P(match), reduced vs exact decode, random {args.itm_model} MED at {size} px, "
          f"{args.itm_images // 2} JPEGs at 1600x1200 + {args.itm_images - args.itm_images // 2} at 640x480, "
          f"{time.perf_counter() - start:.0f} s\n")  # fmt: skip
    print("| max change | mean change | score spread across images (std) | scores in |")
    print("|---|---|---|---|")
    print(f"| {change.max():.2e} | {change.mean():.2e} | {scores['exact'].std():.2e} | "
          f"[{scores['exact'].min():.3f}, {scores['exact'].max():.3f}] |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=24, help="JPEGs per source size")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8, help="pipeline batch size")
    parser.add_argument("--itm-model", choices=("base", "tiny", "none"), default="base")
    parser.add_argument("--itm-images", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(1)
    throughput(args)
    if args.itm_model != "none":
        itm_change(args)


if __name__ == "__main__":
    main()
