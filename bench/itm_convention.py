"""ITM first token, ours vs transformers (issue 16): the per-pair match probability with
`[ENC]` first (BLIP's convention, the filter's default) and with `[CLS]` first (what
transformers' `BlipProcessor` + `BlipForImageTextRetrieval` does, and so Data-Juicer), on
the same weights, images and captions.

Weights are random: as initialised (`init`) and, for tiny, with every matrix scaled x3
(`x3`, the sharper model `bench/model_vs_transformers.py` uses). Each image has two
captions. Also counted: pairs whose keep / reject at threshold 0.5 differs between the
two. Check: our `[CLS]`-first probability against transformers' own model holding the same weights
(`blip_core.hf.to_hf_model`), largest absolute difference.

Usage: PYTHONPATH=. python bench/itm_convention.py [--presets tiny base] [--images N ...] [--threads T]
"""

from __future__ import annotations

import argparse
import warnings

import torch

from blip_core.config import preset
from blip_core.hf import to_hf_model
from blip_core.med import MED

warnings.filterwarnings("ignore")
THRESHOLD = 0.5  # BLIP's filter threshold: pairs whose keep / reject flips with the convention
# base x3 is left out: its 12 text layers saturate, every caption of an image gets the same
# probability (the text no longer matters), so both conventions agree trivially
SCALES = {"tiny": (1.0, 3.0)}
CAPTION_TOKENS = 24  # web captions; the synthetic ones are 16


def _captions(cfg, n_images: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two captions per image (B*2, T): random word ids, [SEP]-terminated; first token set later."""
    t = cfg.text
    ids = torch.randint(t.eos_token_id + 1, t.bos_token_id, (2 * n_images, CAPTION_TOKENS), generator=g)
    ids[:, -1] = t.eos_token_id
    mask = torch.ones_like(ids)
    mask[1::2, 16:] = 0
    ids[1::2, 16:] = t.pad_token_id
    ids[1::2, 15] = t.eos_token_id
    return ids, mask


@torch.inference_mode()
def bench(name: str, scale: float, n_images: int) -> dict[str, object]:
    torch.manual_seed(0)
    cfg = preset(name)
    model = MED(cfg).eval()
    if scale != 1:
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(scale)
    hf = to_hf_model(model, "retrieval").eval()
    g = torch.Generator().manual_seed(1)
    size = cfg.vision.image_size
    pixels = torch.randn(n_images, 3, size, size, generator=g)
    ids, mask = _captions(cfg, n_images, g)
    index = torch.arange(n_images).repeat_interleave(2)
    enc_ids, cls_ids = ids.clone(), ids.clone()
    enc_ids[:, 0], cls_ids[:, 0] = cfg.text.enc_token_id, cfg.text.cls_token_id
    p_enc = model.itm_probability(pixels, enc_ids, mask, image_index=index)
    p_cls = model.itm_probability(pixels, cls_ids, mask, image_index=index)
    p_hf = hf(input_ids=cls_ids, pixel_values=pixels[index], attention_mask=mask, use_itm_head=True).itm_score
    diff = (p_enc - p_cls).abs()
    return {
        "preset": name, "weights": "init" if scale == 1 else f"x{scale:g}", "pairs": len(ids),
        "max": float(diff.max()), "mean": float(diff.mean()),
        "enc_mean": float(p_enc.mean()), "cls_mean": float(p_cls.mean()),
        "flipped": int(((p_enc >= THRESHOLD) != (p_cls >= THRESHOLD)).sum()),
        "check": float((p_cls - p_hf.softmax(-1)[:, 1]).abs().max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "base"])
    parser.add_argument("--images", nargs="+", type=int, default=None, help="images per preset (default tiny 128, base 8)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    defaults = {"tiny": 128, "base": 8}
    images = args.images or [defaults.get(p, 4) for p in args.presets]
    print("| preset | weights | pairs | max abs diff | mean abs diff | mean P(match) enc / cls | decision flipped at 0.5 | cls vs transformers |")
    print("|---|---|---:|---:|---:|---|---:|---|")
    for name, n in zip(args.presets, images):
        for scale in SCALES.get(name, (1.0,)):
            r = bench(name, scale, n)
            print(f"| {r['preset']} | {r['weights']} | {r['pairs']} | {r['max']:.4f} | {r['mean']:.4f} | "
                  f"{r['enc_mean']:.3f} / {r['cls_mean']:.3f} | {r['flipped']} | max abs diff {r['check']:.1e} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
