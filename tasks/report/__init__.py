"""The run report: what the pipeline did to the data, in tables and pictures.

`write_report(run_dir)` reads only files the stages already wrote (completion records
``*.done.json``, training ``metrics.jsonl``, the filter's scored shards, the caption
and ingest shards, ``eval/metrics.json``) and writes ``report.md``, ``report.html`` and
``report-*.png`` into the run folder. Every output is a function of those files and is
replaced atomically, so a rerun after more stages finished simply refreshes the report.
Sections whose inputs do not exist yet say so instead of failing.

- `read`: what the report reads from a run folder.
- `figures`: the matplotlib plots (numbers in, figure out).
- `render`: the blocks (heading, text, table, figure) and their Markdown / HTML.
- `sections`: each section's blocks from what `read` finds; `report_blocks` builds them all.
- `write`: `write_report` and `artifact_markdown`, the package's entry points.
"""

from tasks.report.write import artifact_markdown, write_report

__all__ = ["artifact_markdown", "write_report"]
