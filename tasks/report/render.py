"""The report as a list of blocks (heading, text, table, figure) and its two renderings:
GitHub-flavoured Markdown and one self-contained HTML page."""

from __future__ import annotations

import html
import re
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# A Markdown link to a page beside the report, ``[text](gallery-x.html)``: a link in report.html too.
_LOCAL_LINK = re.compile(r"\[([^\]]+)\]\(([\w.-]+\.html)\)")
_LOCAL_LINK_HTML = r'<a href="\2">\1</a>'


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
        if math.isnan(value):
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


_STYLE = (
    "body{font-family:sans-serif;max-width:1100px;margin:2em auto;}"
    "table{border-collapse:collapse;margin:1em 0;}td,th{border:1px solid #ccc;padding:3px 8px;}"
    "th{background:#f3f3f3;}img{max-width:100%;}"
)


def to_html(blocks: Sequence[Block], title: str) -> str:
    """Render blocks as one self-contained HTML page (images linked beside it)."""
    body: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            body.append(f"<h{b.level}>{html.escape(b.text)}</h{b.level}>")
        elif isinstance(b, Text):
            body.append(f"<p>{_LOCAL_LINK.sub(_LOCAL_LINK_HTML, html.escape(b.text))}</p>")
        elif isinstance(b, Table):
            head = "".join(f"<th>{html.escape(h)}</th>" for h in b.headers)
            rows = "".join(
                "<tr>" + "".join(f"<td>{html.escape(_cell(c))}</td>" for c in row) + "</tr>" for row in b.rows
            )
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif isinstance(b, Figure):
            body.append(f'<figure><img src="{html.escape(b.file)}" alt="{html.escape(b.alt)}"></figure>')
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_STYLE}</style></head><body>{''.join(body)}</body></html>\n"
    )
