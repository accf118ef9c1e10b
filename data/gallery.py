"""A gallery: the rows of a SQL query over a run's catalog as one self-contained HTML page.

`build_gallery(run_dir, sql)` runs the query through `data.catalog` (read-only and
confined) and renders one table row per result row: a thumbnail, the caption, its
source, ITM score and verdict (kept, or the reject reason / the error), the other
captions of the same image side by side (web vs synthetic, fetched from ``scored`` when
the query does not return them) and every other column the query returns. Nothing on
the page is fetched: thumbnails are downscaled with PIL and inlined as ``data:`` URIs,
so the file opens from disk, mailed or copied, with no server.

Captions are untrusted web text: every value is HTML-escaped, and a Content-Security-Policy
lets only the page's own script (by its hash) run and only ``data:`` images load.
The script sorts the rows by a clicked column (``#sort=itm_score`` / ``#sort=-itm_score``
in the address does the same on load) and, once the page has loaded, writes each
image's ``naturalWidth`` into ``data-natural-width`` and the number of images that
rendered into ``<body data-images-rendered>`` (what the browser test reads).
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from data.catalog import open_catalog, run_query, time_limit, view_names
from data.defaults import DEFAULT_LIMIT, DEFAULT_TIMEOUT_S
from data.images import decode_image
from data.layout import RunLayout
from data.shards import write_atomic
from data.storage import location

THUMB_PX = 128
_PNG_MAX_PIXELS = 64 * 64  # small thumbnails stay PNG (crisp); larger ones JPEG
_JPEG_QUALITY = 85
_MAX_CELL_CHARS = 40  # other columns are cut on the page; the full value is in the cell's title
_ID_CHUNK = 500  # image ids per sibling / image look-up query
# Columns the page shows in its own cells; any other column of the query gets a cell of its own.
_SHOWN = ("jpg", "caption", "source", "itm_score", "keep", "outcome", "reject_reason", "status", "error", "threshold")
# Views a missing thumbnail is looked up in, by image_id, first hit wins.
_IMAGE_VIEWS = ("scored", "web", "human", "synthetic", "test", "dataset")
_PAIR_VIEWS = ("human", "web", "synthetic")  # captions of an image when there is no `scored` yet


@dataclass(frozen=True)
class GalleryQuery:
    """A named gallery (the report writes these next to itself as ``gallery-<name>.html``)."""

    name: str
    title: str
    sql: str


REVIEW_GALLERIES = (
    GalleryQuery(
        "rejected-web",
        "Rejected web captions, lowest ITM score first",
        "SELECT * FROM scored WHERE source = 'web' AND outcome = 'rejected' ORDER BY itm_score, key",
    ),
    GalleryQuery(
        "kept-synthetic",
        "Kept synthetic captions, highest ITM score first",
        "SELECT * FROM scored WHERE source = 'synthetic' AND keep ORDER BY itm_score DESC, key",
    ),
    GalleryQuery(
        "borderline",
        "Borderline: the 100 scores closest to the filter's threshold",
        "SELECT * FROM scored WHERE status = 'ok' ORDER BY abs(itm_score - threshold), key LIMIT 100",
    ),
)


@dataclass(frozen=True)
class Gallery:
    """A rendered page: its HTML, the rows on it and the rows the query returned."""

    html: str
    shown: int
    total: int

    @property
    def truncated(self) -> bool:
        return self.shown < self.total


# ----------------------------------------------------------------------------- reading


def _rows(con: Any, sql: str, limit: int) -> tuple[pa.Table, int]:
    """The first `limit` rows of `sql` and the number of rows it returns."""
    relation = run_query(con, sql)
    (total,) = relation.aggregate("count(*)").fetchall()[0]
    return relation.limit(limit).to_arrow_table(), int(total)


def _chunks(items: list[str]) -> list[list[str]]:
    return [items[i : i + _ID_CHUNK] for i in range(0, len(items), _ID_CHUNK)]


def _by_ids(con: Any, select: str, view: str, ids: list[str], where: str = "TRUE",
            column: str = "image_id") -> list[dict[str, Any]]:  # fmt: skip
    """Rows of `view` whose `column` (image_id) is in `ids` (our own statements, parameterised)."""
    out: list[dict[str, Any]] = []
    for chunk in _chunks(ids):
        marks = ", ".join("?" * len(chunk))
        sql = f'SELECT {select} FROM "{view}" WHERE {column} IN ({marks}) AND {where}'
        cursor = con.execute(sql, chunk)
        names = [d[0] for d in cursor.description]
        out += [dict(zip(names, values, strict=True)) for values in cursor.fetchall()]
    return out


def _captions_of(con: Any, ids: list[str]) -> dict[str, list[dict[str, Any]]]:
    """Every caption of each image: from ``scored`` (with scores), else the pair views."""
    views = set(view_names(con))
    if "scored" in views:
        rows = _by_ids(con, "key, image_id, source, caption, itm_score, keep, outcome, reject_reason, status, error, "
                       "candidate", "scored", ids)
    else:
        rows = [r for v in _PAIR_VIEWS if v in views
                for r in _by_ids(con, "key, image_id, source, caption, status, error, candidate", v, ids)]
    grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        grouped[row["image_id"]].append(row)
    for captions in grouped.values():  # web first, then the synthetic candidates in order
        captions.sort(key=lambda r: (r["source"] != "web", r["source"], r.get("candidate") or 0, r["key"]))
    return grouped


def _images_of(con: Any, ids: list[str]) -> dict[str, bytes]:
    """One image's bytes per image id, for queries that do not return ``jpg``."""
    found: dict[str, bytes] = {}
    views = set(view_names(con))
    for view in (v for v in _IMAGE_VIEWS if v in views):
        missing = [i for i in ids if i not in found]
        if not missing:
            break
        for row in _by_ids(con, "image_id, jpg", view, missing, "jpg IS NOT NULL"):
            found.setdefault(row["image_id"], row["jpg"])
    return found


@dataclass(frozen=True)
class _DPrime:
    """Which of the shown keys D' holds, and the threshold D' was decided at (None: several)."""

    keys: frozenset[str]
    threshold: float | None


def _dprime_of(con: Any, keys: list[str]) -> _DPrime | None:
    """D' membership of `keys` (None when the run has no ``dataset`` view)."""
    if "dataset" not in view_names(con):
        return None
    held = frozenset(r["key"] for r in _by_ids(con, "key", "dataset", keys, column="key"))
    thresholds = con.execute("SELECT DISTINCT threshold FROM dataset WHERE threshold IS NOT NULL").fetchall()
    return _DPrime(held, float(thresholds[0][0]) if len(thresholds) == 1 else None)


def as_in_dprime(row: dict[str, Any], dprime: _DPrime | None) -> dict[str, Any]:
    """`row` with the verdict D' gives it when D' was decided again (``capfilt assemble
    --threshold``): a judged caption D' holds is kept, one it does not is rejected
    (``itm_below_threshold`` under D's threshold, else ``not_in_dataset``), and the
    threshold shown is D's. Failed and unjudged rows, and rows D' agrees with, are as given."""
    judged = verdict(row)
    unjudged = judged is None or judged[0] == "failed" or row.get("source") == "human"
    if dprime is None or unjudged or row.get("key") is None:
        return row
    kept = row["key"] in dprime.keys
    if kept == (judged[0] == "kept"):
        return row
    score, threshold = row.get("itm_score"), dprime.threshold
    below = score is not None and threshold is not None and score < threshold
    reason = None if kept else ("itm_below_threshold" if below else "not_in_dataset")
    fixed = {"keep": kept, "outcome": "kept" if kept else "rejected", "reject_reason": reason, "threshold": threshold}
    return {**row, **{name: value for name, value in fixed.items() if name in row or name == "outcome"}}


# ----------------------------------------------------------------------------- cells


def thumbnail_uri(data: bytes | None, px: int = THUMB_PX) -> str | None:
    """A ``data:`` URI of the image downscaled to fit `px` x `px`, or None when undecodable."""
    decoded = decode_image(data) if data else None
    if decoded is None or decoded.image is None:
        return None
    image = decoded.image
    image.thumbnail((px, px))
    buffer = io.BytesIO()
    if image.width * image.height <= _PNG_MAX_PIXELS:
        image.save(buffer, format="PNG", optimize=True)
        mime = "image/png"
    else:
        image.save(buffer, format="JPEG", quality=_JPEG_QUALITY)
        mime = "image/jpeg"
    return f"data:{mime};base64,{base64.b64encode(buffer.getvalue()).decode()}"


def verdict(row: dict[str, Any]) -> tuple[str, str] | None:
    """(css class, text) of a row's outcome: kept, rejected[: reason], failed[: error]; None if unjudged."""
    if row.get("status") == "failed" or row.get("outcome") == "failed":
        return "failed", "failed" + (f": {row['error']}" if row.get("error") else "")
    outcome, keep = row.get("outcome"), row.get("keep")
    if outcome is None and keep is None:
        return None
    if outcome == "kept" or (outcome is None and keep):
        return "kept", "kept"
    return "rejected", "rejected" + (f": {row['reject_reason']}" if row.get("reject_reason") else "")


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        return f"{len(value)} bytes"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _score(value: float) -> str:
    """An ITM score or threshold: 4 decimals (the filter's scores are float32, and captions of
    one image often differ in the 4th)."""
    return f"{value:.4f}"


def _td(content: str, sort_value: Any = None, css: str = "", title: str = "") -> str:
    """A cell; `sort_value` (number or text) is what the column sorts by, empty sorts last."""
    value = "" if sort_value is None else (f"{sort_value:.6f}" if isinstance(sort_value, float) else str(sort_value))
    attrs = f' data-v="{html.escape(value)}"'
    attrs += f' class="{css}"' if css else ""
    attrs += f' title="{html.escape(title)}"' if title else ""
    return f"<td{attrs}>{content}</td>"


def _same_caption(sibling: dict[str, Any], row: dict[str, Any]) -> bool:
    """Whether `sibling` is the query row itself: by key, or by source + caption when the query has no key."""
    if "key" in row:
        return sibling["key"] == row["key"]
    return (sibling["source"], sibling.get("caption")) == (row.get("source"), row.get("caption"))


def _caption_card(row: dict[str, Any]) -> str:
    """One caption of an image, for the side-by-side cell."""
    judged = verdict(row)
    score = row.get("itm_score")
    head = f"<b>{html.escape(row['source'])}</b>"
    head += f" {_score(score)}" if score is not None else ""
    head += f' <span class="v {judged[0]}">{html.escape(judged[1])}</span>' if judged else ""
    return f'<div class="cap {html.escape(row["source"])}">{head}<br>{html.escape(row.get("caption") or "")}</div>'


# ----------------------------------------------------------------------------- page

_STYLE = """
body{font-family:sans-serif;margin:1.2em;color:#222}
pre.sql{background:#f4f4f4;border:1px solid #ddd;padding:.6em;white-space:pre-wrap}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 6px;vertical-align:top}
th{background:#eee;cursor:pointer;user-select:none;position:sticky;top:0}
th.nosort{cursor:default}th[aria-sort=ascending]::after{content:" \\25B2"}th[aria-sort=descending]::after{content:" \\25BC"}
img.thumb{width:var(--px);height:var(--px);object-fit:contain;background:#fafafa;image-rendering:pixelated}
td.caption{max-width:22em}td.num{text-align:right;font-variant-numeric:tabular-nums}
.v.kept{color:#0a7a2f;font-weight:bold}.v.rejected{color:#b3261e;font-weight:bold}.v.failed{color:#777;font-weight:bold}
.caps{display:flex;gap:6px;flex-wrap:wrap}.cap{border:1px solid #ddd;border-radius:4px;padding:3px 6px;width:15em;font-size:90%}
.cap.web{background:#fff8e6}.cap.synthetic{background:#eef5ff}.cap.human{background:#f0fff0}
.note{color:#555}.noimg{color:#999;font-size:85%}
"""

_SCRIPT = """
(function () {
  var table = document.getElementById("rows");
  function sortBy(index, descending) {
    var th = table.tHead.rows[0].cells[index], numeric = th.dataset.type === "num";
    var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = a.cells[index].dataset.v, y = b.cells[index].dataset.v;
      if (x === "" || y === "") { return (x === "") - (y === ""); }
      var order = numeric ? Number(x) - Number(y) : x.localeCompare(y);
      return descending ? -order : order;
    });
    rows.forEach(function (row) { body.appendChild(row); });
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (c) { c.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", descending ? "descending" : "ascending");
  }
  function fromHash() {
    var m = /^#sort=(-?)(.+)$/.exec(decodeURIComponent(location.hash));
    if (!m || !table) { return; }
    var th = table.querySelector('th[data-col="' + m[2].replace(/"/g, "") + '"]');
    if (th && th.dataset.type) { sortBy(th.cellIndex, m[1] === "-"); }
  }
  if (table) {
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th) {
      if (!th.dataset.type) { return; }
      th.addEventListener("click", function () {
        var descending = th.getAttribute("aria-sort") === "ascending";
        sortBy(th.cellIndex, descending);
        try { history.replaceState(null, "", "#sort=" + (descending ? "-" : "") + th.dataset.col); } catch (e) {}
      });
    });
    fromHash();
  }
  window.addEventListener("load", function () {
    var images = document.querySelectorAll("img"), rendered = 0;
    Array.prototype.forEach.call(images, function (img) {
      img.dataset.naturalWidth = img.naturalWidth;
      if (img.complete && img.naturalWidth > 0) { rendered += 1; }
    });
    document.body.dataset.imagesRendered = rendered;
    document.body.dataset.images = images.length;
  });
})();
"""


def _csp() -> str:
    digest = base64.b64encode(hashlib.sha256(_SCRIPT.encode()).digest()).decode()
    return f"default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'sha256-{digest}'"


def _header(title: str, sql: str, run_name: str, shown: int, total: int, limit: int) -> str:
    if total == 0:
        count = "The query returned no rows."
    elif shown < total:
        count = f"Showing the first {shown} of {total} rows (cut at --limit {limit}; raise it to see more)."
    else:
        count = f"{total} rows."
    return (
        f"<h1>{html.escape(title)}</h1>"
        f'<p class="note">Run <b>{html.escape(run_name)}</b>; made by <code>capfilt browse</code>. '
        "Click a column heading to sort by it.</p>"
        f'<pre class="sql">{html.escape(sql)}</pre>'
        f'<p id="count" data-shown="{shown}" data-total="{total}">{html.escape(count)}</p>'
    )


@dataclass(frozen=True)
class _Columns:
    """Which of the page's own columns the query's result can fill."""

    names: list[str]
    image: bool
    others: list[str]

    empty: list[str]  # other columns with no value in any shown row: named in a note, not shown

    @classmethod
    def of(cls, table: pa.Table, images_known: bool) -> _Columns:
        names = table.column_names
        others = [n for n in names if n not in _SHOWN]
        empty = [n for n in others if table.num_rows and table.column(n).null_count == table.num_rows]
        return cls(names, images_known, [n for n in others if n not in empty], empty)

    def has(self, *names: str) -> bool:
        return any(n in self.names for n in names)


def _head(cols: _Columns, siblings: bool) -> str:
    cells = ['<th data-col="row" data-type="num">#</th>']
    if cols.image:
        cells.append('<th class="nosort" data-col="image">image</th>')
    for name, label, kind, present in (
        ("caption", "caption", "text", cols.has("caption")),
        ("source", "source", "text", cols.has("source")),
        ("itm_score", "ITM score", "num", cols.has("itm_score")),
        ("verdict", "verdict / reject reason", "text", cols.has("keep", "outcome", "status")),
    ):
        if present:
            cells.append(f'<th data-col="{name}" data-type="{kind}">{label}</th>')
    if siblings:
        cells.append('<th data-col="captions" data-type="num">other captions of this image</th>')
    cells += [f'<th data-col="{html.escape(n)}" data-type="text">{html.escape(n)}</th>' for n in cols.others]
    return "<thead><tr>" + "".join(cells) + "</tr></thead>"


def _row(index: int, row: dict[str, Any], cols: _Columns, thumb: str | None,
         siblings: list[dict[str, Any]] | None) -> str:
    cells = [_td(str(index + 1), index + 1, "num")]
    if cols.image:
        content = f'<img class="thumb" alt="" src="{thumb}">' if thumb else '<span class="noimg">no image</span>'
        cells.append(_td(content))
    if cols.has("caption"):
        cells.append(_td(html.escape(row.get("caption") or ""), row.get("caption"), "caption"))
    if cols.has("source"):
        cells.append(_td(html.escape(_text(row.get("source"))), row.get("source")))
    if cols.has("itm_score"):
        score, threshold = row.get("itm_score"), row.get("threshold")
        text = "" if score is None else _score(score)
        cells.append(_td(text, score, "num", f"threshold {_score(threshold)}" if threshold is not None else ""))
    if cols.has("keep", "outcome", "status"):
        judged = verdict(row)
        content = f'<span class="v {judged[0]}">{html.escape(judged[1])}</span>' if judged else ""
        cells.append(_td(content, judged[1] if judged else None))
    if siblings is not None:
        cards = "".join(_caption_card(s) for s in siblings)
        cells.append(_td(f'<div class="caps">{cards}</div>', len(siblings)))
    for name in cols.others:
        full = _text(row.get(name))
        short = full if len(full) <= _MAX_CELL_CHARS else full[: _MAX_CELL_CHARS - 1] + "…"
        cells.append(_td(html.escape(short), full if row.get(name) is not None else None,
                         title=full if short != full else ""))
    return f'<tr class="row" data-key="{html.escape(_text(row.get("key")))}">' + "".join(cells) + "</tr>"


def render(table: pa.Table, total: int, sql: str, title: str, run_name: str, limit: int,
           images: dict[str, bytes], captions: dict[str, list[dict[str, Any]]] | None,
           thumb_px: int = THUMB_PX) -> str:
    """The page for the result `table` (already fetched; `images` / `captions` keyed by image_id)."""
    rows = table.to_pylist()
    cols = _Columns.of(table, "jpg" in table.column_names or bool(images))
    thumbs: dict[bytes, str | None] = {}

    def thumb_of(row: dict[str, Any]) -> str | None:
        data = row.get("jpg") or images.get(row.get("image_id") or "")
        if data is None:
            return None
        if data not in thumbs:
            thumbs[data] = thumbnail_uri(data, thumb_px)
        return thumbs[data]

    def siblings_of(row: dict[str, Any]) -> list[dict[str, Any]] | None:
        if captions is None:
            return None
        return [c for c in captions.get(row.get("image_id") or "", []) if not _same_caption(c, row)]

    body = "".join(_row(i, row, cols, thumb_of(row), siblings_of(row)) for i, row in enumerate(rows))
    table_html = (
        f'<table id="rows" data-rows="{len(rows)}">{_head(cols, captions is not None)}<tbody>{body}</tbody></table>'
        if rows else ""
    )
    if cols.empty:
        table_html += f'<p class="note">Empty in every row shown: {html.escape(", ".join(cols.empty))}.</p>'

    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f'<meta http-equiv="Content-Security-Policy" content="{_csp()}">'
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>"
        f'<body style="--px:{int(thumb_px)}px">{_header(title, sql, run_name, len(rows), total, limit)}'
        f"{table_html}<script>{_SCRIPT}</script></body></html>\n"
    )


def build_gallery(run_dir: Path, sql: str, limit: int = DEFAULT_LIMIT, title: str | None = None,
                  thumb_px: int = THUMB_PX, timeout: float = DEFAULT_TIMEOUT_S) -> Gallery:
    """Run `sql` over the run's catalog and render its first `limit` rows as a page.

    Raises what the catalog raises: QueryRefused (a statement it does not run),
    duckdb.Error (a query error), QueryTimeout (its queries ran past `timeout` seconds;
    0: no limit), FileNotFoundError, SchemaError.
    """
    if limit < 1:
        raise ValueError(f"--limit must be at least 1, got {limit}")
    run_dir = location(run_dir)  # a local folder or a URL
    con = open_catalog(run_dir)
    try:
        with time_limit(con, timeout):
            table, total = _rows(con, sql, limit)
            has_ids = "image_id" in table.column_names
            ids = sorted({i for i in table.column("image_id").to_pylist() if i}) if has_ids else []
            images = _images_of(con, ids) if ids and "jpg" not in table.column_names else {}
            captions = _captions_of(con, ids) if ids else None
        keys = table.column("key").to_pylist() if "key" in table.column_names else []
        keys += [c["key"] for group in (captions or {}).values() for c in group]
        dprime = _dprime_of(con, sorted({k for k in keys if k is not None}))
    finally:
        con.close()
    table = pa.Table.from_pylist([as_in_dprime(r, dprime) for r in table.to_pylist()], schema=table.schema)
    for group in (captions or {}).values():
        group[:] = [as_in_dprime(c, dprime) for c in group]
    page = render(table, total, sql, title or "capfilt gallery", run_dir.resolve().name, limit, images, captions,
                  thumb_px)
    return Gallery(page, table.num_rows, total)


def write_gallery(run_dir: Path, sql: str, out: Path, limit: int = DEFAULT_LIMIT, title: str | None = None,
                  timeout: float = DEFAULT_TIMEOUT_S) -> Gallery:  # fmt: skip
    """`build_gallery` written to `out` atomically (a rerun replaces the page whole)."""
    gallery = build_gallery(run_dir, sql, limit, title, timeout=timeout)
    out = location(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, gallery.html)
    return gallery


def write_review_galleries(run_dir: Path, limit: int = DEFAULT_LIMIT) -> list[tuple[GalleryQuery, Path, Gallery]]:
    """Write each of `REVIEW_GALLERIES` as ``RUN/gallery-<name>.html`` (what the report links).

    Nothing is written before the filter has scored rows (no ``scored`` view); a rerun
    replaces each page whole.
    """
    con = open_catalog(run_dir)
    try:
        scored = "scored" in view_names(con)
    finally:
        con.close()
    if not scored:
        return []
    layout = RunLayout(run_dir)
    return [(q, layout.gallery(q.name), write_gallery(run_dir, q.sql, layout.gallery(q.name), limit, q.title))
            for q in REVIEW_GALLERIES]
