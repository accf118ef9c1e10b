"""URL-list ingestion for the flow: img2dataset into ``RUN/ingest/<split>``, optionally
from a local HTTP server over the synthetic world's image folder.

The server port is remembered in ``RUN/world/www.port`` and reused, so the URL list
(which holds the port) is identical on a rerun and finished ingestion shards stay valid.
This module sits below both `flows.steps` (the ingest task) and `flows.demo`.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from blip_core.progress import Advance
from flows.config import RunConfig

PORT_FILE = "www.port"


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
            with Advance("ingest: download", unit="shard") as advance:
                ingest_web(url_list, dst, cfg, on_shard=advance)
    else:
        with Advance("ingest: download", unit="shard") as advance:
            ingest_web(url_list, dst, cfg, on_shard=advance)
    return [str(p) for p in list_shards(dst)]
