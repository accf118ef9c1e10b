"""Metric functions against values computed by hand on small cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tasks.evaluate.metrics import (
    caption_scores,
    detection_scores,
    first_hit_ranks,
    recall_at_k,
    relevance_matrix,
    rerank_top_k,
    retrieval_recall,
    roc_auc,
    tokenize_caption,
)


def test_relevance_matrix_marks_equal_labels() -> None:
    rel = relevance_matrix(["a", "b"], ["b", "a", "a"])
    assert rel.tolist() == [[False, True, True], [True, False, False]]


def test_first_hit_ranks_and_recall_by_hand() -> None:
    scores = np.array([[0.9, 0.1, 0.5], [0.2, 0.8, 0.3]])
    relevant = np.array([[False, False, True], [True, False, False]])
    # row 0 orders columns 0, 2, 1 -> first hit (col 2) at rank 1
    # row 1 orders columns 1, 2, 0 -> first hit (col 0) at rank 2
    ranks = first_hit_ranks(scores, relevant)
    assert ranks.tolist() == [1, 2]
    assert recall_at_k(ranks, (1, 2, 3)) == {1: 0.0, 2: 50.0, 3: 100.0}


def test_row_without_a_hit_never_counts() -> None:
    ranks = first_hit_ranks(np.array([[1.0, 0.0]]), np.array([[False, False]]))
    assert ranks.tolist() == [2]
    assert recall_at_k(ranks, (1, 2)) == {1: 0.0, 2: 0.0}


def test_ties_keep_column_order() -> None:
    ranks = first_hit_ranks(np.array([[0.5, 0.5, 0.5]]), np.array([[False, True, False]]))
    assert ranks.tolist() == [1]


def test_retrieval_recall_both_directions() -> None:
    # 2 images, 3 texts; text 2 describes image 1, texts 0, 1 image 0.
    sim = np.array([[0.1, 0.9, 0.3], [0.8, 0.2, 0.7]])
    rel = relevance_matrix(["x", "y"], ["x", "x", "y"])
    out = retrieval_recall(sim, rel, ks=(1, 2))
    # i2t: image 0 best text 1 (hit) ; image 1 best text 0 (miss), then text 2 (hit)
    assert out.tr == {1: 50.0, 2: 100.0}
    # t2i: text 0 -> image 1 (miss), text 1 -> image 0 (hit), text 2 -> image 1 (hit)
    assert out.ir == {1: pytest.approx(200 / 3), 2: 100.0}
    flat = out.as_dict()
    assert flat["TR@1"] == 50.0 and "IR@2" in flat


def test_rerank_top_k_scores_only_the_top_k() -> None:
    sim = np.array([[0.9, 0.1, 0.5], [0.2, 0.8, 0.3]])
    calls: list[tuple[list[int], list[int]]] = []

    def itm(q: np.ndarray, c: np.ndarray) -> np.ndarray:
        calls.append((q.tolist(), c.tolist()))
        return np.where(c == 2, 1.0, 0.0)  # ITM loves candidate 2

    out = rerank_top_k(sim, 2, itm)
    assert calls == [([0, 0, 1, 1], [0, 2, 1, 2])]
    assert out[0].tolist() == pytest.approx([0.9, -math.inf, 1.5])
    assert out[1].tolist() == pytest.approx([-math.inf, 0.8, 1.3])
    # candidate 2 now ranks first for both queries
    assert np.argmax(out, axis=1).tolist() == [2, 2]


def test_rerank_k_larger_than_candidates() -> None:
    out = rerank_top_k(np.array([[0.1, 0.2]]), 10, lambda q, c: np.zeros(len(q)))
    assert out.tolist() == [[0.1, 0.2]]


def test_tokenize_caption() -> None:
    assert tokenize_caption("  A Red,  circle. ") == "a red circle"


def test_bleu4_by_hand() -> None:
    refs = {"1": ["a b c d f"], "2": ["x y z w v"]}
    cands = {"1": "A b c d e.", "2": "x y z w v"}
    out = caption_scores(refs, cands)
    # corpus clipped n-gram precisions: 9/10, 7/8, 5/6, 3/4; no brevity penalty
    expected = (9 / 10 * 7 / 8 * 5 / 6 * 3 / 4) ** 0.25
    assert out["BLEU-4"] == pytest.approx(expected, abs=1e-6)
    assert out["BLEU-1"] == pytest.approx(0.9, abs=1e-6)


def test_cider_identical_and_disjoint() -> None:
    refs = {"1": ["a red circle left"], "2": ["one blue square right"]}
    # a candidate equal to its only reference (4 words: 1- to 4-grams all exist):
    # cosine 1 for every n, no length penalty, times 10 -> 10; a candidate sharing
    # no n-gram -> 0.
    out = caption_scores(refs, {"1": "a red circle left", "2": "two green stars top"})
    assert out["CIDEr"] == pytest.approx((10.0 + 0.0) / 2)
    # 3 words have no 4-gram: that n contributes 0 -> 10 * 3/4
    short = caption_scores({"1": ["red circle left"], "2": ["blue square right"]},
                           {"1": "red circle left", "2": "blue square right"})
    assert short["CIDEr"] == pytest.approx(7.5)


def test_caption_scores_needs_matching_ids() -> None:
    with pytest.raises(ValueError, match="same image ids"):
        caption_scores({"1": ["a"]}, {"2": "a"})


def test_roc_auc_by_hand() -> None:
    # positives 0.35, 0.8; negatives 0.1, 0.4: pairs won 1 + 2 + 0... = 3 of 4
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [False, False, True, True]) == pytest.approx(0.75)
    assert roc_auc([0.5, 0.5], [True, False]) == pytest.approx(0.5)
    assert roc_auc([0.9, 0.1], [True, False]) == 1.0
    assert math.isnan(roc_auc([0.1, 0.2], [True, True]))


def test_detection_scores_by_hand() -> None:
    scores = [0.9, 0.6, 0.4, 0.7, 0.2]
    truth = [True, True, True, False, False]
    d = detection_scores(scores, truth, threshold=0.5)
    # predicted: 0.9, 0.6, 0.7 -> tp 2 of 3 predicted, 2 of 3 positives
    assert d.precision == pytest.approx(2 / 3)
    assert d.recall == pytest.approx(2 / 3)
    assert d.n_predicted == 3 and d.n_positive == 3 and d.n == 5
    # ranks of positives among 5: 0.4->2, 0.6->3, 0.9->5 -> U = 10 - 6 = 4 of 6
    assert d.roc_auc == pytest.approx(4 / 6)
    forced = detection_scores(scores, truth, threshold=0.5, predicted=[True, False, False, False, False])
    assert forced.precision == 1.0 and forced.recall == pytest.approx(1 / 3)
    assert forced.roc_auc == d.roc_auc
    none = detection_scores([0.1], [True], threshold=0.5)
    assert math.isnan(none.precision) and none.recall == 0.0
