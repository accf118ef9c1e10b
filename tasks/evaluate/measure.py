"""Measuring a model: retrieval and captioning on a held-out set and, with the synthetic
world's truth, the filter's and captioner's checks. Writes nothing (see `tasks.evaluate.run`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from data.synth import load_truth
from tasks.evaluate.captioning import captioning_metrics
from tasks.evaluate.config import EvalConfig, semantic_settings
from tasks.evaluate.result import EvalResult
from tasks.evaluate.retrieval import retrieval_metrics
from tasks.evaluate.testset import read_test_set
from tasks.evaluate.truth_checks import truth_checks


def evaluate(
    model_dir: Path,
    test_shards: Sequence[Path],
    truth_dir: Path | None = None,
    filter_dir: Path | None = None,
    caption_dir: Path | None = None,
    cfg: EvalConfig | None = None,
) -> EvalResult:
    """Evaluate the MED in `model_dir` (ours or a Hugging Face BLIP folder) on `test_shards`.

    With `truth_dir` (a synthetic world or its ``truth`` folder) retrieval hits are
    scene matches and the captions' scene correctness is measured; with `filter_dir` too,
    the filter's web verdicts are scored against the noise truth; with `caption_dir`
    (or the filter's synthetic rows) the captioner's correctness. Writes nothing.
    """
    import blip_core

    cfg = cfg or EvalConfig()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else torch.device(cfg.device)
    loaded = blip_core.load(Path(model_dir), device=device)
    test = read_test_set(test_shards, cfg.max_images)
    truth = load_truth(Path(truth_dir)) if truth_dir is not None else None
    loaded.model.eval()
    with torch.inference_mode():
        retrieval = retrieval_metrics(loaded.model, loaded.tokenizer, test, cfg, truth)
        captioning, examples = captioning_metrics(loaded.model, loaded.tokenizer, test, cfg, truth)
    result = EvalResult(
        model_dir=str(model_dir),
        model_fingerprint=loaded.fingerprint,
        n_images=len(test.image_ids),
        n_texts=len(test.texts),
        retrieval=retrieval["retrieval"],
        retrieval_id=retrieval["retrieval_id"],
        captioning=captioning,
        retrieval_itc=retrieval["retrieval_itc"],
        settings=semantic_settings(cfg),
        examples=examples,
    )
    if truth is not None:
        result.filter_detection, result.captioner = truth_checks(truth, filter_dir, caption_dir)
    return result
