"""Image-text retrieval as BLIP measures it: rank by ITC similarity, re-rank each query's
top k by the ITM "match" logit plus the ITC similarity, report R@1/5/10 both ways.

A retrieved item is a hit when it belongs to the same image (`retrieval_id`) or, when the
world's truth is known, shows the same scene (`retrieval`): in the synthetic world several
test images share a scene, and which of them a caption "belongs to" is arbitrary.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data.synth import WorldTruth
from tasks.evaluate.config import EvalConfig
from tasks.evaluate.metrics import PairScorer, relevance_matrix, rerank_top_k, retrieval_recall
from tasks.evaluate.model_inputs import model_device, pixels, tokens
from tasks.evaluate.testset import TestSet
from tasks.execution import progress_bar


@torch.no_grad()
def _embed(model: Any, tokenizer: Any, test: TestSet, cfg: EvalConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Image tokens (N, 1+P, Dv), image features (N, E), text features (M, E)."""
    size = cfg.image_size or model.config.vision.image_size
    device = model_device(model)
    embeds, img_feats, txt_feats = [], [], []
    with progress_bar(len(test.images), "evaluate: embed images", cfg.progress) as bar:
        for i in range(0, len(test.images), cfg.batch_size):
            e = model.encode_image(pixels(test.images[i : i + cfg.batch_size], size, device))  # (B, 1+P, Dv)
            embeds.append(e)
            img_feats.append(model.image_features(e))
            bar.update(e.shape[0])
    with progress_bar(len(test.texts), "evaluate: embed texts", cfg.progress, unit="text") as bar:
        for i in range(0, len(test.texts), cfg.batch_size):
            ids, mask = tokens(tokenizer, test.texts[i : i + cfg.batch_size], "text", cfg.max_text_tokens, device)
            txt_feats.append(model.text_features(model.encode_text(ids, mask)))
            bar.update(ids.shape[0])
    return torch.cat(embeds), torch.cat(img_feats), torch.cat(txt_feats)


def _itm_scorer(model: Any, tokenizer: Any, image_embeds: torch.Tensor, texts: list[str], cfg: EvalConfig,
                text_is_query: bool) -> PairScorer:
    """A `PairScorer` giving the ITM match logit of (image, text) pairs, batched."""

    @torch.no_grad()
    def score(q: np.ndarray, c: np.ndarray) -> np.ndarray:
        img_idx, txt_idx = (c, q) if text_is_query else (q, c)
        device = image_embeds.device
        out = []
        desc = f"evaluate: ITM re-rank ({'text' if text_is_query else 'image'} queries)"
        with progress_bar(len(img_idx), desc, cfg.progress, unit="pair") as bar:
            for i in range(0, len(img_idx), cfg.batch_size):
                ii = torch.as_tensor(img_idx[i : i + cfg.batch_size], device=device)
                batch = [texts[j] for j in txt_idx[i : i + cfg.batch_size]]
                ids, mask = tokens(tokenizer, batch, "itm", cfg.max_text_tokens, device)
                out.append(model.itm_logits(image_embeds.index_select(0, ii), ids, mask)[:, 1].float().cpu())
                bar.update(len(batch))
        return torch.cat(out).numpy()

    return score


def retrieval_metrics(
    model: Any, tokenizer: Any, test: TestSet, cfg: EvalConfig, truth: WorldTruth | None = None
) -> dict[str, dict[str, float]]:
    """``retrieval_id`` (same-image hits, ITM re-ranked), ``retrieval`` (scene hits with
    `truth`, else the id hits) and ``retrieval_itc`` (the same hits, ITC ranking alone)."""
    embeds, img_f, txt_f = _embed(model, tokenizer, test, cfg)
    sim = (img_f @ txt_f.t()).double().cpu().numpy()  # (N_img, N_txt)
    i2t = rerank_top_k(sim, cfg.rerank_k, _itm_scorer(model, tokenizer, embeds, test.texts, cfg, False))
    t2i = rerank_top_k(sim.T, cfg.rerank_k, _itm_scorer(model, tokenizer, embeds, test.texts, cfg, True))
    by_id = relevance_matrix(test.image_ids, test.text_image_ids)
    out = {"retrieval_id": retrieval_recall(i2t, by_id, t2i).as_dict()}
    if truth is not None:
        scene = {i: truth.scenes[i].to_json() if i in truth.scenes else f"id:{i}" for i in test.image_ids}
        by_scene = relevance_matrix([scene[i] for i in test.image_ids], [scene[i] for i in test.text_image_ids])
        out["retrieval"] = retrieval_recall(i2t, by_scene, t2i).as_dict()
        out["retrieval_itc"] = retrieval_recall(sim, by_scene).as_dict()
    else:
        out["retrieval"] = out["retrieval_id"]
        out["retrieval_itc"] = retrieval_recall(sim, by_id).as_dict()
    return out


@torch.no_grad()
def pair_itc_scores(model_dir: Path, images: Sequence[bytes], texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
    """ITC cosine similarity of each (image, text) pair under the model in `model_dir` (N,).

    A diagnostic beside the filter's ITM score: how well the same model's contrastive
    head alone separates matching from non-matching pairs.
    """
    import blip_core

    loaded = blip_core.load(Path(model_dir))
    model, tok = loaded.model, loaded.tokenizer
    device, size = model_device(model), model.config.vision.image_size
    out = []
    for i in range(0, len(texts), batch_size):
        img = model.image_features(model.encode_image(pixels(images[i : i + batch_size], size, device)))  # (B, E)
        ids, mask = tokens(tok, list(texts[i : i + batch_size]), "text", EvalConfig.max_text_tokens, device)
        txt = model.text_features(model.encode_text(ids, mask))  # (B, E)
        out.append((img * txt).sum(-1).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros(0)
