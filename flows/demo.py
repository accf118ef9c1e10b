"""The embedded default: the whole bootstrap on the synthetic world, tiny MED, CPU.

`run_demo` runs the flow with the `demo` (or `demo-quick`) preset: the flow generates
the world into ``RUN/world``, serves ``RUN/world/www`` from a local HTTP server on
127.0.0.1 (`local_image_server`) while img2dataset downloads the web images, and runs
every stage through to the report. A second call on the same folder resumes.

The server port is remembered in ``RUN/world/www.port`` and reused, so the URL list
(which holds the port) is identical on a rerun and finished ingestion shards stay valid.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flows.config import RunConfig, preset

PORT_FILE = "www.port"
QUERY_EXAMPLES = (
    "SELECT source, count(*) AS pairs FROM dataset GROUP BY source ORDER BY pairs DESC",
    "SELECT reject_reason, count(*) AS rows FROM rejects GROUP BY reject_reason",
    "SELECT key, caption, round(itm_score, 3) AS score FROM scored WHERE source = 'synthetic' ORDER BY itm_score DESC LIMIT 5",
)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Static files, no per-request log lines."""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib signature)
        return


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # as the server binds: a port left in TIME_WAIT by our last server is reusable
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _stable_port(port_file: Path) -> int:
    """The port recorded in `port_file` when it is free; else a fresh free port (recorded)."""
    if port_file.is_file():
        text = port_file.read_text().strip()
        if text.isdigit() and _port_is_free(int(text)):
            return int(text)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    port_file.write_text(f"{port}\n")
    return port


@contextlib.contextmanager
def local_image_server(root: Path, port_file: Path) -> Iterator[str]:
    """Serve `root` on 127.0.0.1 from a thread of this process; yields the base URL.

    The server stops (and its socket closes) when the block exits, error or not.
    """
    port = _stable_port(port_file)
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    thread = threading.Thread(target=server.serve_forever, name=f"capfilt-www-{port}", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def ingest_url_list(params: dict[str, Any], config: RunConfig) -> list[str]:
    """Download a URL list with img2dataset into ``params['dst']``; returns the shards.

    With ``params['www']`` (the synthetic world's image folder) the list is first
    pointed at a local server serving that folder, which runs for the download only.
    Rerun-safe: `ingest_web` skips shards whose completion record matches.
    """
    from data.ingest_web import WebIngestConfig, ingest_web
    from data.shards import list_shards

    url_list = Path(params["sources"][0])
    dst = Path(params["dst"])
    rows = config.data.world.shard_rows if config.data.world is not None else 1000
    cfg = WebIngestConfig(rows_per_shard=rows, processes=params["processes"], threads=params["threads"])
    if params.get("www"):
        from data.synth import write_url_list

        www = Path(params["www"])
        with local_image_server(www, www.parent / PORT_FILE) as base_url:
            write_url_list(url_list.parent, base_url)
            ingest_web(url_list, dst, cfg)
    else:
        ingest_web(url_list, dst, cfg)
    return [str(p) for p in list_shards(dst)]


@dataclass
class DemoResult:
    """What a demo run produced; every path here exists (checked), nothing is invented."""

    run_dir: Path
    report: Path | None
    metrics: Path | None
    summary: dict[str, Any]

    def query_commands(self) -> list[str]:
        """Three `capfilt query` commands over this run."""
        return [f'capfilt query {self.run_dir} "{sql}"' for sql in QUERY_EXAMPLES]


def demo_config(quick: bool = False, out: str | Path | None = None) -> RunConfig:
    """The demo's RunConfig: preset `demo` or `demo-quick`, run folder `out` if given."""
    name = "demo-quick" if quick else "demo"
    return preset(name, run_dir=str(out) if out is not None else None)


def run_demo(quick: bool = False, out: str | Path | None = None) -> DemoResult:
    """Run (or resume) the demo flow and return what it wrote."""
    from flows.bootstrap import run_bootstrap

    config = demo_config(quick, out)
    summary = run_bootstrap(config)
    root = Path(config.run_dir).resolve()
    report = root / "report.md"
    metrics = root / "eval" / "metrics.json"
    return DemoResult(
        run_dir=Path(config.run_dir),
        report=report if report.is_file() else None,
        metrics=metrics if metrics.is_file() else None,
        summary=summary,
    )
