"""Captioning on the test set: generate one caption per image, score it against the
references (BLEU-4, CIDEr x 100) and, with the world's truth, against the image's scene."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from data.synth import WorldTruth
from data.synth_world import caption_is_true, caption_matches_scene
from tasks.evaluate.config import EvalConfig
from tasks.evaluate.metrics import caption_scores
from tasks.evaluate.model_inputs import model_device, pixels, tokens
from tasks.evaluate.testset import TestSet
from tasks.execution import progress_bar

PERCENT = 100.0
EXAMPLES = 5  # test captions kept in the result, generated beside the first reference


@torch.no_grad()
def generate_captions(model: Any, tokenizer: Any, test: TestSet, cfg: EvalConfig) -> list[str]:
    """One caption per test image, in `test.image_ids` order (the prompt stripped)."""
    size = cfg.image_size or model.config.vision.image_size
    device = model_device(model)
    prompt_ids = None
    if cfg.prompt:
        ids, _ = tokens(tokenizer, [cfg.prompt], "decoder", cfg.max_caption_tokens, device)
        prompt_ids = ids[0, 1 : tokenizer.prompt_length(cfg.prompt)]
    out: list[str] = []
    with progress_bar(len(test.images), "evaluate: captions", cfg.progress) as bar:
        for i in range(0, len(test.images), cfg.batch_size):
            ids = model.generate(
                pixels(test.images[i : i + cfg.batch_size], size, device), strategy=cfg.caption_strategy,
                max_length=cfg.max_caption_tokens, min_length=cfg.min_caption_tokens, num_beams=cfg.num_beams,
                prompt_ids=prompt_ids,
            )
            out += tokenizer.decode(ids.cpu(), strip_prompt=cfg.prompt)
            bar.update(ids.shape[0])
    return out


def captioning_metrics(
    model: Any, tokenizer: Any, test: TestSet, cfg: EvalConfig, truth: WorldTruth | None = None
) -> tuple[dict[str, float], list[dict[str, str]]]:
    """``BLEU-4`` / ``CIDEr`` x 100 (plus ``scene_exact`` / ``scene_true`` with `truth`), and
    a few examples (image id, generated caption, first reference)."""
    cands = dict(zip(test.image_ids, generate_captions(model, tokenizer, test, cfg), strict=True))
    refs = test.references()
    scores = caption_scores(refs, cands)
    out = {"BLEU-4": PERCENT * scores["BLEU-4"], "CIDEr": PERCENT * scores["CIDEr"]}
    if truth is not None:
        known = [(truth.scenes[i], c) for i, c in cands.items() if i in truth.scenes]
        if known:
            out["scene_exact"] = PERCENT * float(np.mean([caption_matches_scene(c, s) for s, c in known]))
            out["scene_true"] = PERCENT * float(np.mean([caption_is_true(c, s) for s, c in known]))
    examples = [{"image_id": i, "generated": cands[i], "reference": refs[i][0]} for i in test.image_ids[:EXAMPLES]]
    return out, examples
