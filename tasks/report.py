"""The run report: what the pipeline did to the data, in tables and pictures.

`write_report(run_dir)` reads only files the stages already wrote (completion records
``*.done.json``, training ``metrics.jsonl``, the filter's scored shards, the caption
and ingest shards, ``eval/metrics.json``) and writes ``report.md``, ``report.html`` and
``report-*.png`` into the run folder. Every output is a function of those files and is
replaced atomically, so a rerun after more stages finished simply refreshes the report.
Sections whose inputs do not exist yet say so instead of failing.
"""

from __future__ import annotations

import html
import io
import json
import zlib
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402

from data.images import decode_image  # noqa: E402
from data.layout import INGEST_SPLITS, MODEL_ENTRY, SHARD_STAGES, RunLayout  # noqa: E402
from data.shards import DONE_SUFFIX, list_shards, read_completion, read_table, write_atomic  # noqa: E402

REPORT_MD = "report.md"
REPORT_HTML = "report.html"
EVAL_JSON = Path("eval") / "metrics.json"
# Optional: one JSON object per line {"stage": ..., "seconds": ...} (a flow's stage rows),
# used for stages whose completion records carry no time.
STAGES_JSONL = "stages.jsonl"
# Keys a stage may use in a completion record's `extra` for its wall time in seconds.
TIME_KEYS = ("seconds", "wall_s", "elapsed_s", "duration_s", "time_s")
# Subfolders of one filter output that together make up the stage.
FILTER_PARTS = ("kept", "rejected", "failed")
DEFAULT_THRESHOLD = 0.5
LOSS_PARTS = ("itc", "itm", "lm")
MAIN_COUNTS = ("input", "kept", "rejected", "failed")  # the accounting table's own columns


@dataclass(frozen=True)
class ReportConfig:
    """What the report shows; none of it changes any number in it."""

    examples: int = 8  # images in the example grid
    histogram_bins: int = 40
    dpi: int = 110
    max_caption_chars: int = 52  # captions longer than this are cut in the grid
    max_loss_series: int = 6  # loss curves per training run
    loss_columns: int = 4  # training runs per row of the loss figure


# --------------------------------------------------------------------------- blocks


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class Table:
    headers: list[str]
    rows: list[list[Any]]


@dataclass(frozen=True)
class Figure:
    file: str  # relative to the run folder
    alt: str


Block = Heading | Text | Table | Figure


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if np.isnan(value):
            return "n/a"
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    if value is None:
        return ""
    return str(value)


def to_markdown(blocks: Sequence[Block]) -> str:
    """Render blocks as GitHub-flavoured Markdown."""
    out: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            out.append("#" * b.level + " " + b.text)
        elif isinstance(b, Text):
            out.append(b.text)
        elif isinstance(b, Table):
            esc = [[_cell(c).replace("|", "\\|") for c in row] for row in b.rows]
            lines = ["| " + " | ".join(b.headers) + " |", "|" + "---|" * len(b.headers)]
            lines += ["| " + " | ".join(row) + " |" for row in esc]
            out.append("\n".join(lines))
        elif isinstance(b, Figure):
            out.append(f"![{b.alt}]({b.file})")
    return "\n\n".join(out) + "\n"


def to_html(blocks: Sequence[Block], title: str) -> str:
    """Render blocks as one self-contained HTML page (images linked beside it)."""
    body: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            body.append(f"<h{b.level}>{html.escape(b.text)}</h{b.level}>")
        elif isinstance(b, Text):
            body.append(f"<p>{html.escape(b.text)}</p>")
        elif isinstance(b, Table):
            head = "".join(f"<th>{html.escape(h)}</th>" for h in b.headers)
            rows = "".join(
                "<tr>" + "".join(f"<td>{html.escape(_cell(c))}</td>" for c in row) + "</tr>" for row in b.rows
            )
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif isinstance(b, Figure):
            body.append(f'<figure><img src="{html.escape(b.file)}" alt="{html.escape(b.alt)}"></figure>')
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;}"
        "table{border-collapse:collapse;margin:1em 0;}td,th{border:1px solid #ccc;padding:3px 8px;}"
        "th{background:#f3f3f3;}img{max-width:100%;}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n"
    )


# --------------------------------------------------------------------------- reading the run


def _save_figure(fig: plt.Figure, run_dir: Path, name: str, dpi: int) -> str:
    """Save `fig` as ``run_dir/name`` (atomically) and close it; returns `name`."""
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    write_atomic(run_dir / name, png.getvalue())
    return name


def stage_folders(run_dir: Path) -> dict[str, Path]:
    """Stage name -> the output folder the latest run used (its ``current.json``), for what exists.

    Names: ``ingest/human``, ``ingest/web``, ``ingest/test``, ``caption``, ``filter``,
    ``assemble``.
    """
    layout = RunLayout(run_dir)
    out: dict[str, Path] = {}
    for split in INGEST_SPLITS:
        if layout.ingest(split).is_dir():
            out[f"ingest/{split}"] = layout.ingest(split)
    for stage in SHARD_STAGES:
        current = layout.current_stage(stage)
        if current is not None:
            out[stage] = current
    return out


@dataclass
class StageAccount:
    """One stage's totals over its completion records."""

    stage: str
    shards: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    seconds: float | None = None


def _record_seconds(extra: dict[str, Any]) -> float | None:
    for key in TIME_KEYS:
        if isinstance(extra.get(key), (int, float)):
            return float(extra[key])
    return None


def stage_accounting(run_dir: Path) -> list[StageAccount]:
    """Sum counts and wall time of every completion record, stage by stage.

    A filter's kept / rejected / failed subfolders count as one stage; a record that
    appears in several of them (same shard name) is counted once.
    """
    accounts: list[StageAccount] = []
    for stage, folder in stage_folders(run_dir).items():
        acc = StageAccount(stage=stage)
        seen: set[str] = set()
        parts = [folder] + [folder / p for p in FILTER_PARTS]
        for part in parts:
            for done in sorted(part.glob("*" + DONE_SUFFIX)) if part.is_dir() else []:
                record = read_completion(done)
                if record is None or done.name in seen:
                    continue
                seen.add(done.name)
                acc.shards += 1
                for k, v in record.counts.items():
                    acc.counts[k] = acc.counts.get(k, 0) + int(v)
                secs = _record_seconds(record.extra)
                if secs is not None:
                    acc.seconds = (acc.seconds or 0.0) + secs
        if acc.shards:
            accounts.append(acc)
    return accounts


def read_stage_times(run_dir: Path) -> dict[str, float]:
    """Stage -> seconds from ``stages.jsonl`` (last line per stage wins; torn lines skipped)."""
    path = run_dir / STAGES_JSONL
    out: dict[str, float] = {}
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("stage"), str):
            secs = _record_seconds(row)
            if secs is not None:
                out[row["stage"]] = secs
    return out


def read_training_metrics(run_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """Model name (``pretrain``, ``filter``, ``round-2/final`` ...) -> its ``metrics.jsonl`` lines.

    The models are those the latest run used (``current.json``); a run folder without a
    record (made by hand) shows every ``models/**/metrics.jsonl``. Lines that are not JSON
    objects (a half-written last line after a crash) are skipped.
    """
    layout = RunLayout(run_dir)
    recorded = {name.removeprefix(MODEL_ENTRY): layout.resolve(path).parent / "metrics.jsonl"
                for name, path in layout.read_current().items() if name.startswith(MODEL_ENTRY)}  # fmt: skip
    if not recorded:
        recorded = {p.parent.relative_to(layout.models).as_posix(): p for p in sorted(layout.models.glob("**/metrics.jsonl"))}
    out: dict[str, list[dict[str, Any]]] = {}
    for name, path in recorded.items():
        rows = []
        for line in path.read_text().splitlines() if path.is_file() else []:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                rows.append(row)
        if rows:
            out[name] = rows
    return out


_SCORE_COLUMNS = ["key", "image_id", "source", "caption", "itm_score", "keep", "reject_reason", "threshold"]


def read_scored(filter_dir: Path) -> pa.Table | None:
    """The filter's kept + rejected rows (no image bytes) with a `shard` column."""
    tables = []
    for part in ("kept", "rejected"):
        for path in list_shards(filter_dir / part):
            t = read_table(path, "scored", columns=_SCORE_COLUMNS)
            tables.append(t.append_column("shard", pa.array([path.name] * t.num_rows, pa.string())))
    return pa.concat_tables(tables) if tables else None


def _captions(folder: Path | None, kind: str) -> list[str]:
    if folder is None:
        return []
    out: list[str] = []
    for path in list_shards(folder):
        t = read_table(path, kind, columns=["caption", "status"])
        ok = pc.equal(t["status"], "ok")
        out += [c for c in t.filter(ok)["caption"].to_pylist() if c is not None]
    return out


# --------------------------------------------------------------------------- sections


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
        blocks.append(Text(f"No stage recorded its wall time (`extra.seconds` in a completion record, or `{STAGES_JSONL}`)."))
    return blocks


def _reject_reasons(scored: pa.Table | None) -> list[Block]:
    if scored is None:
        return []
    rej = scored.filter(pc.invert(scored["keep"].fill_null(False)))
    counts: dict[tuple[str, str], int] = defaultdict(int)
    for src, reason in zip(rej["source"].to_pylist(), rej["reject_reason"].to_pylist(), strict=True):
        counts[(src, reason or "unspecified")] += 1
    if not counts:
        return [Text("The filter rejected nothing.")]
    rows = [[s, r, n] for (s, r), n in sorted(counts.items())]
    return [Heading("Rejected by reason", 3), Table(["source", "reason", "rows"], rows)]


def _is_loss_key(name: str) -> bool:
    """Loss series in a metrics line: ``loss``, ``loss_itc``, ``itm_loss``, ``itc``, ``itm``, ``lm``."""
    return "loss" in name or name in LOSS_PARTS


def _loss_section(run_dir: Path, cfg: ReportConfig) -> list[Block]:
    runs = read_training_metrics(run_dir)
    blocks: list[Block] = [Heading("Training")]
    if not runs:
        return blocks + [Text("No training metrics (`models/*/metrics.jsonl`) yet.")]
    ncols = min(len(runs), cfg.loss_columns)
    nrows = (len(runs) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.2 * nrows), squeeze=False)
    for ax in axes.flat[len(runs):]:
        ax.axis("off")
    summary = []
    for ax, (name, rows) in zip(axes.flat, runs.items()):
        keys = [k for k in rows[0] if _is_loss_key(k) and isinstance(rows[0][k], (int, float))]
        keys = sorted(keys, key=lambda k: (k != "loss", k))[: cfg.max_loss_series]
        steps = [r.get("step", i) for i, r in enumerate(rows)]
        for k in keys:
            ax.plot(steps, [r.get(k, np.nan) for r in rows], label=k, marker="." if len(rows) < 20 else None)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        if keys:
            ax.legend(fontsize=7)
        first, last = rows[0], rows[-1]
        main = keys[0] if keys else None
        summary.append([name, steps[-1], first.get(main, ""), last.get(main, ""), main or ""])
    fig.tight_layout()
    blocks.append(Figure(_save_figure(fig, run_dir, "report-loss.png", cfg.dpi), "training loss curves"))
    blocks.append(Table(["model", "last step", "first loss", "last loss", "series"], summary))
    return blocks


def _filter_section(run_dir: Path, scored: pa.Table | None, cfg: ReportConfig) -> list[Block]:
    blocks: list[Block] = [Heading("Filter")]
    if scored is None or scored.num_rows == 0:
        return blocks + [Text("No filter output yet.")]
    thr_values = [t for t in scored["threshold"].to_pylist() if t is not None]
    threshold = float(np.median(thr_values)) if thr_values else DEFAULT_THRESHOLD
    sources = sorted(set(scored["source"].to_pylist()))
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    bins = np.linspace(0.0, 1.0, cfg.histogram_bins + 1)
    rows = []
    for src in sources:
        sub = scored.filter(pc.equal(scored["source"], src))
        s = np.asarray([v for v in sub["itm_score"].to_pylist() if v is not None], dtype=float)
        ax.hist(s, bins=bins, alpha=0.55, label=f"{src} (n={len(s)})")
        kept = int(pc.sum(sub["keep"].cast(pa.int64())).as_py() or 0)
        rows.append([src, sub.num_rows, kept, kept / sub.num_rows if sub.num_rows else float("nan")])
    ax.axvline(threshold, color="k", linestyle="--", label=f"threshold {threshold:.2f}")
    ax.set_xlabel("ITM match probability")
    ax.set_ylabel("captions")
    ax.set_title("ITM scores: web vs synthetic captions")
    ax.legend(fontsize=8)
    blocks.append(Figure(_save_figure(fig, run_dir, "report-itm-hist.png", cfg.dpi), "ITM score histograms"))
    blocks.append(Table(["source", "scored", "kept", "keep rate"], rows))
    blocks += _reject_reasons(scored)
    blocks += _keep_rate_plot(run_dir, scored, sources, cfg)
    return blocks


def _keep_rate_plot(run_dir: Path, scored: pa.Table, sources: list[str], cfg: ReportConfig) -> list[Block]:
    shards = sorted(set(scored["shard"].to_pylist()))
    fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * len(shards) + 2), 3.0))
    width = 0.8 / max(1, len(sources))
    x = np.arange(len(shards))
    for i, src in enumerate(sources):
        rates = []
        for shard in shards:
            sub = scored.filter(pc.and_(pc.equal(scored["shard"], shard), pc.equal(scored["source"], src)))
            n = sub.num_rows
            rates.append(pc.sum(sub["keep"].cast(pa.int64())).as_py() / n if n else np.nan)
        ax.bar(x + i * width, rates, width=width, label=src)
    ax.set_xticks(x + width * (len(sources) - 1) / 2, [s.removesuffix(".parquet") for s in shards], rotation=45)
    ax.set_ylim(0, 1)
    ax.set_ylabel("keep rate")
    ax.set_title("Keep rate per shard")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return [Heading("Keep rate per shard", 3), Figure(_save_figure(fig, run_dir, "report-keep-rate.png", cfg.dpi), "keep rate per shard")]


def _caption_length_section(run_dir: Path, folders: dict[str, Path], cfg: ReportConfig) -> list[Block]:
    sets = {
        "human": _captions(folders.get("ingest/human"), "pairs"),
        "web": _captions(folders.get("ingest/web"), "pairs"),
        "synthetic": _captions(folders.get("caption"), "pairs"),
    }
    sets = {k: v for k, v in sets.items() if v}
    blocks: list[Block] = [Heading("Caption lengths")]
    if not sets:
        return blocks + [Text("No captions yet.")]
    lengths = {k: np.asarray([len(c.split()) for c in v]) for k, v in sets.items()}
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    top = int(max(x.max() for x in lengths.values())) + 1
    bins = np.arange(0, top + 1) + 0.5
    for name, lens in lengths.items():
        ax.hist(lens, bins=bins, alpha=0.5, density=True, label=f"{name} (n={len(lens)})")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("words per caption")
    ax.set_ylabel("share")
    ax.set_title("Caption length distributions")
    ax.legend(fontsize=8)
    blocks.append(Figure(_save_figure(fig, run_dir, "report-caption-length.png", cfg.dpi), "caption lengths"))
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


def _image_bytes(filter_dir: Path, image_ids: set[str]) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for part in ("kept", "rejected"):
        for path in list_shards(filter_dir / part):
            t = read_table(path, "scored", columns=["image_id", "jpg"])
            mask = pc.is_in(t["image_id"], pa.array(sorted(image_ids), pa.string()))
            for img, data in zip(*(t.filter(mask)[c].to_pylist() for c in ("image_id", "jpg")), strict=True):
                if data is not None and img not in out:
                    out[img] = data
    return out


def _short(text: str | None, n: int) -> str:
    text = text or ""
    return text if len(text) <= n else text[: n - 1] + "…"


def _examples_section(run_dir: Path, filter_dir: Path | None, scored: pa.Table | None, cfg: ReportConfig) -> list[Block]:
    blocks: list[Block] = [Heading("Examples")]
    if filter_dir is None or scored is None or scored.num_rows == 0:
        return blocks + [Text("No filter output yet.")]
    picks = _pick_examples(scored, cfg.examples)
    images = _image_bytes(filter_dir, set(picks))
    rows_by_image: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in scored.filter(pc.is_in(scored["image_id"], pa.array(picks, pa.string()))).to_pylist():
        rows_by_image[row["image_id"]].append(row)
    cols = 2
    nrows = (len(picks) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols * 2, figsize=(13, 1.9 * nrows), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 3] * cols})
    table_rows = []
    for ax in axes.flat:
        ax.axis("off")
    for i, img in enumerate(picks):
        r, c = divmod(i, cols)
        decoded = decode_image(images.get(img))
        if decoded.image is not None:
            axes[r][2 * c].imshow(np.asarray(decoded.image), interpolation="nearest")
        lines = []
        for row in sorted(rows_by_image[img], key=lambda x: (x["source"] != "web", x["key"])):
            verdict = "KEEP" if row["keep"] else "REJECT"
            score = row["itm_score"] if row["itm_score"] is not None else float("nan")
            lines.append(f"{row['source']}: {_short(row['caption'], cfg.max_caption_chars)}")
            lines.append(f"    ITM {score:.2f} {verdict}")
            table_rows.append([img, row["source"], row["caption"], score, verdict])
        axes[r][2 * c + 1].text(0.0, 0.5, "\n".join(lines), va="center", ha="left", fontsize=8, family="monospace")
    fig.suptitle("Example images: web and synthetic captions, ITM scores, verdicts")
    blocks.append(Figure(_save_figure(fig, run_dir, "report-examples.png", cfg.dpi), "example grid"))
    blocks.append(Table(["image", "source", "caption", "ITM", "verdict"], table_rows))
    return blocks


def _eval_section(run_dir: Path) -> list[Block]:
    path = run_dir / EVAL_JSON
    blocks: list[Block] = [Heading("Evaluation")]
    if not path.is_file():
        return blocks + [Text(f"No evaluation yet (`{EVAL_JSON}`).")]
    data = json.loads(path.read_text())
    scalars = [[k, v] for k, v in data.items() if not isinstance(v, (dict, list))]
    if scalars:
        blocks.append(Table(["field", "value"], scalars))
    for name, section in data.items():
        if isinstance(section, dict) and section:
            blocks.append(Heading(name.replace("_", " "), 3))
            blocks.append(Table(["metric", "value"], [[k, v] for k, v in section.items()]))
        elif isinstance(section, dict) or section is None:
            continue
    return blocks


# --------------------------------------------------------------------------- zero-shot video (issue 17)

VIDEO_JSON = Path("eval") / "video.json"  # tasks.video_eval.VIDEO_EVAL_FILE


def _video_section(run_dir: Path) -> list[Block]:
    """The models' zero-shot video R@1 on synthetic clips, beside the final model's image R@1."""
    path = run_dir / VIDEO_JSON
    if not path.is_file():
        return []
    models = json.loads(path.read_text()).get("models", {})
    image = json.loads((run_dir / EVAL_JSON).read_text()).get("retrieval", {}) if (run_dir / EVAL_JSON).is_file() else {}
    rows = []
    for name, r in models.items():
        ret, cap = r.get("retrieval", {}), r.get("captioning", {})
        img = image if name == "final" else {}
        rows.append([name, r.get("n_videos"), r.get("frames"), ret.get("t2v_R@1"), ret.get("t2v_R@5"), ret.get("t2v_R@10"),
                     ret.get("v2t_R@1"), img.get("IR@1", float("nan")), img.get("TR@1", float("nan")),
                     cap.get("CIDEr", float("nan")), cap.get("scene_exact", float("nan"))])  # fmt: skip
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


# --------------------------------------------------------------------------- entry points


def report_blocks(run_dir: Path, cfg: ReportConfig | None = None) -> list[Block]:
    """Build every section (writing its PNGs into `run_dir`) and return the blocks."""
    cfg = cfg or ReportConfig()
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run folder; pass the folder a run wrote (runs/<run>)")
    folders = stage_folders(run_dir)
    filter_dir = folders.get("filter")
    scored = read_scored(filter_dir) if filter_dir is not None else None
    blocks: list[Block] = [Heading(f"capfilt run report: {run_dir.name}", 1)]
    blocks += _accounting_section(run_dir)
    blocks += _loss_section(run_dir, cfg)
    blocks += _filter_section(run_dir, scored, cfg)
    blocks += _caption_length_section(run_dir, folders, cfg)
    blocks += _examples_section(run_dir, filter_dir, scored, cfg)
    blocks += _eval_section(run_dir)
    blocks += _video_section(run_dir)
    return blocks


def write_report(run_dir: Path, cfg: ReportConfig | None = None) -> Path:
    """Write ``report.md``, ``report.html`` and the ``report-*.png`` plots; returns report.md.

    Overwrites the previous report atomically, file by file: safe to rerun any time.
    """
    run_dir = Path(run_dir)
    blocks = report_blocks(run_dir, cfg)
    md_path = run_dir / REPORT_MD
    write_atomic(md_path, to_markdown(blocks))
    write_atomic(run_dir / REPORT_HTML, to_html(blocks, f"capfilt report: {run_dir.name}"))
    return md_path


def artifact_markdown(run_dir: Path) -> str:
    """Markdown for a Prefect artifact: the report's text with links to the files.

    Prefect's UI cannot show local images, so the figures become file links.
    """
    run_dir = Path(run_dir).resolve()
    md_path = run_dir / REPORT_MD
    if not md_path.is_file():
        write_report(run_dir)
    text = md_path.read_text()
    for png in sorted(run_dir.glob("report-*.png")):
        text = text.replace(f"]({png.name})", f"]({png.as_uri()})")
    header = f"Full report: [{md_path}]({md_path.as_uri()}) ([HTML]({(run_dir / REPORT_HTML).as_uri()}))\n\n"
    return header + text
