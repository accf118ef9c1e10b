"""Evaluation metrics as pure functions over arrays and strings (no model, no files).

- Retrieval: recall@k in both directions from an image x text score matrix and a
  boolean "hit" relation (same image id, or, on the synthetic world, same scene), and
  BLIP's two-step ranking: order by ITC similarity, then re-rank the top k of each
  query by ITM score + ITC similarity.
- Captioning: BLEU-4 and CIDEr-D through pycocoevalcap, on our own lowercase /
  punctuation tokenisation (its PTB tokenizer and METEOR need Java; SPICE a download).
- Detection: ROC-AUC, precision and recall of a score against binary truth.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

RECALL_KS: tuple[int, ...] = (1, 5, 10)
# BLIP re-ranks the ITC top k of each query with ITM (256 on COCO); small test sets
# simply re-rank everything when k exceeds the candidate count.
DEFAULT_RERANK_K = 16

_PUNCT = re.compile(r"[^\w\s]")


# --------------------------------------------------------------------------- retrieval


def relevance_matrix(image_labels: Sequence[object], text_labels: Sequence[object]) -> np.ndarray:
    """`(N_img, N_txt)` bool: True where text j is a correct answer for image i.

    Labels are anything comparable with ``==`` (an image id, a scene string): image i
    and text j are a hit when their labels are equal.
    """
    img = np.asarray([str(x) for x in image_labels], dtype=object)
    txt = np.asarray([str(x) for x in text_labels], dtype=object)
    return img[:, None] == txt[None, :]  # (N_img, N_txt)


def first_hit_ranks(scores: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """Per query row, the 0-based rank of the best-ranked relevant column.

    `scores` and `relevant` are `(Q, C)`; higher scores rank first and ties keep
    column order (a stable sort), so results do not depend on hidden randomness.
    Rows with no relevant column get rank ``C`` (never a hit at any k <= C).
    """
    if scores.shape != relevant.shape:
        raise ValueError(f"scores {scores.shape} and relevant {relevant.shape} must have the same shape")
    order = np.argsort(-scores, axis=1, kind="stable")  # (Q, C) column ids, best first
    hit_sorted = np.take_along_axis(relevant, order, axis=1)  # (Q, C)
    has_hit = hit_sorted.any(axis=1)
    ranks = np.argmax(hit_sorted, axis=1)
    return np.where(has_hit, ranks, scores.shape[1])


def recall_at_k(ranks: np.ndarray, ks: Sequence[int] = RECALL_KS) -> dict[int, float]:
    """Percent of queries whose first hit ranks within the top k, for each k."""
    if len(ranks) == 0:
        return {k: 0.0 for k in ks}
    return {k: float(100.0 * np.mean(ranks < k)) for k in ks}


@dataclass(frozen=True)
class RetrievalScores:
    """Recall@k in percent: `tr` image->text (text retrieval), `ir` text->image."""

    tr: dict[int, float]
    ir: dict[int, float]

    def as_dict(self) -> dict[str, float]:
        """Flat names as in the paper's tables: ``TR@1 ... IR@10``, plus their mean."""
        out = {f"TR@{k}": v for k, v in self.tr.items()}
        out.update({f"IR@{k}": v for k, v in self.ir.items()})
        out["R_mean"] = float(np.mean(list(out.values()))) if out else 0.0
        return out


def retrieval_recall(
    i2t_scores: np.ndarray,
    relevant: np.ndarray,
    t2i_scores: np.ndarray | None = None,
    ks: Sequence[int] = RECALL_KS,
) -> RetrievalScores:
    """Recall@k both ways from `(N_img, N_txt)` scores and hit relation.

    `t2i_scores` is `(N_txt, N_img)` when the text->image direction was re-ranked
    separately (as BLIP does); by default it is the transpose of `i2t_scores`.
    """
    t2i = i2t_scores.T if t2i_scores is None else t2i_scores
    tr = recall_at_k(first_hit_ranks(i2t_scores, relevant), ks)
    ir = recall_at_k(first_hit_ranks(t2i, relevant.T), ks)
    return RetrievalScores(tr=tr, ir=ir)


PairScorer = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""`score(query_idx (P,), candidate_idx (P,)) -> (P,)` scores for P query/candidate pairs."""


def rerank_top_k(sim: np.ndarray, k: int, score_pairs: PairScorer) -> np.ndarray:
    """BLIP's re-ranking: each row's top-k by `sim` get ``sim + score_pairs``; the rest -inf.

    `sim` is `(Q, C)` (ITC similarity, queries x candidates); `score_pairs` is called
    once with all `Q * min(k, C)` pairs (the caller batches the model). The result
    ranks the re-scored top k first and keeps everything else below them.
    """
    q, c = sim.shape
    k = min(k, c)
    top = np.argsort(-sim, axis=1, kind="stable")[:, :k]  # (Q, k)
    rows = np.repeat(np.arange(q), k)  # (Q*k,)
    cols = top.reshape(-1)  # (Q*k,)
    extra = np.asarray(score_pairs(rows, cols), dtype=np.float64).reshape(-1)
    if extra.shape[0] != rows.shape[0]:
        raise ValueError(f"score_pairs returned {extra.shape[0]} scores for {rows.shape[0]} pairs")
    out = np.full((q, c), -np.inf)
    out[rows, cols] = sim[rows, cols] + extra
    return out


# --------------------------------------------------------------------------- captioning


def tokenize_caption(text: str) -> str:
    """Lowercase, punctuation to spaces, single spaces: ``"A Red, circle."`` -> ``"a red circle"``."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def caption_scores(references: Mapping[str, Sequence[str]], candidates: Mapping[str, str]) -> dict[str, float]:
    """Corpus BLEU-1..4 and CIDEr-D (pycocoevalcap) of one candidate per image id.

    `references[id]` lists an image's reference captions, `candidates[id]` is the
    model's caption. Scores are on the usual 0-1 (BLEU) and 0-10 (CIDEr) scales;
    tables multiply by 100 as the paper does. CIDEr's idf comes from these
    references, so it needs at least two images with different captions to be
    non-zero.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    missing = sorted(set(references) ^ set(candidates))
    if missing:
        raise ValueError(f"references and candidates must have the same image ids; differ on {missing[:5]}")
    if not references:
        return {"BLEU-1": 0.0, "BLEU-2": 0.0, "BLEU-3": 0.0, "BLEU-4": 0.0, "CIDEr": 0.0}
    gts = {i: [tokenize_caption(r) for r in refs] for i, refs in references.items()}
    res = {i: [tokenize_caption(candidates[i]) or "<empty>"] for i in references}
    for i, refs in gts.items():
        if not refs:
            raise ValueError(f"image id {i!r} has no reference captions")
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    out = {f"BLEU-{n + 1}": float(b) for n, b in enumerate(bleu)}
    out["CIDEr"] = float(cider)
    return out


# --------------------------------------------------------------------------- detection


def roc_auc(scores: Sequence[float], truth: Sequence[bool]) -> float:
    """Area under the ROC curve of `scores` predicting `truth` (ties count one half).

    Computed as the Mann-Whitney statistic: the probability that a random positive
    scores above a random negative. NaN when either class is empty.
    """
    s = np.asarray(scores, dtype=np.float64)
    t = np.asarray(truth, dtype=bool)
    n_pos, n_neg = int(t.sum()), int((~t).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="stable")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    # average 1-based ranks over runs of tied scores
    start = 0
    while start < len(s):
        end = start
        while end + 1 < len(s) and sorted_s[end + 1] == sorted_s[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2.0 + 1.0
        start = end + 1
    u = ranks[t].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


@dataclass(frozen=True)
class DetectionScores:
    """How well `score >= threshold` finds the positives."""

    roc_auc: float
    precision: float
    recall: float
    threshold: float
    n: int
    n_positive: int
    n_predicted: int

    def as_dict(self) -> dict[str, float]:
        """Plain floats and ints for JSON."""
        return {
            "roc_auc": self.roc_auc,
            "precision": self.precision,
            "recall": self.recall,
            "threshold": self.threshold,
            "n": self.n,
            "n_positive": self.n_positive,
            "n_predicted": self.n_predicted,
        }


def precision_recall(predicted: Sequence[bool], truth: Sequence[bool]) -> tuple[float, float]:
    """Precision and recall of boolean predictions.

    Precision is NaN when nothing is predicted positive; recall is NaN when there
    are no positives (a NaN says "undefined", a 0 would claim a measured failure).
    """
    p = np.asarray(predicted, dtype=bool)
    t = np.asarray(truth, dtype=bool)
    if p.shape != t.shape:
        raise ValueError(f"predicted {p.shape} and truth {t.shape} differ in length")
    tp = int((p & t).sum())
    n_pred, n_pos = int(p.sum()), int(t.sum())
    return (tp / n_pred if n_pred else float("nan"), tp / n_pos if n_pos else float("nan"))


def detection_scores(
    scores: Sequence[float],
    truth: Sequence[bool],
    threshold: float,
    predicted: Sequence[bool] | None = None,
) -> DetectionScores:
    """ROC-AUC of `scores` vs `truth`, and precision / recall of ``score >= threshold``.

    Pass `predicted` when the decision was not a plain threshold on the score (for
    example a filter that also keeps its top-k candidates); the AUC still uses `scores`.
    """
    s = np.asarray(scores, dtype=np.float64)
    t = np.asarray(truth, dtype=bool)
    if s.shape != t.shape:
        raise ValueError(f"scores {s.shape} and truth {t.shape} differ in length")
    pred = s >= threshold if predicted is None else np.asarray(predicted, dtype=bool)
    precision, recall = precision_recall(pred, t)
    return DetectionScores(
        roc_auc=roc_auc(s, t),
        precision=precision,
        recall=recall,
        threshold=float(threshold),
        n=int(len(s)),
        n_positive=int(t.sum()),
        n_predicted=int(pred.sum()),
    )
