"""Zero-shot video evaluation: the image-trained MED retrieves and captions clips, as BLIP
showed on MSR-VTT (text-to-video R@1 43.3 / R@5 65.6 / R@10 74.7, ViT-B, 129M images).

Each clip is `frames` frames sampled uniformly over its duration (`data.video`); all
frames of a batch of clips go through the vision encoder in one call, and the clip's
ITC feature / cross-attention tokens are `blip_core.video`'s (normalised mean of the
projected [CLS]; all frames' tokens concatenated). Retrieval ranks by ITC similarity
and re-ranks each query's top k by ITM logit + ITC similarity, as for images;
captioning decodes from the concatenated frame tokens. With the synthetic video
world's truth, hits are scene matches (several clips share a scene) and captions are
checked against the scene.

`evaluate_video_models(models, shards, out_file, truth_dir, cfg)` writes one JSON
(``RUN/eval/video.json`` in a run) holding a result per named model; a model whose
weights, clips and settings match the stored result is not evaluated again.
Clips that were failed rows, or fail to decode now, are counted by reason and left out.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import torch

from data.ingest import failure_kind
from data.shards import file_fingerprint, list_shards, read_table, settings_hash, write_atomic
from data.synth_video import VideoWorldConfig, find_video_truth, generate_video_world, load_video_truth
from data.synth_world import Scene, caption_is_true, caption_matches_scene
from data.video import MAX_DURATION_S, VideoLimits, sample_frames
from tasks.evaluate.metrics import DEFAULT_RERANK_K, caption_scores, relevance_matrix, rerank_top_k, retrieval_recall

PERCENT = 100.0
BLIP_RETRIEVAL_FRAMES = 8  # BLIP samples 8 frames per clip for zero-shot retrieval


@dataclass(frozen=True)
class VideoEvalConfig:
    """Zero-shot video evaluation settings; all but the execution ones change the numbers.
    The run config's `video.evaluate` block is this class."""

    __pydantic_config__ = {"extra": "forbid"}  # a misspelt field in a run config is an error

    frames: int = BLIP_RETRIEVAL_FRAMES  # sampled uniformly over each clip
    rerank_k: int = DEFAULT_RERANK_K  # ITC top k re-scored by ITM per query
    max_text_tokens: int = 35
    caption_strategy: str = "beam"  # as the image evaluation: 3-beam search
    num_beams: int = 3
    max_caption_tokens: int = 20
    min_caption_tokens: int = 5
    prompt: str = ""
    captions: bool = True  # also caption every clip (BLEU-4 / CIDEr)
    max_videos: int | None = None  # only the first N clips
    image_size: int | None = None  # None: the model's own
    max_duration_s: float = MAX_DURATION_S
    batch_size: int = 16  # execution only: clips per forward pass (x frames images)
    device: str = "auto"  # execution only


_EXECUTION_FIELDS = ("batch_size", "device")


@dataclass
class VideoSet:
    """Decoded clips (uint8 frames at the model's size) and every caption row."""

    video_ids: list[str]
    pixels: torch.Tensor  # (V, n, 3, S, S) uint8
    texts: list[str]
    text_video_ids: list[str]
    skipped: dict[str, int] = field(default_factory=dict)  # failure kind -> clips left out
    decode_seconds: float = 0.0

    def references(self) -> dict[str, list[str]]:
        refs: dict[str, list[str]] = defaultdict(list)
        for vid, text in zip(self.text_video_ids, self.texts, strict=True):
            refs[vid].append(text)
        return dict(refs)


def read_video_set(shards: Sequence[Path], cfg: VideoEvalConfig, image_size: int) -> VideoSet:
    """Read ``videos`` shards: each clip's (first row's) bytes decoded into `cfg.frames`
    frames resized to `image_size`; rows sharing a `video_id` are one clip's captions."""
    from blip_core.image import ImageTransform

    transform = ImageTransform(image_size)
    limits = VideoLimits(max_duration_s=cfg.max_duration_s)
    ids: list[str] = []
    pixels: list[torch.Tensor] = []
    texts: list[str] = []
    text_ids: list[str] = []
    seen: dict[str, bool] = {}  # video_id -> usable
    skipped: Counter[str] = Counter()
    start = time.perf_counter()
    for path in shards:
        t = read_table(Path(path), "videos", columns=["video_id", "caption", "video", "status", "error"])
        for vid, caption, data, status, error in zip(*(t[c].to_pylist() for c in t.column_names), strict=True):
            if vid not in seen:
                if cfg.max_videos is not None and len(ids) >= cfg.max_videos:
                    continue
                if status != "ok":
                    error_kind = failure_kind(error)
                else:
                    decoded = sample_frames(data, cfg.frames, limits)
                    error_kind = None if decoded.ok else failure_kind(decoded.error)
                seen[vid] = error_kind is None
                if error_kind is not None:
                    skipped[error_kind] += 1
                    continue
                ids.append(vid)
                pixels.append(torch.stack([transform.pixels(f) for f in decoded.frames]))  # (n, 3, S, S)
            if seen.get(vid) and caption:
                texts.append(caption)
                text_ids.append(vid)
    if not ids or not texts:
        raise ValueError(f"no usable clips (status ok, decodable, captioned) in {[str(p) for p in shards]}; "
                         f"left out: {dict(skipped)}")  # fmt: skip
    return VideoSet(ids, torch.stack(pixels), texts, text_ids, dict(sorted(skipped.items())), time.perf_counter() - start)


# --------------------------------------------------------------------------- model passes


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


def _tokens(tokenizer: Any, texts: list[str], mode: str, max_length: int, device: torch.device):
    ids, mask = tokenizer.encode(texts, mode, max_length)
    return ids.to(device), mask.to(device)  # (B, T) each


@torch.no_grad()
def embed_video_set(model: Any, videos: VideoSet, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ITC features (V, E) and concatenated frame tokens (V, n (1 + N), Dv): each batch of
    clips is one vision-encoder call over all its frames."""
    from blip_core.image import normalise
    from blip_core.video import embed_videos

    device = _device(model)
    features, tokens = [], []
    for i in range(0, len(videos.video_ids), batch_size):
        embeds = embed_videos(model, normalise(videos.pixels[i : i + batch_size].to(device)))  # (B, n, 3, S, S)
        features.append(embeds.features)
        tokens.append(embeds.tokens)
    return torch.cat(features), torch.cat(tokens)


@torch.no_grad()
def _text_features(model: Any, tokenizer: Any, texts: list[str], cfg: VideoEvalConfig) -> torch.Tensor:
    device, out = _device(model), []
    for i in range(0, len(texts), 256):
        ids, mask = _tokens(tokenizer, texts[i : i + 256], "text", cfg.max_text_tokens, device)
        out.append(model.text_features(model.encode_text(ids, mask, first_only=True)))
    return torch.cat(out)  # (M, E)


def _itm_scorer(model: Any, tokenizer: Any, tokens: torch.Tensor, texts: list[str], cfg: VideoEvalConfig,
                text_is_query: bool):  # fmt: skip
    """A `PairScorer`: the ITM match logit of (clip, text) pairs, in batches."""
    pairs_per_batch = max(1, cfg.batch_size * cfg.frames)

    @torch.no_grad()
    def score(q: np.ndarray, c: np.ndarray) -> np.ndarray:
        video_idx, text_idx = (c, q) if text_is_query else (q, c)
        out = []
        for i in range(0, len(video_idx), pairs_per_batch):
            vi = torch.as_tensor(video_idx[i : i + pairs_per_batch], device=tokens.device)
            ids, mask = _tokens(tokenizer, [texts[j] for j in text_idx[i : i + pairs_per_batch]], "itm",
                                cfg.max_text_tokens, tokens.device)  # fmt: skip
            out.append(model.itm_logits(tokens.index_select(0, vi), ids, mask)[:, 1].float().cpu())
        return torch.cat(out).numpy()

    return score


@torch.no_grad()
def _captions(model: Any, tokenizer: Any, tokens: torch.Tensor, cfg: VideoEvalConfig) -> list[str]:
    from blip_core.generation import generate_from_embeds

    prompt_ids = None
    if cfg.prompt:
        ids, _ = _tokens(tokenizer, [cfg.prompt], "decoder", cfg.max_caption_tokens, tokens.device)
        prompt_ids = ids[0, 1 : tokenizer.prompt_length(cfg.prompt)]
    out: list[str] = []
    for i in range(0, tokens.shape[0], cfg.batch_size):
        ids = generate_from_embeds(
            model, tokens[i : i + cfg.batch_size], cfg.caption_strategy, max_length=cfg.max_caption_tokens,
            min_length=cfg.min_caption_tokens, num_beams=cfg.num_beams, prompt_ids=prompt_ids,
        )  # fmt: skip
        out += tokenizer.decode(ids.cpu(), strip_prompt=cfg.prompt)
    return out


def _directions(scores: dict[str, float]) -> dict[str, float]:
    """TR/IR names -> video ones: v2t (video -> text, the TR direction), t2v (text -> video)."""
    out = {}
    for name, value in scores.items():
        if name.startswith("TR@"):
            out[f"v2t_R@{name[3:]}"] = value
        elif name.startswith("IR@"):
            out[f"t2v_R@{name[3:]}"] = value
        else:
            out[name] = value
    return out


def evaluate_video_model(model: Any, tokenizer: Any, videos: VideoSet, cfg: VideoEvalConfig,
                         scenes: Mapping[str, Scene] | None = None) -> dict[str, Any]:  # fmt: skip
    """Retrieval (ITC, then ITM re-rank) and captioning metrics of a loaded MED on clips."""
    model.eval()
    start = time.perf_counter()
    video_f, tokens = embed_video_set(model, videos, cfg.batch_size)
    embed_seconds = time.perf_counter() - start
    sim = (video_f @ _text_features(model, tokenizer, videos.texts, cfg).t()).double().cpu().numpy()  # (V, M)
    v2t = rerank_top_k(sim, cfg.rerank_k, _itm_scorer(model, tokenizer, tokens, videos.texts, cfg, False))
    t2v = rerank_top_k(sim.T, cfg.rerank_k, _itm_scorer(model, tokenizer, tokens, videos.texts, cfg, True))
    by_id = relevance_matrix(videos.video_ids, videos.text_video_ids)
    out: dict[str, Any] = {"retrieval_id": _directions(retrieval_recall(v2t, by_id, t2v).as_dict())}
    hits = by_id
    if scenes is not None:
        label = {v: scenes[v].to_json() if v in scenes else f"id:{v}" for v in videos.video_ids}
        hits = relevance_matrix([label[v] for v in videos.video_ids], [label[v] for v in videos.text_video_ids])
    out["retrieval"] = _directions(retrieval_recall(v2t, hits, t2v).as_dict())
    out["retrieval_itc"] = _directions(retrieval_recall(sim, hits).as_dict())
    retrieval_seconds = time.perf_counter() - start
    out["captioning"], out["examples"] = {}, []
    if cfg.captions:
        cands = dict(zip(videos.video_ids, _captions(model, tokenizer, tokens, cfg), strict=True))
        refs = videos.references()
        scores = caption_scores(refs, cands)
        out["captioning"] = {"BLEU-4": PERCENT * scores["BLEU-4"], "CIDEr": PERCENT * scores["CIDEr"]}
        known = [(scenes[v], c) for v, c in cands.items() if v in scenes] if scenes is not None else []
        if known:
            out["captioning"]["scene_exact"] = PERCENT * float(np.mean([caption_matches_scene(c, s) for s, c in known]))
            out["captioning"]["scene_true"] = PERCENT * float(np.mean([caption_is_true(c, s) for s, c in known]))
        out["examples"] = [{"video_id": v, "generated": cands[v], "reference": refs[v][0]} for v in videos.video_ids[:5]]
    n = len(videos.video_ids)
    out["timing"] = {
        "decode_s": videos.decode_seconds, "embed_s": embed_seconds, "retrieval_s": retrieval_seconds,
        "total_s": time.perf_counter() - start + videos.decode_seconds,
        "embed_videos_per_s": n / embed_seconds if embed_seconds > 0 else float("inf"),
        "decode_videos_per_s": n / videos.decode_seconds if videos.decode_seconds > 0 else float("inf"),
    }  # fmt: skip
    return out


# --------------------------------------------------------------------------- the stage


def semantic_settings(cfg: VideoEvalConfig) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    for name in _EXECUTION_FIELDS:
        d.pop(name)
    return d


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def expand_video_shards(items: Sequence[str | Path]) -> list[Path]:
    """Shard files, or folders of them, in order."""
    return [p for item in items for p in (list_shards(Path(item)) if Path(item).is_dir() else [Path(item)])]


def default_truth(items: Sequence[str | Path]) -> Path | None:
    """The synthetic video world's truth beside the shards (``<folder>/truth``), if any."""
    for item in items:
        folder = Path(item) if Path(item).is_dir() else Path(item).parent
        if find_video_truth(folder) is not None:
            return folder
    return None


def _fingerprint(model_dir: Path, shards: Sequence[Path], truth: Path | None, cfg: VideoEvalConfig) -> str:
    weights = sorted(Path(model_dir).glob("*.safetensors")) + sorted(Path(model_dir).glob("*.bin"))
    truth_file = find_video_truth(truth) if truth is not None else None
    return settings_hash({
        "model": [file_fingerprint(p) for p in weights], "videos": [file_fingerprint(p) for p in shards],
        "truth": file_fingerprint(truth_file) if truth_file else None, "settings": semantic_settings(cfg),
    })  # fmt: skip


def evaluate_video_models(
    models: Mapping[str, str | Path],
    shards: Sequence[str | Path],
    out_file: Path | None = None,
    truth_dir: str | Path | None = None,
    cfg: VideoEvalConfig | None = None,
) -> dict[str, Any]:
    """Evaluate each named model on the clips in `shards`; with `out_file`, write the JSON
    there atomically (results whose fingerprint matches the stored ones are reused).

    Returns ``{"videos": [...], "truth": ..., "settings": {...}, "models": {name: {...}}}``.
    """
    import blip_core

    cfg = cfg or VideoEvalConfig()
    paths = expand_video_shards(shards)
    if not paths:
        raise FileNotFoundError(f"no videos shards in {[str(s) for s in shards]}")
    truth = Path(truth_dir) if truth_dir is not None else None
    scenes = load_video_truth(truth) if truth is not None else None
    stored = _read(out_file)
    results: dict[str, Any] = {}
    sets: dict[int, VideoSet] = {}  # decoded once per image size
    device = _resolve_device(cfg.device)
    for name, model_dir in models.items():
        fingerprint = _fingerprint(Path(model_dir), paths, truth, cfg)
        previous = stored.get("models", {}).get(name)
        if previous and previous.get("fingerprint") == fingerprint:
            results[name] = previous
            continue
        loaded = blip_core.load(Path(model_dir), device=device)
        size = cfg.image_size or loaded.model.config.vision.image_size
        if size not in sets:
            sets[size] = read_video_set(paths, cfg, size)
        videos = sets[size]
        with torch.inference_mode():
            metrics = evaluate_video_model(loaded.model, loaded.tokenizer, videos, cfg, scenes)
        results[name] = {"model_dir": str(model_dir), "model_fingerprint": loaded.fingerprint, "fingerprint": fingerprint,
                         "n_videos": len(videos.video_ids), "n_texts": len(videos.texts), "frames": cfg.frames,
                         "skipped": videos.skipped, **metrics}  # fmt: skip
    out = {"videos": [str(p) for p in paths], "truth": str(truth) if truth else None, "settings": semantic_settings(cfg),
           "models": results}  # fmt: skip
    if out_file is not None:
        Path(out_file).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(Path(out_file), json.dumps(out, indent=2, allow_nan=True))
    return out


def _read(path: Path | None) -> dict[str, Any]:
    if path is None or not Path(path).is_file():
        return {}
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}


def summary(result: Mapping[str, Any]) -> dict[str, Any]:
    """The headline numbers per model (what the CLI prints)."""
    out = {}
    for name, r in result["models"].items():
        out[name] = {"n_videos": r["n_videos"], "n_texts": r["n_texts"], "frames": r["frames"], "skipped": r["skipped"],
                     "retrieval": r["retrieval"], "retrieval_itc": r["retrieval_itc"], "captioning": r["captioning"],
                     "embed_videos_per_s": round(r["timing"]["embed_videos_per_s"], 1)}  # fmt: skip
    return out


def evaluate_video_world(
    models: Mapping[str, str | Path],
    world_dir: Path,
    out_file: Path,
    world: VideoWorldConfig,
    cfg: VideoEvalConfig | None = None,
) -> dict[str, Any]:
    """The demo's zero-shot video check: write the synthetic clips of `world` into
    `world_dir` (complete shards are kept) and evaluate each named model on them into
    `out_file` (models whose stored result matches are not evaluated again)."""
    start = time.perf_counter()
    generate_video_world(Path(world_dir), world)
    result = evaluate_video_models(models, [world_dir], out_file, world_dir, cfg)
    result["seconds"] = time.perf_counter() - start
    return result
