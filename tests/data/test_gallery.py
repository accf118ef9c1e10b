"""The gallery (data/gallery.py) and `capfilt browse`: rows, escaping, side-by-side captions,
serving, and the page in a real browser (headless Chromium) with a screenshot.

The browser test runs on a small fabricated run folder by default. Pointed at another run
(``CAPFILT_BROWSE_RUN=runs/demo``, optionally ``CAPFILT_BROWSE_SQL``), it checks that run's
page the same way; ``CAPFILT_BROWSE_SCREENSHOT=docs/gallery.png`` keeps the screenshot
(how the README's picture is made).
"""

from __future__ import annotations

import io
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image
from typer.testing import CliRunner

from data.catalog import QueryRefused, open_catalog, run_query
from data.gallery import build_gallery, thumbnail_uri, verdict, write_gallery
from data.shards import shard_name, write_shard
from flows.cli import app
from flows.commands.browse import page_server

# Solid colours of the fabricated images: the screenshot must show them (rendered thumbnails).
COLOURS = {"img0": (230, 40, 40), "img1": (40, 160, 60), "img2": (40, 80, 220), "img3": (240, 200, 30),
           "img4": (160, 50, 200)}
SCRIPT_CAPTION = "<script>document.title='pwned'</script> a green square"
ATTR_CAPTION = '"><img src=x onerror="document.title=1"> a blue circle'
ALL_SCORED = "SELECT * FROM scored ORDER BY itm_score DESC NULLS LAST, key"


def _png(colour: tuple[int, int, int], size: int = 48) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="PNG")
    return buffer.getvalue()


# (key, image_id, source, caption, itm_score, outcome, reject_reason)
SCORED_ROWS = [
    ("w0", "img0", "web", "a red square", 0.91, "kept", None),
    ("w1", "img1", "web", SCRIPT_CAPTION, 0.12, "rejected", "itm_below_threshold"),
    ("w2", "img2", "web", ATTR_CAPTION, 0.47, "rejected", "itm_below_threshold"),
    ("w3", "img3", "web", "a yellow triangle", 0.52, "kept", None),
    ("w4", "img4", "web", "a purple circle", 0.30, "rejected", "itm_below_threshold"),
    ("w5", "img5", "web", "never downloaded", None, "failed", None),
    ("s1a", "img1", "synthetic", "a green square", 0.83, "kept", None),
    ("s1b", "img1", "synthetic", "a green shape", 0.44, "rejected", "itm_below_threshold"),
    ("s2a", "img2", "synthetic", "a blue circle", 0.66, "kept", None),
    ("s4a", "img4", "synthetic", "a purple thing", 0.21, "rejected", "itm_below_threshold"),
]


def _table(rows: list[tuple], scored: bool) -> pa.Table:
    data = {
        "key": [r[0] for r in rows], "image_id": [r[1] for r in rows], "source": [r[2] for r in rows],
        "caption": [r[3] for r in rows],
        "jpg": pa.array([_png(COLOURS[r[1]]) if r[1] in COLOURS else None for r in rows], pa.binary()),
        "status": ["failed" if r[5] == "failed" else "ok" for r in rows],
        "error": pa.array([("connection refused" if r[5] == "failed" else None) for r in rows], pa.string()),
    }
    if scored:
        data |= {
            "itm_score": pa.array([r[4] for r in rows], pa.float32()),
            "keep": [r[5] == "kept" for r in rows],
            "reject_reason": pa.array([r[6] for r in rows], pa.string()),
            "threshold": pa.array([0.5] * len(rows), pa.float32()),
        }
    return pa.table(data)


def make_run(root: Path) -> Path:
    """A run folder with web and synthetic pairs and the filter's three outcome folders."""
    web = [r for r in SCORED_ROWS if r[2] == "web"]
    write_shard(_table(web, scored=False), root / "ingest/web" / shard_name(0), "pairs")
    write_shard(_table([r for r in SCORED_ROWS if r[2] == "synthetic"], False),
                root / "caption/caphash00000" / shard_name(0), "pairs")
    for outcome in ("kept", "rejected", "failed"):
        rows = [r for r in SCORED_ROWS if r[5] == outcome]
        write_shard(_table(rows, scored=True), root / "filter/filthash0000" / outcome / shard_name(0), "scored")
    return root


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run(tmp_path_factory.mktemp("gallery") / "run")


def _keys(page: str) -> list[str]:
    return re.findall(r'<tr class="row" data-key="([^"]*)"', page)


def _count(run_dir: Path, sql: str) -> int:
    con = open_catalog(run_dir)
    try:
        return len(run_query(con, sql).fetchall())
    finally:
        con.close()


# ----------------------------------------------------------------------------- the page


def test_one_row_per_result_row_in_query_order(run: Path) -> None:
    gallery = build_gallery(run, ALL_SCORED)
    assert (gallery.shown, gallery.total, gallery.truncated) == (10, 10, False)
    assert _keys(gallery.html) == ["w0", "s1a", "s2a", "w3", "w2", "s1b", "w4", "s4a", "w1", "w5"]
    assert 'data-rows="10"' in gallery.html and "<pre class=\"sql\">SELECT * FROM scored" in gallery.html
    assert gallery.html.count('<img class="thumb"') == 9  # the failed row has no image: a note, not a broken icon
    assert '<span class="noimg">no image</span>' in gallery.html
    assert 'data-col="url"' not in gallery.html and re.search(r"Empty in every row shown: [^<]*\burl\b", gallery.html)


def test_limit_cuts_and_says_so(run: Path) -> None:
    gallery = build_gallery(run, ALL_SCORED, limit=3)
    assert (gallery.shown, gallery.total, gallery.truncated) == (3, 10, True)
    assert "Showing the first 3 of 10 rows" in gallery.html and len(_keys(gallery.html)) == 3


def test_captions_are_escaped_and_only_the_page_script_runs(run: Path) -> None:
    page = build_gallery(run, ALL_SCORED).html
    assert page.count("<script") == 1 and "&lt;script&gt;document.title=&#x27;pwned&#x27;&lt;/script&gt;" in page
    assert "<img src=x" not in page and "&quot;&gt;&lt;img src=x onerror=" in page
    assert "script-src 'sha256-" in page and "img-src data:" in page  # CSP: no other script, no remote image


def test_an_image_shows_its_other_captions_side_by_side(run: Path) -> None:
    page = build_gallery(run, "SELECT * FROM scored WHERE key = 'w1'").html
    cards = re.findall(r'<div class="cap (\w+)"><b>\w+</b> ([\d.]+) <span class="v (\w+)">', page)
    assert cards == [("synthetic", "0.8300", "kept"), ("synthetic", "0.4400", "rejected")]  # not w1 itself
    assert "other captions of this image" in page and "rejected: itm_below_threshold" in page
    keyless = build_gallery(run, "SELECT image_id, source, caption FROM scored WHERE key = 's1a'").html
    assert re.findall(r'<div class="cap (\w+)">', keyless) == ["web", "synthetic"]  # w1 and s1b, not s1a itself


def test_images_and_captions_are_looked_up_when_the_query_lacks_them(run: Path) -> None:
    page = build_gallery(run, "SELECT key, image_id FROM web ORDER BY key").html
    assert page.count('<img class="thumb"') == 5 and _keys(page) == ["w0", "w1", "w2", "w3", "w4", "w5"]
    assert 'data-col="captions"' in page and 'data-col="caption"' not in page


def test_any_query_renders_as_a_plain_table(run: Path) -> None:
    page = build_gallery(run, "SELECT source, count(*) AS n FROM scored GROUP BY ALL ORDER BY source").html
    assert 'data-col="image"' not in page and 'data-col="captions"' not in page and 'data-col="n"' in page
    assert "The query returned no rows." in build_gallery(run, "SELECT * FROM web WHERE false").html


def test_refused_statements_stay_refused(run: Path, tmp_path: Path) -> None:
    with pytest.raises(QueryRefused, match="COPY"):
        build_gallery(run, f"COPY web TO '{tmp_path}/x.csv'")
    assert not (tmp_path / "x.csv").exists()


def test_verdicts_and_thumbnails() -> None:
    assert verdict({"keep": True}) == ("kept", "kept")
    assert verdict({"outcome": "rejected", "reject_reason": "duplicate"}) == ("rejected", "rejected: duplicate")
    assert verdict({"status": "failed", "error": "timeout"}) == ("failed", "failed: timeout")
    assert verdict({"caption": "x"}) is None
    big = io.BytesIO()
    Image.new("RGB", (640, 320), (1, 2, 3)).save(big, format="JPEG")
    uri = thumbnail_uri(big.getvalue(), 128)
    assert uri and uri.startswith("data:image/jpeg;base64,")
    import base64

    assert Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).size == (128, 64)
    assert thumbnail_uri(b"<html>not an image</html>") is None and thumbnail_uri(None) is None


def test_the_readme_examples_run(run: Path) -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    examples = [shlex.split(line)[3] for line in readme.splitlines() if line.startswith(".venv/bin/capfilt browse ")]
    assert len(examples) >= 3
    pages = [build_gallery(run, sql) for sql in examples]
    assert _keys(pages[0].html) == ["s1a", "s2a"]  # synthetic captions that replaced a rejected web caption
    assert _keys(pages[1].html)[:2] == ["w3", "s2a"]  # kept rows, lowest score first


# ----------------------------------------------------------------------------- the command


def test_browse_writes_a_page(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "page.html"
    result = CliRunner().invoke(app, ["browse", str(run), ALL_SCORED, "--out", str(out), "--limit", "4"])
    assert result.exit_code == 0, result.output
    assert "4 of 10 rows" in result.output and out.as_uri() in result.output
    assert len(_keys(out.read_text())) == 4


def test_browse_refuses_and_reports_errors(run: Path, tmp_path: Path) -> None:
    refused = CliRunner().invoke(app, ["browse", str(run), "DROP VIEW web", "--out", str(tmp_path / "a.html")])
    assert refused.exit_code == 2 and "read-only" in refused.output
    broken = CliRunner().invoke(app, ["browse", str(run), "SELECT nope FROM web", "--out", str(tmp_path / "b.html")])
    assert broken.exit_code == 1 and "nope" in broken.output
    assert not list(tmp_path.iterdir())


def test_the_page_is_served_on_the_loopback(run: Path) -> None:
    page = build_gallery(run, ALL_SCORED).html
    server = page_server(page)
    host, port = server.server_address[:2]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        assert host == "127.0.0.1" and port > 0
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as response:
            assert response.read().decode() == page
        with pytest.raises(urllib.error.HTTPError, match="404"):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/etc/passwd", timeout=10)
    finally:
        server.shutdown()
        server.server_close()


def test_browse_without_out_serves_until_ctrl_c(run: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "browse", str(run), ALL_SCORED, "--limit", "3"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        address = re.search(r"http://127\.0\.0\.1:\d+/", line)
        assert address and "3 of 10 rows" in line, line + proc.stderr.read()
        with urllib.request.urlopen(address.group(0), timeout=10) as response:
            assert len(_keys(response.read().decode())) == 3
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0
    finally:
        proc.kill()
        proc.wait()


# ----------------------------------------------------------------------------- in a real browser

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--window-size=1200,1600"]


def _chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.skip("needs Debian's chromium package (apt-get install chromium); `make test` installs it as root")
    return path


def _browser(chromium: str, profile: Path, *args: str) -> str:
    done = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=90, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def _near(pixels: np.ndarray, colour: tuple[int, int, int], tolerance: int = 8) -> int:
    """How many pixels of an (H, W, 3) screenshot are within `tolerance` of `colour`."""
    return int((np.abs(pixels.astype(np.int16) - np.array(colour)).max(axis=-1) <= tolerance).sum())


def test_the_page_renders_in_headless_chromium(run: Path, tmp_path: Path) -> None:
    chromium = _chromium()
    run_dir = Path(os.environ.get("CAPFILT_BROWSE_RUN", run))
    sql = os.environ.get("CAPFILT_BROWSE_SQL", ALL_SCORED)
    page = tmp_path / "gallery.html"
    gallery = write_gallery(run_dir, sql, page, limit=200, title="capfilt browse: web and synthetic captions")
    url = page.resolve().as_uri()

    dom = _browser(chromium, tmp_path / "profile", "--dump-dom", url + "#sort=itm_score")
    # Row count on the page = the query's (the page is cut at --limit 200 and says so).
    assert len(_keys(dom)) == min(_count(run_dir, sql), 200) == gallery.shown > 0
    # Every image decoded and rendered (a broken icon has naturalWidth 0); the page's own script ran.
    widths = [int(w) for w in re.findall(r'data-natural-width="(\d+)"', dom)]
    assert widths and len(widths) == dom.count("<img") and min(widths) > 0
    assert re.search(rf'data-images-rendered="{len(widths)}" data-images="{len(widths)}"', dom)
    # Injected markup stayed text: no element from a caption, the title untouched.
    assert dom.count("<script") == 1 and "pwned" not in re.search(r"<title>(.*?)</title>", dom).group(1)
    # #sort=itm_score sorted the rows ascending, empty scores last.
    scores = [float(s) for s in re.findall(r'<td data-v="([\d.]+)" class="num" title="threshold', dom)]
    assert scores == sorted(scores) and 'aria-sort="ascending"' in dom

    shot = tmp_path / "gallery.png"
    _browser(chromium, tmp_path / "profile", f"--screenshot={shot}", url)
    image = Image.open(shot).convert("RGB")
    assert image.size == (1200, 1600)
    pixels = np.asarray(image)  # (H, W, 3)
    distinct = len(np.unique(pixels.reshape(-1, 3), axis=0))
    assert distinct > 50 and _near(pixels, (255, 255, 255), 0) < 0.97 * pixels.shape[0] * pixels.shape[1]  # not blank
    if run_dir == run:  # the fabricated images' colours are on the screen: thumbnails, not icons
        visible = [c for i, c in COLOURS.items() if _near(pixels, c) >= 64 * 64]
        assert len(visible) >= 4, visible
    print(f"browser: {len(widths)} images rendered, {len(scores)} scores sorted, {distinct} colours")
    if os.environ.get("CAPFILT_BROWSE_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["CAPFILT_BROWSE_SCREENSHOT"])


# ----------------------------------------------------------------------------- hostile callers (issue 23)


@pytest.mark.parametrize(("host", "status"), [("127.0.0.1:{port}", 200), ("localhost:{port}", 200), ("LOCALHOST:{port}", 200),
                                              ("evil.example:{port}", 421), ("evil.example", 421), ("127.0.0.1:1", 421),
                                              ("127.0.0.1.evil.example:{port}", 421), (None, 421)])  # fmt: skip
def test_the_served_page_answers_only_to_its_own_host_name(run: Path, host: str | None, status: int) -> None:
    import http.client

    server = page_server(build_gallery(run, ALL_SCORED, limit=1).html)
    port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.putrequest("GET", "/", skip_host=True)
        if host is not None:
            conn.putheader("Host", host.format(port=port))
        conn.endheaders()
        response = conn.getresponse()
        body = response.read()
        assert response.status == status  # DNS rebinding: a re-pointed domain reads nothing
        assert (b'data-key="' in body) == (status == 200)
        conn.close()
    finally:
        server.shutdown()
        server.server_close()


def test_browse_and_query_take_an_s3_run_folder(run: Path, tmp_path: Path, s3: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import fsspec

    fs = fsspec.filesystem("s3", use_listings_cache=False)
    fs.put(str(run), f"{s3}/run", recursive=True)
    monkeypatch.chdir(tmp_path)
    local = tmp_path / "page.html"
    result = CliRunner().invoke(app, ["browse", f"{s3}/run", ALL_SCORED, "--out", f"{s3}/pages/page.html"])
    assert result.exit_code == 0, result.output
    assert f"wrote {s3}/pages/page.html (10 rows)" in result.output
    assert CliRunner().invoke(app, ["browse", str(run), ALL_SCORED, "--out", str(local)]).exit_code == 0
    assert _keys(fs.cat_file(f"{s3}/pages/page.html").decode()) == _keys(local.read_text())
    query = CliRunner().invoke(app, ["query", f"{s3}/run", "SELECT key FROM scored ORDER BY key", "-f", "csv",
                                     "--output", f"{s3}/q/keys.csv"])  # fmt: skip
    assert query.exit_code == 0, query.output
    assert fs.cat_file(f"{s3}/q/keys.csv").decode().split() == ['"key"', *sorted(f'"{r[0]}"' for r in SCORED_ROWS)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["page.html"]  # no local ./s3:/ folder


def test_browse_stops_a_runaway_query_at_its_timeout(run: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["browse", str(run), "SELECT count(*) FROM range(100000000000) a",
                                      "--out", str(tmp_path / "p.html"), "--timeout", "1"])  # fmt: skip
    assert result.exit_code == 1 and "time limit of 1 s" in result.output and not (tmp_path / "p.html").exists()


def test_browse_shows_the_verdicts_of_a_dprime_decided_again_and_scores_to_4_decimals(run: Path, tmp_path: Path) -> None:
    import shutil

    from data.layout import RunLayout

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    # `capfilt assemble --threshold 0.45` after a filter at 0.5: w2 (0.47) joins D', w3 (0.52) and s1a stay
    dprime = [r for r in SCORED_ROWS if r[5] != "failed" and (r[4] or 0) >= 0.45]
    table = _table(dprime, scored=True).drop_columns(["keep", "reject_reason", "error"])
    table = table.set_column(table.column_names.index("threshold"), "threshold", pa.array([0.45] * len(dprime), pa.float32()))
    table = table.append_column("judge", pa.array(["j"] * len(dprime))).append_column("producer", pa.nulls(len(dprime), pa.string()))
    write_shard(table, copy / "assemble/asm000000000" / shard_name(0), "dataset")
    RunLayout(copy).mark_current("assemble", copy / "assemble/asm000000000")
    out = tmp_path / "page.html"
    sql = "SELECT key, image_id, source, caption, itm_score, keep, outcome, reject_reason, threshold FROM scored ORDER BY key"
    result = CliRunner().invoke(app, ["browse", str(copy), sql, "--out", str(out)])
    assert result.exit_code == 0, result.output
    page = out.read_text()
    verdicts = dict(re.findall(r'<tr class="row" data-key="(\w+)">.*?<span class="v (\w+)">', page))
    assert verdicts["w2"] == "kept" and verdicts["w0"] == "kept" and verdicts["w4"] == "rejected"  # as D' has them
    assert verdicts["w5"] == "failed"
    assert 'title="threshold 0.4500">0.4700<' in page  # the D' threshold, and 4 decimals
    # the w2 card beside s2a's row says kept too
    s2a = page.split('data-key="s2a"', 1)[1].split("</tr>", 1)[0]
    assert re.findall(r'<div class="cap web"><b>web</b> ([\d.]+) <span class="v (\w+)">', s2a) == [("0.4700", "kept")]
