"""The filter stage: score every web and synthetic caption of each image with ITM and keep
the pairs whose match probability reaches the threshold (BLIP's CapFilt re-filtering).

Per input web shard ``part-N`` (plus its caption shard ``part-N`` from the caption stage,
when given) it writes, under ``<out>/<settings-hash>/``:

- ``kept/part-N.parquet``      kind ``scored``, keep = true
- ``rejected/part-N.parquet``  kind ``scored``, keep = false, with ``reject_reason``
- ``failed/part-N.parquet``    kind ``scored``, status = failed (not scored)

and a completion record next to each, written after all three data files; the counts in
it satisfy kept + rejected + failed = input (web rows + synthetic rows). A rerun skips an
input whose three records match its bytes and these settings, and otherwise rewrites
all three files atomically, so a crash at any point leaves nothing counted twice.

The keep / reject rule is `tasks.decide.decide`; the assemble stage applies the same rule
to the stored scores for another threshold or top-k (no rescoring).

Speed: each image goes through the vision encoder once for all of its captions (the
image tokens and their cross-attention keys/values are indexed per caption), also when
img2dataset-style rows repeat its bytes once per caption (`same_image_rows`: equal
content, one decode and one encode); one image loader streams all shards of a run
(`tasks.image_batches.ImageStream`); images are ordered by the token length of their longest
caption so a batch pads little; bf16 autocast on CUDA.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from data.inputs import expand_inputs, input_fingerprint, ok_mask, plan_outputs, read_pairs
from data.schema import SchemaError
from data.shards import combine_fingerprints, file_fingerprint, read_completion
from data.storage import Location, location
from tasks.execution import (
    inference_context,
    load_stage_model,
    progress_bar,
    Resolved,
    resolve_device,
    resolve_execution,
    resolve_precision,
    semantic_settings,
)
from tasks.decide import DecisionRule, decide, nonempty_captions
from tasks.image_batches import ImageStream, Planned, ShardImages, index_batches
from tasks.executor import PlanItem, stream_shards
from tasks.stage_config import FilterConfig
from tasks.lifecycle import ShardJob, ShardOutput, ShardStats, StageStats, run_shard, stage_dir

_CAPTION_COLUMNS = ["key", "image_id", "source", "caption", "status", "error", "candidate", "producer"]


@dataclass
class _Scores:
    """Per-caption results for one shard (web rows first, then synthetic rows)."""

    score: np.ndarray  # (C,) float32, NaN where not scored
    error: list[str | None]  # per caption: decode error of its image, else None


def _load(model: Any, device: torch.device) -> Any:
    return load_stage_model(model, device, role="filter", wrong_format="hf-captioning")


def _captions_for(caption_dir: Location | None, name: str) -> Location | None:
    """The caption shard that belongs to web shard `name`, or None without a caption folder."""
    if caption_dir is None:
        return None
    path = location(caption_dir) / name
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no caption shard for web shard {name}; run `capfilt caption` on the same "
            "web shards first, or leave out --captions to filter web captions only"
        )
    return path


def _owner_index(web: pa.Table, syn: pa.Table, syn_path: Location | None) -> np.ndarray:
    """For each synthetic row, the row of its image in the web shard (matched by image_id)."""
    if syn.num_rows == 0:
        return np.zeros(0, dtype=np.int64)
    owner = pc.index_in(syn.column("image_id"), value_set=web.column("image_id"))
    missing = pc.is_null(owner)
    if pc.any(missing).as_py():
        first = pc.index(missing, True).as_py()
        raise SchemaError(
            f"{syn_path}: row {first} (key {syn.column('key')[first]}) has image_id "
            f"{syn.column('image_id')[first]} that is not in the web shard; pass the caption folder "
            "made from these web shards"
        )
    return owner.to_numpy(zero_copy_only=False).astype(np.int64)


def _caption_texts(column: pa.ChunkedArray) -> tuple[list[str], np.ndarray]:
    """Captions as str (null -> "") and a mask of those with any non-space text."""
    return pc.fill_null(column, "").to_pylist(), nonempty_captions(column)


def _image_order(owner: np.ndarray, lengths: np.ndarray, scoreable: np.ndarray, images: np.ndarray) -> np.ndarray:
    """Web rows with an image, ordered by their longest scoreable caption (stable): batches
    of similar length pad little. Images with no caption to score are left out."""
    longest = np.zeros(int(owner.max(initial=-1)) + 1, dtype=np.int64)
    np.maximum.at(longest, owner[scoreable], lengths[scoreable])
    has_caption = np.zeros_like(longest, dtype=bool)
    has_caption[owner[scoreable]] = True
    chosen = images[has_caption[images]] if len(longest) else images[:0]
    return chosen[np.argsort(longest[chosen], kind="stable")]


@dataclass
class _ScorePlan:
    """How one shard's captions meet their images in the model: tokenised captions, and
    the images' batch order (each image once, whatever number of captions it has)."""

    todo: np.ndarray  # (C',) scoreable captions
    ids: torch.Tensor  # (C', T) token ids of the scoreable captions
    mask: torch.Tensor  # (C', T)
    lengths: np.ndarray  # (C,) tokens per caption (0 when not scored)
    row_of: np.ndarray  # (C,) caption -> row in ids (-1 when not scored)
    image_of: np.ndarray  # (C,) caption -> web row whose image it is scored with (the first with its bytes)
    position: np.ndarray  # (W,) web row -> position in the image order (-1 when not encoded)
    order: np.ndarray  # (I,) web rows encoded, in batch order
    distinct: int  # distinct images among the ok web rows


def _score_plan(tokenizer: Any, web: pa.Table, texts: list[str], owner: np.ndarray, scoreable: np.ndarray,
                cfg: FilterConfig) -> _ScorePlan:  # fmt: skip
    """Tokenise the scoreable captions and order their images by longest caption."""
    n_captions = len(texts)
    todo = np.flatnonzero(scoreable)
    mode = "itm" if cfg.itm_first_token == "enc" else "text"  # text mode: the same ids, [CLS] first
    if len(todo):
        ids, mask = tokenizer.encode([texts[i] for i in todo], mode=mode, max_length=cfg.max_text_tokens)  # (C', T)
    else:
        ids = mask = torch.zeros(0, 1, dtype=torch.long)
    lengths = np.zeros(n_captions, dtype=np.int64)
    lengths[todo] = mask.sum(dim=1).numpy()
    row_of = np.full(n_captions, -1, dtype=np.int64)
    row_of[todo] = np.arange(len(todo))
    canonical, images = same_image_rows(web)
    image_of = canonical[owner]  # each caption is scored with the first row holding its image's bytes
    order = _image_order(image_of, lengths, scoreable, images) if len(todo) else owner[:0]
    position = np.full(web.num_rows, -1, dtype=np.int64)
    position[order] = np.arange(len(order))
    return _ScorePlan(todo, ids, mask, lengths, row_of, image_of, position, order, len(images))


def same_image_rows(web: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """Repeated images by content: (canonical (W,), images (I,)). `canonical[r]` is the first
    ok row whose image bytes equal row r's (r itself for a first occurrence or a row that is
    not ok); `images` are the first occurrences, the rows the model encodes. img2dataset-
    style sets (COCO, DataComp) store one row per pair, the same bytes once per caption:
    those images are decoded and encoded once for all their captions. Bytes are compared
    by pyarrow's hash table on their content (equal hash and equal bytes), never by name."""
    ok = np.flatnonzero(ok_mask(web))
    canonical = np.arange(web.num_rows, dtype=np.int64)
    if len(ok) == 0:
        return canonical, ok
    jpg = web.column("jpg").take(pa.array(ok))
    group = pc.index_in(jpg, value_set=pc.unique(jpg)).to_numpy(zero_copy_only=False).astype(np.int64)  # (R,)
    _, first = np.unique(group, return_index=True)  # first ok position of each distinct image
    first_row = np.empty(int(group.max()) + 1, dtype=np.int64)
    first_row[group[first]] = ok[first]
    canonical[ok] = first_row[group]
    return canonical, np.sort(ok[first])


def _score(
    model: Any,
    plan: _ScorePlan,
    batches: Iterator[tuple[torch.Tensor, list[str]]],
    cfg: FilterConfig,
    device: torch.device,
    precision: str,
    bar: Any,
) -> _Scores:
    """ITM probability for every scoreable caption, each image encoded once, from the
    image batches of `plan.order`. Returns NaN scores for captions not scored and, per
    caption, the decode error of an image that could not be read."""
    n_captions = len(plan.lengths)
    scores = np.full(n_captions, np.nan, dtype=np.float32)
    errors: list[str | None] = [None] * n_captions
    if len(plan.todo) == 0:
        return _Scores(scores, errors)
    todo, image_of, position = plan.todo, plan.image_of, plan.position
    # captions grouped by image: sort scoreable captions by their image's batch position
    cap_pos = position[image_of[todo]]  # (C',)
    by_pos = np.argsort(cap_pos, kind="stable")
    sorted_pos = cap_pos[by_pos]
    start, passed, judged = 0, 0, 0
    with inference_context(device, precision):
        for pixels, image_errors in batches:
            stop = start + len(image_errors)
            lo, hi = np.searchsorted(sorted_pos, [start, stop])
            caps = todo[by_pos[lo:hi]]  # captions of this batch's images
            local = cap_pos[by_pos[lo:hi]] - start  # (c,) image row within the batch
            bad = np.array([bool(e) for e in image_errors])
            for c in caps[bad[local]]:
                errors[c] = image_errors[position[image_of[c]] - start]
            good = ~bad[local]
            if good.any():
                rows = torch.from_numpy(plan.row_of[caps[good]])
                width = int(plan.lengths[caps[good]].max())
                readable = torch.from_numpy(~bad).to(device)
                image_embeds = model.encode_image(pixels[readable])  # (B', 1+N, Dv), readable images only
                image_index = (np.cumsum(~bad) - 1)[local[good]]  # caption -> row of image_embeds
                logits = model.itm_logits(
                    image_embeds,
                    plan.ids[rows, :width].to(device),
                    plan.mask[rows, :width].to(device),
                    image_index=torch.from_numpy(image_index).to(device),
                )  # (c, 2)
                batch_scores = logits.float().softmax(dim=-1)[:, 1].cpu().numpy()
                scores[caps[good]] = batch_scores
                passed += int((batch_scores >= cfg.threshold).sum())
                judged += len(batch_scores)
            bar.set_postfix(keep=f"{passed / max(judged, 1):.0%}", refresh=False)
            bar.update(len(image_errors))
            start = stop
    return _Scores(scores, errors)


def _transform(model: Any) -> Any:
    from blip_core.image import ImageTransform

    return ImageTransform(model.config.vision.image_size)


def _decide(
    scores: _Scores, is_syn: np.ndarray, owner: np.ndarray, status_ok: np.ndarray, nonempty: np.ndarray, cfg: FilterConfig
) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
    """(keep, failed, reject_reason) per caption: `tasks.decide.decide` with the filter's rule."""
    decode_failed = np.array([e is not None for e in scores.error], dtype=bool)
    failed = ~status_ok | decode_failed
    decision = decide(scores.score, failed, nonempty, is_syn, owner, DecisionRule(cfg.threshold, cfg.top_k))
    return decision.keep, failed, decision.reason


def _scored_table(
    rows: pa.Table, scores: _Scores, keep: np.ndarray, failed: np.ndarray, reasons: list[str | None],
    cfg: FilterConfig, judge: str,
) -> pa.Table:
    """`rows` (web then synthetic pairs) plus the score columns; failed rows get status failed."""
    n = rows.num_rows
    error = pc.if_else(
        pa.array([e is not None for e in scores.error]), pa.array(scores.error, pa.string()), rows.column("error")
    )
    status = pc.if_else(pa.array(failed), "failed", rows.column("status"))
    itm = pa.array(scores.score, pa.float32(), mask=np.isnan(scores.score))
    return (
        rows.set_column(rows.schema.get_field_index("status"), "status", status)
        .set_column(rows.schema.get_field_index("error"), "error", error)
        .append_column("itm_score", itm)
        .append_column("keep", pa.array(keep & ~failed))
        .append_column("reject_reason", pa.array(reasons, pa.string()))
        .append_column("threshold", pa.array(np.full(n, cfg.threshold, dtype=np.float32)))
        .append_column("judge", pa.array([judge] * n, pa.string()))
    )


def output_paths(folder: Location, name: str) -> dict[str, Location]:
    """Where the failed / rejected / kept shards of one input go (kept last: the primary output)."""
    return {outcome: folder / outcome / name for outcome in ("failed", "rejected", "kept")}


@dataclass
class _FilterShard:
    """One shard's rows as the filter reads them (web rows first, then synthetic rows)."""

    src: Location
    captions: Location | None
    name: str
    web: pa.Table
    syn: pa.Table
    owner: np.ndarray  # (C,) caption -> web row of its image
    is_syn: np.ndarray  # (C,)
    status_ok: np.ndarray  # (C,) the caption row and its web row have status ok
    nonempty: np.ndarray  # (C,)
    images: int  # distinct images among the web rows with an ok status (the progress total)
    plan: _ScorePlan


@dataclass
class Judge:
    """What every shard of one filter run shares: the model on its device and the settings
    (a `tasks.executor.StageRunner`)."""

    loaded: Any
    cfg: FilterConfig
    device: torch.device
    precision: str
    resolved: Resolved  # batch size and workers for this machine

    @classmethod
    def build(cls, model: Any, cfg: FilterConfig) -> Judge:
        device = resolve_device(cfg.execution.device)
        loaded = _load(model, device)
        # memory estimate: a web caption and a synthetic one per image
        resolved = resolve_execution(cfg.execution, device, loaded.model.config.vision, copies=2, stage="filter")
        return cls(loaded, cfg, device, resolve_precision(cfg.execution.precision, device), resolved)

    def read(self, item: PlanItem) -> Planned:
        """Read one shard and plan its scoring; the images go to the stage's `ImageStream`."""
        src, name = location(item.src), item.name
        captions = location(item.captions) if item.captions else None
        web = read_pairs(src)
        syn = read_pairs(captions, columns=_CAPTION_COLUMNS) if captions else web.slice(0, 0).select(_CAPTION_COLUMNS)
        n_web, n_syn = web.num_rows, syn.num_rows
        owner = np.concatenate([np.arange(n_web), _owner_index(web, syn, captions)])  # (C,)
        is_syn = np.r_[np.zeros(n_web, dtype=bool), np.ones(n_syn, dtype=bool)]
        web_ok = ok_mask(web)
        syn_ok = np.asarray(pc.equal(syn.column("status"), "ok").to_numpy(zero_copy_only=False), dtype=bool)
        status_ok = web_ok[owner] & np.r_[np.ones(n_web, dtype=bool), syn_ok]
        texts, nonempty = _caption_texts(pa.chunked_array(web.column("caption").chunks + syn.column("caption").chunks, pa.string()))
        plan = _score_plan(self.loaded.tokenizer, web, texts, owner, status_ok & nonempty, self.cfg)
        shard = _FilterShard(location(src), captions, name, web, syn, owner, is_syn, status_ok, nonempty, plan.distinct, plan)
        images = ShardImages(web.column("jpg").combine_chunks(), index_batches(plan.order, self.resolved.batch_size))
        return Planned(shard, images)

    def work(self, shard: _FilterShard, batches: Iterator[tuple[torch.Tensor, list[str]]]) -> ShardOutput:
        """The stage's own work: score every caption of the shard's images and decide keep / reject."""
        cfg, web, syn, owner, is_syn = self.cfg, shard.web, shard.syn, shard.owner, shard.is_syn
        with progress_bar(shard.images, f"filter {shard.name}", cfg.execution.progress) as bar:
            scores = _score(self.loaded.model, shard.plan, batches, cfg, self.device, self.precision, bar)
            keep, failed, reasons = _decide(scores, is_syn, owner, shard.status_ok, shard.nonempty, cfg)
        # synthetic rows carry their image: take it from the web row (read once)
        syn_full = syn
        for column in ("jpg", "url", "width", "height", "sha256"):
            syn_full = syn_full.append_column(column, web.column(column).take(pa.array(owner[web.num_rows :])))
        rows = pa.concat_tables([web, syn_full.select(web.column_names)])
        table = _scored_table(rows, scores, keep, failed, reasons, cfg, self.loaded.fingerprint)
        selections = {"kept": keep & ~failed, "rejected": ~keep & ~failed, "failed": failed}
        tables = {outcome: table.filter(pa.array(mask)) for outcome, mask in selections.items()}
        extra = {"source": str(shard.src), "captions": str(shard.captions) if shard.captions else None,
                 "judge": self.loaded.fingerprint}  # fmt: skip
        return ShardOutput(tables=tables, counts=_counts(keep, failed, reasons, is_syn), extra=extra,
                           images=shard.images)  # fmt: skip

    def stream(self, plans: list[Callable[[], Planned]], pending: Callable[[int], bool] = lambda i: True) -> ImageStream:
        """The one image loader of this filter run, over the shards `plans` read."""
        return ImageStream(plans, _transform(self.loaded.model), self.resolved.num_workers, self.device, self.cfg.decode, pending)


def filter_job(item: PlanItem, dst_dir: Location, digest: str, work: Callable[[], ShardOutput]) -> ShardJob:
    """The lifecycle job for one web shard (and its caption shard): three outputs in `dst_dir`."""
    src = location(item.src)
    captions = [file_fingerprint(location(item.captions))] if item.captions else []
    return ShardJob(name=item.name, source=str(src), outputs=output_paths(location(dst_dir), item.name), kind="scored",
                    fingerprint=combine_fingerprints([input_fingerprint(src)] + captions), digest=digest, work=work)  # fmt: skip


def filter_shard(
    src: Location,
    captions: Location | None,
    dst_dir: Location,
    model: Any,
    cfg: FilterConfig,
    digest: str,
    name: str | None = None,
) -> ShardStats:
    """Filter one web shard (and its synthetic captions) into `dst_dir` (the settings-hash
    folder) through a loader of its own; skipped (the model not even loaded) when its three
    outputs are complete for these inputs and `digest`. `model` is a `blip_core.LoadedModel`
    or a model folder."""
    item = PlanItem(0, str(src), name or location(src).name, str(captions) if captions else None)

    def work() -> ShardOutput:
        judge = Judge.build(model, cfg)
        with judge.stream([partial(judge.read, item)]) as stream:
            return judge.work(*stream.take(0))

    return run_shard(filter_job(item, dst_dir, digest, work))


def _counts(keep: np.ndarray, failed: np.ndarray, reasons: list[str | None], is_syn: np.ndarray) -> dict[str, int]:
    kept = keep & ~failed
    counts = {
        "input": len(keep),
        "kept": int(kept.sum()),
        "rejected": int((~keep & ~failed).sum()),
        "failed": int(failed.sum()),
        "web_input": int((~is_syn).sum()),
        "web_kept": int((kept & ~is_syn).sum()),
        "synthetic_input": int(is_syn.sum()),
        "synthetic_kept": int((kept & is_syn).sum()),
    }
    for reason in ("itm_below_threshold", "not_top_k", "empty_caption"):
        counts[reason] = sum(1 for r, f in zip(reasons, failed) if r == reason and not f)
    return counts


def filter_config_settings(cfg: FilterConfig) -> dict[str, Any]:
    """The config fields that change scores or decisions (all but `execution`), without
    `itm_first_token` at its default: folders made before that option keep their hash."""
    settings = semantic_settings(cfg)
    if cfg.itm_first_token == "enc":
        settings.pop("itm_first_token")
    return settings


def filter_settings(fingerprint: str, cfg: FilterConfig, device: torch.device, caption_hashes: list[str | None]) -> dict[str, Any]:
    """What the filter's output depends on: judge weights, threshold/top-k, precision and
    the identity of the synthetic captions it scores (their stage's settings hash)."""
    return {
        "stage": "filter",
        "judge": fingerprint,
        **filter_config_settings(cfg),
        "precision": resolve_precision(cfg.execution.precision, device),
        "captions": sorted({h for h in caption_hashes if h}),
    }


def plan_filter(
    inputs: list[Location], out_dir: Location, model: Any, cfg: FilterConfig, caption_dir: Location | None = None
) -> tuple[StageStats, list[PlanItem]]:
    """The filter stage's plan: its settings-hash folder (``stage.json`` written) and one
    `PlanItem` (input, output name, caption shard) per shard. The flow's plan step and
    `run_filter` both use it."""
    device = resolve_device(cfg.execution.device)
    loaded = _load(model, device)
    plan = plan_outputs(expand_inputs(inputs))
    caption_paths = [_captions_for(caption_dir, name) for _, name in plan]
    settings = filter_settings(loaded.fingerprint, cfg, device, [caption_hash(p) for p in caption_paths])
    folder, digest = stage_dir(out_dir, settings)
    items = [PlanItem(i, str(src), name, str(captions) if captions else None)
             for i, ((src, name), captions) in enumerate(zip(plan, caption_paths))]  # fmt: skip
    return StageStats(stage="filter", output=folder, settings_hash=digest), items


def run_filter(
    inputs: list[Location], out_dir: Location, model: Any, cfg: FilterConfig, caption_dir: Location | None = None
) -> StageStats:
    """Filter every web shard in `inputs` (with its caption shard from `caption_dir`) into
    ``out_dir/<settings-hash>/{kept,rejected,failed}/``; complete shards are skipped."""
    judge = Judge.build(model, cfg)
    stats, plan = plan_filter(inputs, out_dir, judge.loaded, cfg, caption_dir)
    return stream_shards(judge, filter_job, stats, plan)  # a bad input shard does not stop the others


def caption_hash(path: Location | None) -> str | None:
    """The caption stage's settings hash recorded for a caption shard (None without one)."""
    if path is None:
        return None
    record = read_completion(path)
    return record.settings_hash if record else None
