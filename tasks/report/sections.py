"""The report's sections: what the run folder holds, as blocks and figures.

Each section reads through `tasks.report.read`, draws through `tasks.report.figures`
(writing its ``report-*.png`` into the run folder) and returns its blocks; a section
whose inputs do not exist yet says so in a `Text` instead of failing.
"""

from __future__ import annotations

import zlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data.gallery import write_review_galleries
from tasks.report.figures import caption_length_histograms, example_grid, itm_histograms, keep_rate_bars
from tasks.report.figures import loss_curves, save_figure, threshold_curves
from data.layout import RunLayout
from data.storage import location
from tasks.report.read import read_eval_metrics, read_image_bytes, read_ok_captions, read_video_metrics
from tasks.report.read import read_scored, read_stage_settings, read_stage_times, read_training_metrics
from tasks.report.read import read_web_noise, stage_accounting, stage_folders
from tasks.report.render import Block, Figure, Heading, Table, Text

DEFAULT_THRESHOLD = 0.5
LOSS_PARTS = ("itc", "itm", "lm")
MAIN_COUNTS = ("input", "kept", "rejected", "failed")  # the accounting table's own columns
THRESHOLD_GRID = np.linspace(0.0, 1.0, 101)  # the keep-rate figure's thresholds
THRESHOLD_TABLE = (0.1, 0.3, 0.5, 0.7, 0.9)  # the keep-rate table's thresholds (plus those in use)


@dataclass(frozen=True)
class ReportConfig:
    """What the report shows; none of it changes any number in it."""

    examples: int = 8  # images in the example grid
    histogram_bins: int = 40
    dpi: int = 110
    max_caption_chars: int = 52  # captions longer than this are cut in the grid
    max_loss_series: int = 6  # loss curves per training run
    loss_columns: int = 4  # training runs per row of the loss figure


def _accounting_section(run_dir: Path) -> list[Block]:
    accounts = stage_accounting(run_dir)
    blocks: list[Block] = [Heading("Stage by stage accounting")]
    if not accounts:
        return blocks + [Text("No completion records yet.")]
    rows = []
    for a in accounts:
        main = [a.counts.get(k, "") for k in MAIN_COUNTS]
        details = ", ".join(f"{k} {v}" for k, v in sorted(a.counts.items()) if k not in MAIN_COUNTS)
        rows.append([a.stage, a.shards, *main, details])
    blocks.append(Text("Rows by outcome, summed over each stage's completion records (kept + rejected + failed = input)."))
    blocks.append(Table(["stage", "shards", *MAIN_COUNTS, "details"], rows))
    flow_times = read_stage_times(run_dir)
    trows = []
    for a in accounts:
        secs = a.seconds or flow_times.get(a.stage) or flow_times.get(a.stage.split("/")[0])
        if secs:
            n = a.counts.get("input", sum(a.counts.values()))
            trows.append([a.stage, secs, n, n / secs])
    counted = {a.stage for a in accounts} | {a.stage.split("/")[0] for a in accounts}
    trows += [[stage, secs, "", ""] for stage, secs in flow_times.items() if stage not in counted]
    if trows:
        blocks.append(Heading("Time and throughput", 3))
        blocks.append(Table(["stage", "seconds", "rows", "rows/s"], trows))
    else:
        blocks.append(Text(f"No stage recorded its wall time (`extra.seconds` in a completion record, or `{RunLayout(run_dir).stages_log.name}`)."))
    return blocks


def _is_loss_key(name: str) -> bool:
    """Loss series in a metrics line: ``loss``, ``loss_itc``, ``itm_loss``, ``itc``, ``itm``, ``lm``."""
    return "loss" in name or name in LOSS_PARTS


def _loss_series(first_row: dict[str, Any], limit: int) -> list[str]:
    """The numeric loss keys of a metrics line, ``loss`` first, at most `limit`."""
    keys = [k for k in first_row if _is_loss_key(k) and isinstance(first_row[k], (int, float))]
    return sorted(keys, key=lambda k: (k != "loss", k))[:limit]


def _loss_section(run_dir: Path, cfg: ReportConfig) -> list[Block]:
    runs = read_training_metrics(run_dir)
    blocks: list[Block] = [Heading("Training")]
    if not runs:
        return blocks + [Text("No training metrics (`models/*/metrics.jsonl`) yet.")]
    series = {name: _loss_series(rows[0], cfg.max_loss_series) for name, rows in runs.items()}
    summary = []
    for name, rows in runs.items():
        first, last = rows[0], rows[-1]
        main = series[name][0] if series[name] else None
        summary.append([name, last.get("step", len(rows) - 1), first.get(main, ""), last.get(main, ""), main or ""])
    png = save_figure(loss_curves(runs, series, cfg.loss_columns), run_dir, "report-loss.png", cfg.dpi)
    blocks.append(Figure(png, "training loss curves"))
    blocks.append(Table(["model", "last step", "first loss", "last loss", "series"], summary))
    return blocks


def _kept(rows: pa.Table) -> int:
    return int(pc.sum(rows["keep"].cast(pa.int64())).as_py() or 0)


def _filter_section(run_dir: Path, scored: pa.Table | None, cfg: ReportConfig) -> list[Block]:
    blocks: list[Block] = [Heading("Filter")]
    if scored is None or scored.num_rows == 0:
        return blocks + [Text("No filter output yet.")]
    threshold = _filter_threshold(scored)
    sources = sorted(set(scored["source"].to_pylist()))
    scores, rows = {}, []
    for src in sources:
        sub = scored.filter(pc.equal(scored["source"], src))
        scores[src] = np.asarray([v for v in sub["itm_score"].to_pylist() if v is not None], dtype=float)
        kept = _kept(sub)
        rows.append([src, sub.num_rows, kept, kept / sub.num_rows if sub.num_rows else float("nan")])
    png = save_figure(itm_histograms(scores, threshold, cfg.histogram_bins), run_dir, "report-itm-hist.png", cfg.dpi)
    blocks.append(Figure(png, "ITM score histograms"))
    blocks.append(Table(["source", "scored", "kept", "keep rate"], rows))
    blocks += _reject_reasons(scored)
    blocks += _keep_rate_section(run_dir, scored, sources, cfg)
    return blocks


def _filter_threshold(scored: pa.Table) -> float:
    """The filter's threshold: the median over its rows (one value for one filter folder)."""
    values = [t for t in scored["threshold"].to_pylist() if t is not None]
    return float(np.median(values)) if values else DEFAULT_THRESHOLD


def _reject_reasons(scored: pa.Table) -> list[Block]:
    rej = scored.filter(pc.invert(scored["keep"].fill_null(False)))
    counts: dict[tuple[str, str], int] = defaultdict(int)
    for src, reason in zip(rej["source"].to_pylist(), rej["reject_reason"].to_pylist(), strict=True):
        counts[(src, reason or "unspecified")] += 1
    if not counts:
        return [Text("The filter rejected nothing.")]
    rows = [[s, r, n] for (s, r), n in sorted(counts.items())]
    return [Heading("Rejected by reason", 3), Table(["source", "reason", "rows"], rows)]


def _keep_rate_section(run_dir: Path, scored: pa.Table, sources: list[str], cfg: ReportConfig) -> list[Block]:
    shards = sorted(set(scored["shard"].to_pylist()))
    rates: dict[str, list[float]] = {}
    for src in sources:
        rates[src] = []
        for shard in shards:
            sub = scored.filter(pc.and_(pc.equal(scored["shard"], shard), pc.equal(scored["source"], src)))
            n = sub.num_rows
            rates[src].append(pc.sum(sub["keep"].cast(pa.int64())).as_py() / n if n else np.nan)
    png = save_figure(keep_rate_bars(shards, rates), run_dir, "report-keep-rate.png", cfg.dpi)
    return [Heading("Keep rate per shard", 3), Figure(png, "keep rate per shard")]


@dataclass(frozen=True)
class ThresholdSweep:
    """What each threshold would keep, from the stored scores (the threshold part of the
    filter's rule; top-k not applied)."""

    thresholds: np.ndarray  # (G,)
    kept: dict[str, np.ndarray]  # source -> (G,) rows whose score reaches the threshold
    rows: dict[str, int]  # source -> scored rows (kept + rejected; an unscored row is never kept)
    precision: np.ndarray | None  # (G,) share of the rejected web rows known to the truth that are noise
    recall: np.ndarray | None  # (G,) share of the noisy web rows that are rejected

    def keep_rate(self, source: str) -> np.ndarray:
        return self.kept[source] / self.rows[source] if self.rows[source] else np.full(len(self.thresholds), np.nan)


def _reaching(scores: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """(G,) how many of `scores` (float32, NaN = unscored) are >= each threshold (compared in
    float32, as the filter compares)."""
    ordered = np.sort(scores[~np.isnan(scores)])
    return len(ordered) - np.searchsorted(ordered, thresholds.astype(np.float32), side="left")


def threshold_sweep(scored: pa.Table, thresholds: np.ndarray, noisy: dict[str, bool] | None) -> ThresholdSweep:
    """Keep counts per source at each threshold and, with `noisy` (web key -> noise), the
    precision / recall of rejection as the detection of noise."""
    score = np.asarray(pc.fill_null(scored["itm_score"], np.nan).to_numpy(zero_copy_only=False), dtype=np.float32)
    source = np.asarray(scored["source"].to_pylist(), dtype=object)
    kept, rows = {}, {}
    for src in sorted(set(source)):
        kept[src] = _reaching(score[source == src], thresholds)
        rows[src] = int((source == src).sum())
    precision = recall = None
    if noisy is not None:
        web = np.flatnonzero(source == "web")
        truth = [noisy.get(k) for k in scored["key"].take(pa.array(web, pa.int64())).to_pylist()]
        known = np.asarray([t is not None for t in truth], dtype=bool)
        noise = np.asarray([bool(t) for t in truth], dtype=bool)
        if known.any() and noise.any():
            rejected = known.sum() - _reaching(score[web][known], thresholds)
            noise_rejected = noise.sum() - _reaching(score[web][noise], thresholds)
            with np.errstate(invalid="ignore", divide="ignore"):
                precision = np.where(rejected > 0, noise_rejected / rejected, np.nan)
            recall = noise_rejected / noise.sum()
    return ThresholdSweep(thresholds, kept, rows, precision, recall)


def _thresholds_in_use(folders: dict[str, Path], scored: pa.Table) -> dict[str, float]:
    """Label -> threshold: the filter's (its rows' median) and a re-deciding assemble's."""
    marks = {"filter": _filter_threshold(scored)}
    assembled = read_stage_settings(folders.get("assemble")).get("threshold")
    if isinstance(assembled, (int, float)):
        marks["assemble"] = float(assembled)
    return marks


def _threshold_section(run_dir: Path, folders: dict[str, Path], scored: pa.Table | None, cfg: ReportConfig) -> list[Block]:
    blocks: list[Block] = [Heading("Keep rate against threshold")]
    if scored is None or scored.num_rows == 0:
        return blocks + [Text("No filter output yet.")]
    noisy = read_web_noise(run_dir)
    marks = _thresholds_in_use(folders, scored)
    curve = threshold_sweep(scored, THRESHOLD_GRID, noisy)
    noise = {"precision": curve.precision, "recall": curve.recall} if curve.precision is not None else None
    fig = threshold_curves(THRESHOLD_GRID, {src: curve.keep_rate(src) for src in curve.kept}, marks, noise)
    blocks.append(Figure(save_figure(fig, run_dir, "report-threshold.png", cfg.dpi), "keep rate against threshold"))
    table_at = np.asarray(sorted(set(THRESHOLD_TABLE) | {round(v, 4) for v in marks.values()}))
    at = threshold_sweep(scored, table_at, noisy)
    headers = ["threshold"] + [f"{src} keep rate" for src in at.kept] + [f"{src} kept" for src in at.kept]
    headers += ["noise precision", "noise recall"] if at.precision is not None else []
    rows = []
    for i, t in enumerate(table_at):
        row: list[Any] = [float(t)] + [float(at.keep_rate(src)[i]) for src in at.kept] + [int(at.kept[src][i]) for src in at.kept]
        row += [float(at.precision[i]), float(at.recall[i])] if at.precision is not None and at.recall is not None else []
        rows.append(row)
    blocks.append(Table(headers, rows))
    where = RunLayout(run_dir).relative(folders["filter"])
    truth = ("Noise precision: the share of rejected web captions that the synthetic world's truth calls noise "
             "(swapped or junk); recall: the share of the noise rejected. ") if at.precision is not None else ""
    blocks.append(Text(
        "Share of each source's scored captions whose stored ITM score reaches the threshold (thresholds in use: "
        + ", ".join(f"{k} {v:.2f}" for k, v in marks.items()) + "; top-k not applied). " + truth
        + "To build D' at another threshold from these scores, without rescoring: "
        f"`capfilt assemble --input RUN/ingest/human RUN/{where}/kept RUN/{where}/rejected --output RUN/assemble "
        "--threshold T`, or `assemble: {threshold: T}` in the run config."
    ))  # fmt: skip
    return blocks


def _caption_length_section(run_dir: Path, folders: dict[str, Path], cfg: ReportConfig) -> list[Block]:
    sets = {
        "human": read_ok_captions(folders.get("ingest/human"), "pairs"),
        "web": read_ok_captions(folders.get("ingest/web"), "pairs"),
        "synthetic": read_ok_captions(folders.get("caption"), "pairs"),
    }
    sets = {k: v for k, v in sets.items() if v}
    blocks: list[Block] = [Heading("Caption lengths")]
    if not sets:
        return blocks + [Text("No captions yet.")]
    lengths = {k: np.asarray([len(c.split()) for c in v]) for k, v in sets.items()}
    png = save_figure(caption_length_histograms(lengths), run_dir, "report-caption-length.png", cfg.dpi)
    blocks.append(Figure(png, "caption lengths"))
    rows = [[k, len(v), float(v.mean()), int(np.median(v)), int(v.max())] for k, v in lengths.items()]
    blocks.append(Table(["source", "captions", "mean words", "median", "max"], rows))
    return blocks


def _pick_examples(scored: pa.Table, n: int) -> list[str]:
    """Image ids with a web and a synthetic row: half web-rejected, half web-kept (stable)."""
    by_image: dict[str, set[str]] = defaultdict(set)
    web_keep: dict[str, bool] = {}
    for img, src, keep in zip(
        scored["image_id"].to_pylist(), scored["source"].to_pylist(), scored["keep"].to_pylist(), strict=True
    ):
        by_image[img].add(src)
        if src == "web":
            web_keep[img] = bool(keep)
    both = [i for i, s in by_image.items() if {"web", "synthetic"} <= s] or list(by_image)
    both.sort(key=lambda i: zlib.crc32(i.encode()))
    rejected = [i for i in both if not web_keep.get(i, True)]
    kept = [i for i in both if web_keep.get(i, True)]
    picks = rejected[: n // 2] + kept[: n - min(len(rejected), n // 2)]
    picks += [i for i in rejected if i not in picks][: n - len(picks)]  # too few kept: more rejected
    return picks[:n]


def _short(text: str | None, n: int) -> str:
    text = text or ""
    return text if len(text) <= n else text[: n - 1] + "…"


def _examples_section(run_dir: Path, filter_dir: Path | None, scored: pa.Table | None, cfg: ReportConfig) -> list[Block]:
    blocks: list[Block] = [Heading("Examples")]
    if filter_dir is None or scored is None or scored.num_rows == 0:
        return blocks + [Text("No filter output yet.")]
    picks = _pick_examples(scored, cfg.examples)
    images = read_image_bytes(filter_dir, set(picks))
    rows_by_image: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in scored.filter(pc.is_in(scored["image_id"], pa.array(picks, pa.string()))).to_pylist():
        rows_by_image[row["image_id"]].append(row)
    notes, table_rows = [], []
    for img in picks:
        lines = []
        for row in sorted(rows_by_image[img], key=lambda x: (x["source"] != "web", x["key"])):
            verdict = "KEEP" if row["keep"] else "REJECT"
            score = row["itm_score"] if row["itm_score"] is not None else float("nan")
            lines.append(f"{row['source']}: {_short(row['caption'], cfg.max_caption_chars)}")
            lines.append(f"    ITM {score:.2f} {verdict}")
            table_rows.append([img, row["source"], row["caption"], score, verdict])
        notes.append("\n".join(lines))
    fig = example_grid([images.get(img) for img in picks], notes)
    blocks.append(Figure(save_figure(fig, run_dir, "report-examples.png", cfg.dpi), "example grid"))
    blocks.append(Table(["image", "source", "caption", "ITM", "verdict"], table_rows))
    return blocks


def _eval_section(run_dir: Path) -> list[Block]:
    data = read_eval_metrics(run_dir)
    blocks: list[Block] = [Heading("Evaluation")]
    if data is None:
        layout = RunLayout(run_dir)
        return blocks + [Text(f"No evaluation yet (`{layout.relative(layout.metrics)}`).")]
    scalars = [[k, v] for k, v in data.items() if not isinstance(v, (dict, list))]
    if scalars:
        blocks.append(Table(["field", "value"], scalars))
    for name, section in data.items():
        if isinstance(section, dict) and section:
            blocks.append(Heading(name.replace("_", " "), 3))
            blocks.append(Table(["metric", "value"], [[k, v] for k, v in section.items()]))
    return blocks


def _gallery_section(run_dir: Path) -> list[Block]:
    """Write the review galleries beside the report (rejected web captions, kept synthetic
    captions, borderline scores: `data.gallery.write_review_galleries`) and link them."""
    written = write_review_galleries(run_dir)
    if not written:
        return []
    blocks: list[Block] = [Heading("Galleries"), Text("Open in a browser; `capfilt browse RUN \"SQL\"` makes more.")]
    for query, path, gallery in written:
        rows = f"the first {gallery.shown} of {gallery.total}" if gallery.truncated else str(gallery.total)
        blocks.append(Text(f"[{query.title}]({path.name}): {rows} rows."))
    return blocks


def _video_section(run_dir: Path) -> list[Block]:
    """The models' zero-shot video R@1 on synthetic clips, beside the final model's image R@1."""
    video = read_video_metrics(run_dir)
    if video is None:
        return []
    image = (read_eval_metrics(run_dir) or {}).get("retrieval", {})
    nan = float("nan")
    rows = []
    for name, r in video.get("models", {}).items():
        ret, cap = r.get("retrieval", {}), r.get("captioning", {})
        img = image if name == "final" else {}
        rows.append([name, r.get("n_videos"), r.get("frames"), ret.get("t2v_R@1"), ret.get("t2v_R@5"), ret.get("t2v_R@10"),
                     ret.get("v2t_R@1"), img.get("IR@1", nan), img.get("TR@1", nan),
                     cap.get("CIDEr", nan), cap.get("scene_exact", nan)])  # fmt: skip
    return [
        Heading("Zero-shot video"),
        Text("The image-trained models retrieve and caption synthetic clips (drifting shapes, the scene stays "
             "true) with no video training: frames sampled uniformly, ITC on the mean of the frames' projected "
             "[CLS], ITM and captions over all frames' tokens, as BLIP did on MSR-VTT (t2v R@1 43.3 zero-shot). "
             "Hits are scene matches. Image R@1 is the final model's on the image test set (`eval/metrics.json`); "
             "pretrain is the model trained without CapFilt (no C/F)."),
        Table(["model", "clips", "frames", "t2v R@1", "t2v R@5", "t2v R@10", "v2t R@1", "image IR@1 (t2i)",
               "image TR@1 (i2t)", "video CIDEr", "video caption scene exact"], rows),
    ]  # fmt: skip


def report_blocks(run_dir: Path, cfg: ReportConfig | None = None) -> list[Block]:
    """Build every section (writing its PNGs into `run_dir`) and return the blocks."""
    cfg = cfg or ReportConfig()
    run_dir = location(run_dir)  # a local folder or a URL (`data.storage`)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run folder; pass the folder a run wrote (runs/<run>)")
    folders = stage_folders(run_dir)
    filter_dir = folders.get("filter")
    scored = read_scored(filter_dir) if filter_dir is not None else None
    blocks: list[Block] = [Heading(f"capfilt run report: {run_dir.name}", 1)]
    blocks += _accounting_section(run_dir)
    blocks += _loss_section(run_dir, cfg)
    blocks += _filter_section(run_dir, scored, cfg)
    blocks += _threshold_section(run_dir, folders, scored, cfg)
    blocks += _caption_length_section(run_dir, folders, cfg)
    blocks += _examples_section(run_dir, filter_dir, scored, cfg)
    blocks += _gallery_section(run_dir)
    blocks += _eval_section(run_dir)
    blocks += _video_section(run_dir)
    return blocks
