"""The report writes the review galleries beside itself and links them (md and html)."""

from __future__ import annotations

import html
import io
from pathlib import Path

import pyarrow as pa
from PIL import Image

from data.gallery import REVIEW_GALLERIES
from data.layout import RunLayout
from data.shards import shard_name, write_shard
from tasks.report import write_report
from tasks.report.render import Text, to_html


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (20, 120, 220)).save(buffer, format="PNG")
    return buffer.getvalue()


def _scored(rows: list[tuple[str, str, float, bool]]) -> pa.Table:
    """(key, source, itm_score, keep) rows of one image each pair: web wN and synthetic sN share imgN."""
    return pa.table({
        "key": [r[0] for r in rows], "image_id": ["img" + r[0][1:] for r in rows], "source": [r[1] for r in rows],
        "caption": [f"caption {r[0]}" for r in rows], "jpg": pa.array([_png()] * len(rows), pa.binary()),
        "status": ["ok"] * len(rows), "itm_score": pa.array([r[2] for r in rows], pa.float32()),
        "keep": [r[3] for r in rows],
        "reject_reason": pa.array([None if r[3] else "itm_below_threshold" for r in rows], pa.string()),
        "threshold": pa.array([0.5] * len(rows), pa.float32()),
    })


def test_report_links_three_galleries(tmp_path: Path) -> None:
    run = tmp_path / "run"
    kept = [("w0", "web", 0.9, True), ("s1", "synthetic", 0.7, True), ("s2", "synthetic", 0.55, True)]
    rejected = [("w1", "web", 0.2, False), ("w2", "web", 0.48, False), ("s0", "synthetic", 0.3, False)]
    write_shard(_scored(kept), run / "filter/h/kept" / shard_name(0), "scored")
    write_shard(_scored(rejected), run / "filter/h/rejected" / shard_name(0), "scored")

    md = write_report(run).read_text()
    html_text = (run / "report.html").read_text()
    assert "## Galleries" in md
    for query in REVIEW_GALLERIES:
        page = RunLayout(run).gallery(query.name)
        assert page.is_file() and f"[{query.title}]({page.name})" in md
        assert f'<a href="{page.name}">{html.escape(query.title)}</a>' in html_text
    rejected_web = RunLayout(run).gallery("rejected-web").read_text()
    assert rejected_web.count('<tr class="row"') == 2 and "caption s1" in rejected_web  # w1's synthetic sibling
    assert RunLayout(run).gallery("kept-synthetic").read_text().count('<tr class="row"') == 2
    assert RunLayout(run).gallery("borderline").read_text().count('<tr class="row"') == 6


def test_no_galleries_before_the_filter(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    assert "Galleries" not in write_report(tmp_path / "run").read_text()
    assert not list((tmp_path / "run").glob("gallery-*.html"))


def test_only_local_page_links_become_anchors() -> None:
    page = to_html([Text("[ok](gallery-x.html) [no](javascript:alert(1)) <b>x</b>")], "t")
    assert '<a href="gallery-x.html">ok</a>' in page and "javascript:alert(1))" in page and "<b>" not in page
