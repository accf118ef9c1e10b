"""The embedded default: the whole bootstrap on the synthetic world, tiny MED, CPU.

`run_demo` runs the flow with the `demo` (or `demo-quick`) preset: the flow generates
the world into ``RUN/world``, serves ``RUN/world/www`` from a local HTTP server on
127.0.0.1 (`flows.ingest.local_image_server`) while img2dataset downloads the web
images, and runs every stage through to the report. A second call on the same folder
resumes.

The server port is remembered in ``RUN/world/www.port`` and reused (see `flows.ingest`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flows.config import RunConfig, preset

QUERY_EXAMPLES = (
    "SELECT source, count(*) AS pairs FROM dataset GROUP BY source ORDER BY pairs DESC",
    "SELECT reject_reason, count(*) AS rows FROM rejects GROUP BY reject_reason",
    "SELECT key, caption, round(itm_score, 3) AS score FROM scored WHERE source = 'synthetic' ORDER BY itm_score DESC LIMIT 5",
)


@dataclass
class DemoResult:
    """What a demo run produced; every path here exists (checked), nothing is invented."""

    run_dir: Path
    report: Path | None
    metrics: Path | None
    summary: dict[str, Any]
    reused: bool = False  # a finished run found unchanged (`flows.run_record`): nothing ran

    def query_commands(self) -> list[str]:
        """Three `capfilt query` commands over this run."""
        return [f'capfilt query {self.run_dir} "{sql}"' for sql in QUERY_EXAMPLES]


def demo_config(quick: bool = False, out: str | Path | None = None) -> RunConfig:
    """The demo's RunConfig: preset `demo` or `demo-quick`, run folder `out` if given."""
    name = "demo-quick" if quick else "demo"
    return preset(name, run_dir=str(out) if out is not None else None)


def run_demo(quick: bool = False, out: str | Path | None = None,
             on_start: Callable[[str], None] | None = None) -> DemoResult:  # fmt: skip
    """Run (or resume) the demo flow and return what it wrote; a finished, unchanged run
    folder is returned as it is, without starting Prefect. `on_start(run_dir)` is called
    just before the flow starts (not for a finished run)."""
    from flows.preflight import preflight
    from flows.run_record import finished_summary

    config = preflight(demo_config(quick, out))
    summary = finished_summary(config)
    reused = summary is not None
    if summary is None:
        from flows.bootstrap import run_bootstrap

        if on_start is not None:
            on_start(config.run_dir)
        summary = run_bootstrap(config)
    root = Path(config.run_dir).resolve()
    report = root / "report.md"
    metrics = root / "eval" / "metrics.json"
    return DemoResult(
        run_dir=Path(config.run_dir),
        report=report if report.is_file() else None,
        metrics=metrics if metrics.is_file() else None,
        summary=summary,
        reused=reused,
    )
