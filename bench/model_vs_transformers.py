"""Ours vs transformers' BLIP on the same weights, in one run: ITM scoring and nucleus captioning.

ITM: each image has two captions (web + synthetic, as CapFilt filters them). transformers'
`BlipForImageTextRetrieval` takes one image per text, so it gets the pixels repeated;
ours encodes each image once (`image_index`). Outputs must agree within 1e-5.

Nucleus: both sample with top_p 0.9 (top_k off), repetition penalty 1.1, batched. Our
sampler draws from one generator per image, transformers' from the global one, so the
batched outputs are checked image by image against transformers run on that image alone
with `torch.manual_seed(seed_i)`: ours must give exactly those token ids.

Usage: PYTHONPATH=. python bench/model_vs_transformers.py [--presets tiny base] [--device cpu]
       [--dtype float32|bfloat16] [--itm-images N ...] [--caption-images N ...] [--threads T]
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

from blip_core.config import preset
from blip_core.hf import to_hf_model
from blip_core.med import MED

warnings.filterwarnings("ignore")
TOP_P, REP, MAX_LEN, MIN_LEN = 0.9, 1.1, 20, 5


def _race(ours, theirs, device: str, repeats: int) -> tuple[float, float, object, object]:
    """Best-of-`repeats` seconds for each, alternating runs so background load hits both alike."""
    times: dict[int, float] = {0: float("inf"), 1: float("inf")}
    outs: dict[int, object] = {}
    for _ in range(repeats):
        for i, fn in enumerate((ours, theirs)):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            outs[i] = fn()
            if device == "cuda":
                torch.cuda.synchronize()
            times[i] = min(times[i], time.perf_counter() - t0)
    return times[0], times[1], outs[0], outs[1]


def _peaky(model: MED) -> None:
    """Random init gives near-uniform next-token distributions; sharpen them so captions end."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(3)
        model.lm_head.decoder.bias[model.config.text.eos_token_id] += 4.0


def bench(name: str, device: str, dtype: torch.dtype, itm_images: int, caption_images: int, repeats: int):
    torch.manual_seed(0)
    cfg = preset(name)
    ours = MED(cfg).eval()
    _peaky(ours)
    hf_r, hf_c = to_hf_model(ours, "retrieval"), to_hf_model(ours, "captioning")
    ours, hf_r, hf_c = (m.to(device, dtype) for m in (ours, hf_r, hf_c))
    t, size = cfg.text, cfg.vision.image_size
    g = torch.Generator().manual_seed(1)
    rows = []

    # ITM: two captions per image
    pixels = torch.randn(itm_images, 3, size, size, generator=g).to(device, dtype)
    ids = torch.randint(t.eos_token_id + 1, t.bos_token_id, (2 * itm_images, 24), generator=g)
    ids[:, 0], ids[:, -1] = t.enc_token_id, t.eos_token_id
    mask = torch.ones_like(ids)
    mask[1::2, 16:] = 0  # the synthetic captions are shorter
    ids, mask = ids.to(device), mask.to(device)
    index = torch.arange(itm_images, device=device).repeat_interleave(2)
    with torch.inference_mode():
        t_ours, t_hf, p_ours, logits = _race(
            lambda: ours.itm_probability(pixels, ids, mask, image_index=index),
            lambda: hf_r(input_ids=ids, pixel_values=pixels[index], attention_mask=mask).itm_score,
            device, repeats,
        )
    diff = (p_ours.float() - logits.float().softmax(-1)[:, 1]).abs().max().item()
    rows.append((name, "ITM (2 captions/image)", itm_images / t_hf, itm_images / t_ours, f"max abs diff {diff:.1e}"))

    # nucleus captioning
    pixels = torch.randn(caption_images, 3, size, size, generator=g).to(device, dtype)
    seeds = list(range(100, 100 + caption_images))
    kw = dict(max_length=MAX_LEN, min_length=MIN_LEN, repetition_penalty=REP)
    with torch.inference_mode():
        t_ours, t_hf, caps, _ = _race(
            lambda: ours.generate(pixels, "nucleus", top_p=TOP_P, seeds=seeds, **kw),
            lambda: hf_c.generate(pixels, do_sample=True, top_p=TOP_P, top_k=0, **kw),
            device, repeats,
        )
        same = 0
        for i, seed in enumerate(seeds):
            torch.manual_seed(seed)
            ref = hf_c.generate(pixels[i : i + 1], do_sample=True, top_p=TOP_P, top_k=0, **kw)[0]
            row = caps[i]
            same += int(torch.equal(row[: ref.shape[0]], ref) and bool((row[ref.shape[0] :] == t.pad_token_id).all()))
    rows.append((name, "nucleus captioning", caption_images / t_hf, caption_images / t_ours,
                 f"identical ids {same}/{caption_images}"))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["tiny", "base"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--itm-images", type=int, nargs="+", default=[256, 4], help="per preset")
    ap.add_argument("--caption-images", type=int, nargs="+", default=[64, 4], help="per preset")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads for both sides (0: torch's default). On a shared CPU use 1: with "
                         "oversubscribed cores, small matmuls wait on each other's threads")
    ap.add_argument("--repeats", type=int, default=3, help="best of N alternating timed runs (the first warms up)")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    table = []
    for i, name in enumerate(args.presets):
        itm_n = args.itm_images[min(i, len(args.itm_images) - 1)]
        cap_n = args.caption_images[min(i, len(args.caption_images) - 1)]
        table += bench(name, args.device, dtype, itm_n, cap_n, args.repeats)
    threads = torch.get_num_threads()
    print(f"\ndevice={args.device} dtype={args.dtype} torch threads={threads} torch {torch.__version__}")
    print("| preset | workload | transformers img/s | ours img/s | speed-up | check |")
    print("|---|---|---:|---:|---:|---|")
    for name, work, hf, ours, check in table:
        print(f"| {name} | {work} | {hf:.2f} | {ours:.2f} | {ours / hf:.2f}x | {check} |")


if __name__ == "__main__":
    main()
