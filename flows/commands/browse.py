"""`capfilt browse RUN "SQL"`: the rows of a query as a self-contained HTML gallery (data/gallery.py).

With ``--out FILE.html`` the page is written there (atomically) and opens from the file;
without it the page is served on 127.0.0.1 at a free port, printed, until Ctrl-C. The
server answers only requests addressed to it by name (``Host: 127.0.0.1:PORT`` or
``localhost:PORT``); any other Host gets 421, so a web page whose domain is re-pointed at
127.0.0.1 (DNS rebinding) cannot read the gallery.
The query runs through the read-only catalog, so the same statements are refused as
by `capfilt query` (exit 2) and query errors exit 1.
"""

from __future__ import annotations

from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import typer

from data.defaults import DEFAULT_LIMIT, DEFAULT_TIMEOUT_S
from flows.commands.query import query_errors, resolve_run

HOST = "127.0.0.1"
LOCAL_NAMES = ("127.0.0.1", "localhost")  # the Host names a served page answers to


def page_server(page: str, host: str = HOST, port: int = 0) -> ThreadingHTTPServer:
    """An HTTP server (not yet serving) that answers ``GET /`` with `page`; port 0 picks a free one."""
    body = page.encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            if not _addressed_to_us(self.headers.get("Host"), self.server.server_address[1]):
                self.send_error(HTTPStatus.MISDIRECTED_REQUEST, "this server answers only to 127.0.0.1 or localhost")
                return
            if self.path.split("#")[0].split("?")[0] not in ("/", "/index.html"):
                self.send_error(404, "only / is served")
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (http.server's name)
            return  # quiet: the address is printed once, requests are not

    return ThreadingHTTPServer((host, port), Handler)


def _addressed_to_us(host: str | None, port: int) -> bool:
    """True for a Host header naming this server: ``127.0.0.1`` or ``localhost``, with its port."""
    if host is None:
        return False
    name, _, given = host.strip().lower().rpartition(":") if ":" in host else (host.strip().lower(), "", str(port))
    return name in LOCAL_NAMES and given == str(port)


def browse(
    run: str = typer.Argument(..., help="the run folder, a name under runs/, or a URL (s3://bucket/run)"),
    sql: str = typer.Argument(..., help="one SELECT / WITH over the run's views (capfilt query RUN --schema lists them)"),
    out: str | None = typer.Option(None, "--out", "-o", help="write the page here (a path or URL) instead of serving it"),
    limit: int = typer.Option(DEFAULT_LIMIT, "--limit", "-n", min=1, help="rows on the page (the page says when cut)"),
    title: str | None = typer.Option(None, "--title", help="the page's heading"),
    timeout: float = typer.Option(DEFAULT_TIMEOUT_S, "--timeout", help="stop the queries after this many seconds (0: no limit)"),
) -> None:
    """Show a query's rows as an HTML gallery: thumbnail, caption, source, ITM score, verdict,
    and the other captions of each image side by side; sortable by any column."""
    from data.gallery import build_gallery, write_gallery
    from data.storage import is_remote, location

    with query_errors("browse"):
        if out is not None:
            gallery = write_gallery(resolve_run(run), sql, out, limit, title, timeout)
        else:
            gallery = build_gallery(resolve_run(run), sql, limit, title, timeout=timeout)
    shown = f"{gallery.shown} of {gallery.total} rows" if gallery.truncated else f"{gallery.total} rows"
    if out is not None:
        page = location(out)
        typer.echo(f"wrote {page} ({shown})" + ("" if is_remote(page) else f"; open {Path(page).resolve().as_uri()}"))
        return
    server = page_server(gallery.html)
    typer.echo(f"serving the gallery ({shown}) at http://{HOST}:{server.server_address[1]}/ (Ctrl-C stops)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def register(app: typer.Typer) -> None:
    """Add `capfilt browse` to the app."""
    app.command("browse")(browse)
