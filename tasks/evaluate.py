"""The evaluation stage: retrieval and captioning on a held-out set, and, on the synthetic
world, how well the filter found the web noise and how often the captioner was right.

`evaluate(model_dir, test_shards, truth_dir=None, ...)` writes nothing by itself and
returns an `EvalResult`; `evaluate_to_file` (and its two callers: `evaluate_run_folder(run_dir)`
for a run folder, `evaluate_run(model, test, truth, out, ...)` for the flow) writes
``eval/metrics.json`` atomically, recording the fingerprints of the model, the test
shards, the truth and stage outputs and the settings, so a rerun with the same inputs
returns the stored result instead of recomputing it.

Retrieval follows BLIP: rank every text for each image (and every image for each text)
by ITC similarity, re-score the top k of each query with the ITM "match" logit plus the
ITC similarity, and report R@1/5/10. A retrieved item counts as a hit when it belongs to
the same image (`retrieval_id`) or, when the world's truth is known, shows the same scene
(`retrieval`): in the synthetic world several test images share a scene, and which of
them a caption "belongs to" is arbitrary.
"""

from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from data.images import decode_image
from data.layout import MODEL_ENTRY, RunLayout
from data.shards import file_fingerprint, list_shards, read_table, settings_hash, write_atomic
from data.synth import WorldTruth, load_truth
from data.synth_world import caption_is_true, caption_matches_scene
from tasks.metrics import (
    DEFAULT_RERANK_K,
    caption_scores,
    detection_scores,
    relevance_matrix,
    rerank_top_k,
    retrieval_recall,
    roc_auc,
)

EVAL_FILE = Path("eval") / "metrics.json"
PERCENT = 100.0
# Web caption kinds that are true of their image (a filter should keep them).
CLEAN_KINDS = ("correct", "weak")


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation settings; all of them are semantic (they change the numbers)."""

    rerank_k: int = DEFAULT_RERANK_K  # ITC top-k re-scored by ITM per query (BLIP: 256 on COCO)
    max_text_tokens: int = 35
    caption_strategy: str = "beam"  # BLIP evaluates captioning with 3-beam search
    num_beams: int = 3
    max_caption_tokens: int = 20
    min_caption_tokens: int = 5
    prompt: str = ""  # decoder prompt; "a picture of " for a finetuned captioner
    max_images: int | None = None  # evaluate only the first N test images (None: all)
    image_size: int | None = None  # None: the model's own
    batch_size: int = 64  # execution only: images per forward pass
    device: str = "auto"  # execution only: auto (cuda when available) | cpu | cuda[:N]


_EXECUTION_FIELDS = ("batch_size", "device")


@dataclass
class EvalResult:
    """What `evaluate` measured; `to_json()` is the ``eval/metrics.json`` content."""

    model_dir: str
    model_fingerprint: str
    n_images: int
    n_texts: int
    retrieval: dict[str, float]  # scene hits (id hits when no truth is given)
    retrieval_id: dict[str, float]  # same-image hits
    captioning: dict[str, float]  # BLEU-4 / CIDEr x 100, plus scene correctness with truth
    retrieval_itc: dict[str, float] = field(default_factory=dict)  # scene (or id) hits, ITC ranking alone
    filter_detection: dict[str, Any] | None = None
    captioner: dict[str, Any] | None = None
    fingerprint: str = ""  # of model + test shards + settings: a rerun with the same is skipped
    settings: dict[str, Any] = field(default_factory=dict)
    examples: list[dict[str, str]] = field(default_factory=list)  # a few test captions

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=False, allow_nan=True)

    @classmethod
    def from_json(cls, text: str) -> EvalResult:
        return cls(**json.loads(text))


# --------------------------------------------------------------------------- test set


@dataclass
class TestSet:
    """Distinct test images (first row's bytes) and every caption row, with their labels."""

    image_ids: list[str]
    images: list[bytes]
    texts: list[str]
    text_image_ids: list[str]

    def references(self) -> dict[str, list[str]]:
        refs: dict[str, list[str]] = defaultdict(list)
        for img, text in zip(self.text_image_ids, self.texts, strict=True):
            refs[img].append(text)
        return dict(refs)


def read_test_set(test_shards: Sequence[Path], max_images: int | None = None) -> TestSet:
    """Read ok rows of pair shards; rows sharing an `image_id` are one image's captions."""
    image_ids: list[str] = []
    images: list[bytes] = []
    texts: list[str] = []
    text_ids: list[str] = []
    seen: set[str] = set()
    for path in test_shards:
        t = read_table(Path(path), "pairs", columns=["image_id", "caption", "jpg", "status"])
        t = t.filter(pc.equal(t["status"], "ok"))
        for img, cap, data in zip(*(t[c].to_pylist() for c in ("image_id", "caption", "jpg")), strict=True):
            if img not in seen:
                if max_images is not None and len(seen) >= max_images:
                    continue
                if data is None or not decode_image(data).ok:
                    continue
                seen.add(img)
                image_ids.append(img)
                images.append(data)
            if cap:
                texts.append(cap)
                text_ids.append(img)
    if not image_ids or not texts:
        raise ValueError(f"no usable test rows (status ok, decodable image, caption) in {[str(p) for p in test_shards]}")
    return TestSet(image_ids, images, texts, text_ids)


# --------------------------------------------------------------------------- model passes


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


def _pixels(images: Sequence[bytes], size: int, device: torch.device) -> torch.Tensor:
    from blip_core.image import ImageTransform

    transform = ImageTransform(size)
    return torch.stack([transform(decode_image(b).image) for b in images]).to(device)  # (B, 3, S, S)


def _tokens(tokenizer: Any, texts: list[str], mode: str, max_length: int, device: torch.device):
    ids, mask = tokenizer.encode(texts, mode, max_length)
    return ids.to(device), mask.to(device)  # (B, T) each


@torch.no_grad()
def _embed(model: Any, tokenizer: Any, test: TestSet, cfg: EvalConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Image tokens (N, 1+P, Dv), image features (N, E), text features (M, E)."""
    size = cfg.image_size or model.config.vision.image_size
    device = _device(model)
    embeds, img_feats, txt_feats = [], [], []
    for i in range(0, len(test.images), cfg.batch_size):
        e = model.encode_image(_pixels(test.images[i : i + cfg.batch_size], size, device))  # (B, 1+P, Dv)
        embeds.append(e)
        img_feats.append(model.image_features(e))
    for i in range(0, len(test.texts), cfg.batch_size):
        ids, mask = _tokens(tokenizer, test.texts[i : i + cfg.batch_size], "text", cfg.max_text_tokens, device)
        txt_feats.append(model.text_features(model.encode_text(ids, mask)))
    return torch.cat(embeds), torch.cat(img_feats), torch.cat(txt_feats)


def _itm_scorer(model: Any, tokenizer: Any, image_embeds: torch.Tensor, texts: list[str], cfg: EvalConfig,
                text_is_query: bool):
    """A `PairScorer` giving the ITM match logit of (image, text) pairs, batched."""

    @torch.no_grad()
    def score(q: np.ndarray, c: np.ndarray) -> np.ndarray:
        img_idx, txt_idx = (c, q) if text_is_query else (q, c)
        device = image_embeds.device
        out = []
        for i in range(0, len(img_idx), cfg.batch_size):
            ii = torch.as_tensor(img_idx[i : i + cfg.batch_size], device=device)
            batch = [texts[j] for j in txt_idx[i : i + cfg.batch_size]]
            ids, mask = _tokens(tokenizer, batch, "itm", cfg.max_text_tokens, device)
            out.append(model.itm_logits(image_embeds.index_select(0, ii), ids, mask)[:, 1].float().cpu())
        return torch.cat(out).numpy()

    return score


@torch.no_grad()
def _captions(model: Any, tokenizer: Any, test: TestSet, cfg: EvalConfig) -> list[str]:
    size = cfg.image_size or model.config.vision.image_size
    device = _device(model)
    prompt_ids = None
    if cfg.prompt:
        ids, _ = _tokens(tokenizer, [cfg.prompt], "decoder", cfg.max_caption_tokens, device)
        prompt_ids = ids[0, 1 : tokenizer.prompt_length(cfg.prompt)]
    out: list[str] = []
    for i in range(0, len(test.images), cfg.batch_size):
        ids = model.generate(
            _pixels(test.images[i : i + cfg.batch_size], size, device), strategy=cfg.caption_strategy,
            max_length=cfg.max_caption_tokens, min_length=cfg.min_caption_tokens, num_beams=cfg.num_beams,
            prompt_ids=prompt_ids,
        )
        out += tokenizer.decode(ids.cpu(), strip_prompt=cfg.prompt)
    return out


# --------------------------------------------------------------------------- truth-based checks


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


@torch.no_grad()
def pair_itc_scores(model_dir: Path, images: Sequence[bytes], texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
    """ITC cosine similarity of each (image, text) pair under the model in `model_dir` (N,).

    A diagnostic beside the filter's ITM score: how well the same model's contrastive
    head alone separates matching from non-matching pairs.
    """
    import blip_core

    loaded = blip_core.load(Path(model_dir))
    model, tok = loaded.model, loaded.tokenizer
    device, size = _device(model), model.config.vision.image_size
    out = []
    for i in range(0, len(texts), batch_size):
        img = model.image_features(model.encode_image(_pixels(images[i : i + batch_size], size, device)))  # (B, E)
        ids, mask = _tokens(tok, list(texts[i : i + batch_size]), "text", EvalConfig.max_text_tokens, device)
        txt = model.text_features(model.encode_text(ids, mask))  # (B, E)
        out.append((img * txt).sum(-1).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros(0)


def read_scored_rows(filter_dir: Path) -> pa.Table:
    """Kept + rejected rows of a filter output folder (no image bytes)."""
    cols = ["key", "image_id", "source", "caption", "itm_score", "keep", "threshold"]
    tables = [read_table(p, "scored", columns=cols) for part in ("kept", "rejected") for p in list_shards(filter_dir / part)]
    if not tables:
        raise FileNotFoundError(f"{filter_dir}: no kept/ or rejected/ shards; run the filter stage first")
    return pa.concat_tables(tables)


# --------------------------------------------------------------------------- the stage


def evaluate_model(
    model: Any, tokenizer: Any, test: TestSet, cfg: EvalConfig, truth: WorldTruth | None = None
) -> dict[str, Any]:
    """Retrieval and captioning metrics of a loaded MED on a test set (a plain dict)."""
    model.eval()
    embeds, img_f, txt_f = _embed(model, tokenizer, test, cfg)
    sim = (img_f @ txt_f.t()).double().cpu().numpy()  # (N_img, N_txt)
    i2t = rerank_top_k(sim, cfg.rerank_k, _itm_scorer(model, tokenizer, embeds, test.texts, cfg, False))
    t2i = rerank_top_k(sim.T, cfg.rerank_k, _itm_scorer(model, tokenizer, embeds, test.texts, cfg, True))
    by_id = relevance_matrix(test.image_ids, test.text_image_ids)
    out: dict[str, Any] = {"retrieval_id": retrieval_recall(i2t, by_id, t2i).as_dict()}
    if truth is not None:
        scene = {i: truth.scenes[i].to_json() if i in truth.scenes else f"id:{i}" for i in test.image_ids}
        by_scene = relevance_matrix([scene[i] for i in test.image_ids], [scene[i] for i in test.text_image_ids])
        out["retrieval"] = retrieval_recall(i2t, by_scene, t2i).as_dict()
        out["retrieval_itc"] = retrieval_recall(sim, by_scene).as_dict()
    else:
        out["retrieval"] = out["retrieval_id"]
        out["retrieval_itc"] = retrieval_recall(sim, by_id).as_dict()
    captions = _captions(model, tokenizer, test, cfg)
    cands = dict(zip(test.image_ids, captions, strict=True))
    scores = caption_scores(test.references(), cands)
    out["captioning"] = {"BLEU-4": PERCENT * scores["BLEU-4"], "CIDEr": PERCENT * scores["CIDEr"]}
    if truth is not None:
        known = [(truth.scenes[i], c) for i, c in cands.items() if i in truth.scenes]
        if known:
            out["captioning"]["scene_exact"] = PERCENT * float(np.mean([caption_matches_scene(c, s) for s, c in known]))
            out["captioning"]["scene_true"] = PERCENT * float(np.mean([caption_is_true(c, s) for s, c in known]))
    refs = test.references()
    out["examples"] = [{"image_id": i, "generated": cands[i], "reference": refs[i][0]} for i in test.image_ids[:5]]
    return out


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
    with torch.inference_mode():
        metrics = evaluate_model(loaded.model, loaded.tokenizer, test, cfg, truth)
    result = EvalResult(
        model_dir=str(model_dir),
        model_fingerprint=loaded.fingerprint,
        n_images=len(test.image_ids),
        n_texts=len(test.texts),
        retrieval=metrics["retrieval"],
        retrieval_id=metrics["retrieval_id"],
        captioning=metrics["captioning"],
        retrieval_itc=metrics["retrieval_itc"],
        settings=_semantic(cfg),
        examples=metrics["examples"],
    )
    if truth is not None:
        result.filter_detection, result.captioner = _truth_checks(truth, filter_dir, caption_dir)
    return result


def _truth_checks(
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


def _semantic(cfg: EvalConfig) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    for name in _EXECUTION_FIELDS:
        d.pop(name)
    return d


def _inputs_fingerprint(model_dir: Path, test_shards: Sequence[Path], cfg: EvalConfig, extra: Sequence[Path]) -> str:
    weights = sorted(Path(model_dir).glob("*.safetensors")) + sorted(Path(model_dir).glob("*.bin"))
    parts = {
        "model": [file_fingerprint(p) for p in weights],
        "test": [file_fingerprint(Path(p)) for p in test_shards],
        "extra": [file_fingerprint(p) for folder in extra for p in sorted(Path(folder).rglob("*.parquet"))],
        "settings": _semantic(cfg),
    }
    return settings_hash(parts)


def evaluate_to_file(
    model_dir: Path,
    test_shards: Sequence[Path],
    out_file: Path,
    truth_dir: Path | None = None,
    filter_dir: Path | None = None,
    caption_dir: Path | None = None,
    cfg: EvalConfig | None = None,
) -> EvalResult:
    """`evaluate`, then write its JSON to `out_file` atomically, with an input fingerprint.

    The fingerprint covers the model weights, the test shards, the truth / filter /
    caption files and the semantic settings; when `out_file` already holds a result
    with the same fingerprint, it is returned and nothing is recomputed (a rerun is
    free and safe).
    """
    cfg = cfg or EvalConfig()
    extra = [Path(p) for p in (filter_dir, caption_dir, truth_dir) if p is not None]
    fingerprint = _inputs_fingerprint(Path(model_dir), test_shards, cfg, extra)
    out_file = Path(out_file)
    if out_file.is_file():
        try:
            stored = EvalResult.from_json(out_file.read_text())
            if stored.fingerprint == fingerprint:
                return stored
        except (json.JSONDecodeError, TypeError):
            pass  # unreadable or an older format: recompute and overwrite
    result = evaluate(model_dir, test_shards, truth_dir, filter_dir, caption_dir, cfg)
    result.fingerprint = fingerprint
    out_file.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out_file, result.to_json())
    return result


def evaluate_run_folder(
    run_dir: Path,
    truth_dir: Path | None = None,
    cfg: EvalConfig | None = None,
    model_name: str = "final",
) -> EvalResult:
    """Evaluate the run's ``model_name`` model on ``ingest/test`` into ``eval/metrics.json``.

    The model, and the filter and caption outputs whose noise detection and correctness
    are measured, are those the latest run used (``current.json``, see `data.layout`);
    `truth_dir` defaults to the run's truth folder when it has one.
    """
    layout = RunLayout(Path(run_dir))
    test_shards = list_shards(layout.ingest("test"))
    if not test_shards:
        raise FileNotFoundError(f"{layout.ingest('test')}: no test shards; ingest a test set first")
    model = layout.current(MODEL_ENTRY + model_name) or layout.models / model_name
    return evaluate_to_file(
        model, test_shards, layout.metrics,
        truth_dir if truth_dir is not None else layout.truth_dir(),
        layout.current_stage("filter"), layout.current_stage("caption"), cfg,
    )  # fmt: skip


def evaluate_run(
    model: str | Path,
    test: Sequence[str | Path],
    truth: str | Path | None = None,
    out: str | Path | None = None,
    itm_top_k: int = DEFAULT_RERANK_K,
    batch_size: int = 64,
    device: str = "auto",
    filter_dir: str | Path | None = None,
    caption_dir: str | Path | None = None,
) -> Path:
    """The flow's entry point: evaluate `model` on `test` into ``<out>/metrics.json``.

    `out` is the run's ``eval`` folder (default: ``eval`` beside the model's ``models``
    folder). Unless given, the filter and caption outputs are the current
    ``filter/<hash>`` and ``caption/<hash>`` folders of the run that holds `out`, so the
    filter's noise detection and the captioner's correctness are measured whenever
    `truth` is known. Returns the JSON's path; rerun-safe (see `evaluate_to_file`).
    """
    model = Path(model)
    out_dir = Path(out) if out is not None else model.parent.parent / "eval"
    layout = RunLayout(out_dir.parent)
    cfg = EvalConfig(rerank_k=itm_top_k, batch_size=batch_size, device=device)
    out_file = out_dir / EVAL_FILE.name
    evaluate_to_file(
        model, [Path(p) for p in test], out_file,
        Path(truth) if truth else None,
        Path(filter_dir) if filter_dir else layout.current_stage("filter"),
        Path(caption_dir) if caption_dir else layout.current_stage("caption"),
        cfg,
    )
    return out_file


def evaluate_folder_to_path(run_dir: str, truth_dir: str | None = None, model_name: str = "final") -> str:
    """`evaluate_run_folder` with default settings; returns the JSON's path."""
    evaluate_run_folder(Path(run_dir), Path(truth_dir) if truth_dir else None, model_name=model_name)
    return str(Path(run_dir) / EVAL_FILE)


def summary_rows(result: EvalResult) -> list[tuple[str, float]]:
    """The headline numbers, in table order (for the CLI and the ablation)."""
    rows = [(k, v) for k, v in result.retrieval.items() if k in ("TR@1", "IR@1", "TR@5", "IR@5")]
    rows += [(k, v) for k, v in result.captioning.items()]
    if result.filter_detection:
        rows.append(("filter ROC-AUC", result.filter_detection["roc_auc"]))
    if result.captioner:
        rows.append(("captioner exact", result.captioner["exact"]))
    return rows


__all__ = [
    "EvalConfig",
    "EvalResult",
    "TestSet",
    "captioner_correctness",
    "evaluate",
    "evaluate_model",
    "evaluate_run",
    "evaluate_run_folder",
    "evaluate_folder_to_path",
    "evaluate_to_file",
    "filter_noise_detection",
    "read_test_set",
    "summary_rows",
]
