"""The filter's decision rule, written once: ITM scores in, keep / reject and a reason out.

The filter stage applies it right after scoring (`tasks.filter`); the assemble stage
applies it again to the scores the filter stored when it is given its own threshold or
top-k (`tasks.assemble`), so choosing a new threshold never runs a model.

The rule, per caption row:

- a failed row (its pair or its image unreadable) is neither kept nor rejected;
- a row with an empty caption is not scored and is rejected as ``empty_caption``;
- a scored row is kept when its score reaches the threshold, else rejected as
  ``itm_below_threshold``;
- with `top_k`, of an image's synthetic captions that pass, only the best k are kept
  (score descending, then the tie-break order); the others are rejected as ``not_top_k``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


@dataclass(frozen=True)
class DecisionRule:
    """The two settings of the decision (`FilterConfig` and `AssembleConfig` both carry them)."""

    threshold: float | np.ndarray  # keep when P(match) >= threshold (or a (C,) threshold per row)
    top_k: int | None = None  # at most this many synthetic captions per image; None = no limit


@dataclass(frozen=True)
class Decision:
    """The verdict on C caption rows."""

    keep: np.ndarray  # (C,) bool; never true for a failed row
    reason: list[str | None]  # (C,) why a row that is neither kept nor failed was rejected; None otherwise


def nonempty_captions(captions: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """(C,) bool: the captions with any non-space text (null counts as empty)."""
    filled = pc.fill_null(captions, "")
    nonempty = pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(filled)), 0)
    return np.asarray(nonempty.to_numpy(zero_copy_only=False), dtype=bool)


def _not_top_k(passed: np.ndarray, score: np.ndarray, image: np.ndarray, tiebreak: np.ndarray, k: int) -> np.ndarray:
    """Rows among `passed` that are not among their image's best k."""
    cand = np.flatnonzero(passed)
    drop = np.zeros_like(passed)
    if len(cand) == 0:
        return drop
    # by image, then score descending, then tie-break, then row order (lexsort is stable)
    order = cand[np.lexsort((tiebreak[cand], -score[cand], image[cand]))]
    groups = image[order]
    first = np.r_[True, groups[1:] != groups[:-1]]
    group_start = np.maximum.accumulate(np.where(first, np.arange(len(order)), 0))
    rank = np.arange(len(order)) - group_start
    drop[order[rank >= k]] = True
    return drop


def decide(
    score: np.ndarray,
    failed: np.ndarray,
    nonempty: np.ndarray,
    is_syn: np.ndarray,
    image: np.ndarray,
    rule: DecisionRule,
    tiebreak: np.ndarray | None = None,
) -> Decision:
    """Keep / reject C caption rows by `rule` (see the module doc).

    `score` (C,) float, NaN where not scored; `failed`, `nonempty`, `is_syn` (C,) bool;
    `image` (C,) int, the same number for the rows of one image; `tiebreak` (C,) int,
    the order among equal scores of one image under top-k (default: row order).
    """
    scored = ~np.isnan(score)
    keep = scored & ~failed & (score >= rule.threshold)
    reasons = np.full(len(keep), None, dtype=object)
    reasons[~failed & ~nonempty] = "empty_caption"
    reasons[scored & ~failed & ~keep] = "itm_below_threshold"
    if rule.top_k is not None:
        order = np.arange(len(keep)) if tiebreak is None else tiebreak
        drop = _not_top_k(keep & is_syn, score, image, order, rule.top_k)
        keep &= ~drop
        reasons[drop] = "not_top_k"
    return Decision(keep=keep, reason=list(reasons))
