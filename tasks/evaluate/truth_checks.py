"""Checks only the synthetic world allows, against its truth file: how well the filter
found the web noise, and how often the captioner described its image's scene."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data.shards import list_shards, read_table
from data.synth import WorldTruth
from data.synth_world import caption_is_true, caption_matches_scene
from tasks.evaluate.metrics import detection_scores, roc_auc

# Web caption kinds that are true of their image (a filter should keep them).
CLEAN_KINDS = ("correct", "weak")


def read_scored_rows(filter_dir: Path) -> pa.Table:
    """Kept + rejected rows of a filter output folder (no image bytes)."""
    cols = ["key", "image_id", "source", "caption", "itm_score", "keep", "threshold"]
    tables = [read_table(p, "scored", columns=cols) for part in ("kept", "rejected") for p in list_shards(filter_dir / part)]
    if not tables:
        raise FileNotFoundError(f"{filter_dir}: no kept/ or rejected/ shards; run the filter stage first")
    return pa.concat_tables(tables)


def filter_noise_detection(scored: pa.Table, truth: WorldTruth) -> dict[str, Any]:
    """How the filter's web verdicts match the truth (`scored`: rows of kind scored).

    Positive = a clean web caption (correct or weak-but-true); the ITM score ranks them
    (ROC-AUC) and the `keep` column is the decision: `precision` is the share of kept
    web rows that are clean, `recall` the share of clean rows kept, `noise_rejected`
    the share of noisy (swapped / junk) rows rejected. Also the keep rate per kind and,
    per clean kind, the ROC-AUC of that kind alone against the noise (``roc_auc_weak_vs_noise``
    tells whether vague-but-true captions or wrong ones limit the overall figure).
    """
    web = scored.filter(pc.equal(scored["source"], "web"))
    keys = web["key"].to_pylist()
    kinds = [truth.web_kinds.get(k) for k in keys]
    known = [i for i, kind in enumerate(kinds) if kind is not None]
    if not known:
        raise ValueError("no web row of the filter output has a key in the truth file; were they made from this world?")
    scores = np.asarray(web["itm_score"].to_pylist(), dtype=np.float64)[known]
    keep = np.asarray(web["keep"].fill_null(False).to_pylist(), dtype=bool)[known]
    kind = [kinds[i] for i in known]
    clean = np.asarray([k in CLEAN_KINDS for k in kind], dtype=bool)
    thresholds = [t for t in web["threshold"].to_pylist() if t is not None]
    d = detection_scores(scores, clean, float(np.median(thresholds)) if thresholds else 0.5, predicted=keep)
    out: dict[str, Any] = d.as_dict()
    out["noise_rejected"] = float(np.mean(~keep[~clean])) if (~clean).any() else float("nan")
    out["unmatched_rows"] = len(keys) - len(known)
    kinds = np.asarray(kind)
    for k in sorted(set(kind)):
        mask = kinds == k
        out[f"keep_rate_{k}"] = float(keep[mask].mean())
        if k in CLEAN_KINDS and (~clean).any():  # how well this clean kind alone is told from noise
            pair = mask | ~clean
            out[f"roc_auc_{k}_vs_noise"] = roc_auc(scores[pair], clean[pair])
    return out


def captioner_correctness(synthetic: pa.Table, truth: WorldTruth) -> dict[str, Any]:
    """Share of synthetic captions that describe their image's scene exactly / truthfully.

    `synthetic` holds rows with `image_id`, `caption` and optionally `keep`; with `keep`,
    the same shares among the kept rows and the keep rate of exact vs other captions.
    """
    ids = synthetic["image_id"].to_pylist()
    caps = synthetic["caption"].to_pylist()
    rows = [(truth.scenes[i], c or "") for i, c in zip(ids, caps, strict=True) if i in truth.scenes]
    if not rows:
        raise ValueError("no synthetic row's image_id is in the truth file; were they made from this world?")
    exact = np.asarray([caption_matches_scene(c, s) for s, c in rows])
    true = np.asarray([caption_is_true(c, s) for s, c in rows])
    out: dict[str, Any] = {"n": len(rows), "exact": float(exact.mean()), "true": float(true.mean())}
    if "keep" in synthetic.column_names:
        keep = np.asarray(
            [k for i, k in zip(ids, synthetic["keep"].fill_null(False).to_pylist(), strict=True) if i in truth.scenes]
        )
        out["kept"] = int(keep.sum())
        out["exact_among_kept"] = float(exact[keep].mean()) if keep.any() else float("nan")
        out["keep_rate_exact"] = float(keep[exact].mean()) if exact.any() else float("nan")
        out["keep_rate_not_exact"] = float(keep[~exact].mean()) if (~exact).any() else float("nan")
    return out


def truth_checks(
    truth: WorldTruth, filter_dir: Path | None, caption_dir: Path | None
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """Filter noise detection and captioner correctness from the stages' own rows.

    The filter scores every synthetic caption, so its synthetic rows (kept + rejected)
    are all captions with their verdicts; without a filter output the caption stage's
    rows give correctness alone.
    """
    detection = captioner = None
    scored = read_scored_rows(filter_dir) if filter_dir is not None else None
    if scored is not None:
        if pc.any(pc.equal(scored["source"], "web")).as_py():
            detection = filter_noise_detection(scored, truth)
        synthetic = scored.filter(pc.equal(scored["source"], "synthetic"))
        if synthetic.num_rows:
            captioner = captioner_correctness(synthetic, truth)
    if captioner is None and caption_dir is not None:
        tables = [read_table(p, "pairs", columns=["image_id", "caption"]) for p in list_shards(caption_dir)]
        if tables:
            captioner = captioner_correctness(pa.concat_tables(tables), truth)
    return detection, captioner
