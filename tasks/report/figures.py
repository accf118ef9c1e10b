"""The report's matplotlib figures: numbers in, a `plt.Figure` out, and `save_figure` to
write one as a PNG beside the report. No figure reads the run folder."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402

from data.images import decode_image  # noqa: E402
from data.shards import write_atomic  # noqa: E402


def save_figure(fig: plt.Figure, run_dir: Path, name: str, dpi: int) -> str:
    """Save `fig` as ``run_dir/name`` (atomically) and close it; returns `name`."""
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    write_atomic(run_dir / name, png.getvalue())
    return name


def loss_curves(
    runs: Mapping[str, Sequence[Mapping[str, Any]]], series: Mapping[str, Sequence[str]], columns: int
) -> plt.Figure:
    """One panel per training run (`columns` per row): its `series[name]` against the step."""
    ncols = min(len(runs), columns)
    nrows = (len(runs) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.2 * nrows), squeeze=False)
    for ax in axes.flat[len(runs):]:
        ax.axis("off")
    for ax, (name, rows) in zip(axes.flat, runs.items()):
        steps = [r.get("step", i) for i, r in enumerate(rows)]
        for k in series[name]:
            ax.plot(steps, [r.get(k, np.nan) for r in rows], label=k, marker="." if len(rows) < 20 else None)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        if series[name]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def itm_histograms(scores: Mapping[str, np.ndarray], threshold: float, bins: int) -> plt.Figure:
    """ITM score histograms over [0, 1], one per caption source, and the filter's threshold."""
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    edges = np.linspace(0.0, 1.0, bins + 1)
    for src, s in scores.items():
        ax.hist(s, bins=edges, alpha=0.55, label=f"{src} (n={len(s)})")
    ax.axvline(threshold, color="k", linestyle="--", label=f"threshold {threshold:.2f}")
    ax.set_xlabel("ITM match probability")
    ax.set_ylabel("captions")
    ax.set_title("ITM scores: web vs synthetic captions")
    ax.legend(fontsize=8)
    return fig


def keep_rate_bars(shards: Sequence[str], rates: Mapping[str, Sequence[float]]) -> plt.Figure:
    """Grouped bars: per shard, the keep rate of each source (`rates[source][i]` for `shards[i]`)."""
    fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * len(shards) + 2), 3.0))
    width = 0.8 / max(1, len(rates))
    x = np.arange(len(shards))
    for i, (src, values) in enumerate(rates.items()):
        ax.bar(x + i * width, values, width=width, label=src)
    ax.set_xticks(x + width * (len(rates) - 1) / 2, [s.removesuffix(".parquet") for s in shards], rotation=45)
    ax.set_ylim(0, 1)
    ax.set_ylabel("keep rate")
    ax.set_title("Keep rate per shard")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


def caption_length_histograms(lengths: Mapping[str, np.ndarray]) -> plt.Figure:
    """Words-per-caption distributions (as shares), one per caption set."""
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
    return fig


def example_grid(images: Sequence[bytes | None], notes: Sequence[str], columns: int = 2) -> plt.Figure:
    """Each image beside its note (monospace text), `columns` image / note pairs per row."""
    nrows = (len(images) + columns - 1) // columns
    fig, axes = plt.subplots(nrows, columns * 2, figsize=(13, 1.9 * nrows), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 3] * columns})
    for ax in axes.flat:
        ax.axis("off")
    for i, (data, note) in enumerate(zip(images, notes, strict=True)):
        r, c = divmod(i, columns)
        decoded = decode_image(data)
        if decoded.image is not None:
            axes[r][2 * c].imshow(np.asarray(decoded.image), interpolation="nearest")
        axes[r][2 * c + 1].text(0.0, 0.5, note, va="center", ha="left", fontsize=8, family="monospace")
    fig.suptitle("Example images: web and synthetic captions, ITM scores, verdicts")
    return fig


def threshold_curves(
    grid: np.ndarray,
    keep_rates: Mapping[str, np.ndarray],
    marks: Mapping[str, float],
    noise: Mapping[str, np.ndarray] | None = None,
) -> plt.Figure:
    """Keep rate against threshold, one line per caption source, the thresholds in `marks`
    (label -> value) drawn across; with `noise` (``precision`` / ``recall`` of rejecting
    the noisy web captions, per grid point) a second panel beside it."""
    panels = 2 if noise else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 3.4), squeeze=False)
    left = axes[0][0]
    for src, rates in keep_rates.items():
        left.plot(grid, rates, label=src)
    left.set_title("Keep rate against threshold")
    left.set_ylabel("keep rate")
    for ax in axes[0]:
        for i, (label, value) in enumerate(marks.items()):
            ax.axvline(value, color="k", linestyle=("--", ":")[i % 2], linewidth=1, label=f"{label} {value:.2f}")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("ITM threshold")
    if noise:
        right = axes[0][1]
        for name, values in noise.items():
            right.plot(grid, values, label=name)
        right.set_title("Rejecting the web noise (truth)")
        right.set_ylabel("precision / recall")
        right.legend(fontsize=8)
    left.legend(fontsize=8)
    fig.tight_layout()
    return fig
