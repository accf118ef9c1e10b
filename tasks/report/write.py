"""Writing the report: ``report.md`` and ``report.html`` from the sections' blocks, and the
Markdown a Prefect artifact shows."""

from __future__ import annotations


from data.layout import RunLayout
from data.shards import write_atomic
from data.storage import Location, RemotePath, location
from tasks.report.render import to_html, to_markdown
from tasks.report.sections import ReportConfig, report_blocks

REPORT_HTML = "report.html"  # beside report.md (`RunLayout.report_md`)


def write_report(run_dir: Location, cfg: ReportConfig | None = None) -> Location:
    """Write ``report.md``, ``report.html`` and the ``report-*.png`` plots; returns report.md.

    Overwrites the previous report atomically, file by file: safe to rerun any time.
    """
    run_dir = location(run_dir)  # a local folder or a URL: every file is written whole
    blocks = report_blocks(run_dir, cfg)
    md_path = RunLayout(run_dir).report_md
    write_atomic(md_path, to_markdown(blocks))
    write_atomic(run_dir / REPORT_HTML, to_html(blocks, f"capfilt report: {run_dir.name}"))
    return md_path


def artifact_markdown(run_dir: Location) -> str:
    """Markdown for a Prefect artifact: the report's text with links to the files.

    Prefect's UI cannot show local images, so the figures become file links (for a run
    folder on object storage, the report's URL: a browser cannot open it without credentials).
    """
    run_dir = location(run_dir)
    md_path = RunLayout(run_dir).report_md
    if not md_path.is_file():
        write_report(run_dir)
    text = md_path.read_text()
    if isinstance(run_dir, RemotePath):
        return f"Full report: `{md_path}` (and `{run_dir / REPORT_HTML}`)\n\n" + text
    run_dir = run_dir.resolve()
    for png in sorted(run_dir.glob("report-*.png")):
        text = text.replace(f"]({png.name})", f"]({png.as_uri()})")
    header = f"Full report: [{md_path}]({md_path.as_uri()}) ([HTML]({(run_dir / REPORT_HTML).as_uri()}))\n\n"
    return header + text
