"""Ingestion: real img2dataset against a local http.server, exact accounting per URL,
rerun skip, --retry-failed, import of img2dataset folders, human COCO / list sets."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data.ingest import failure_kind
from data.ingest_human import HumanIngestConfig, ingest_human
from data.ingest_web import (
    KEY_COLUMN,
    ImportConfig,
    WebIngestConfig,
    img2dataset_args,
    import_img2dataset,
    ingest_web,
    normalise_raw_shard,
    read_url_list,
    run_img2dataset,
    serve_folder,
)
from data.shards import list_shards, read_completion, read_table
from data.synth import SynthConfig, generate_world, load_truth, write_url_list

WORLD = SynthConfig(seed=1, human_images=4, web_images=30, test_images=2, rows_per_shard=16, broken_per_kind=2)
CFG = WebIngestConfig(rows_per_shard=16, processes=1, threads=4, timeout_s=5)
# img2dataset decodes and re-encodes (PNG in, PNG out) instead of keeping the bytes.
REENCODE = WebIngestConfig(rows_per_shard=16, processes=2, threads=4, timeout_s=5, encode_format="png", keep_original_bytes=False)
# What each URL-list row must end as: ok, or failed with this kind.
EXPECTED_KIND = {"missing": "failed_to_download", "corrupt": "undecodable", "html": "undecodable"}


def _rows(folder: Path) -> list[dict]:
    return [row for path in list_shards(folder) for row in read_table(path, "pairs").to_pylist()]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    """A synthetic world's web set served from 127.0.0.1 and ingested once."""
    root = tmp_path_factory.mktemp("ingest")
    world = root / "world"
    generate_world(world, WORLD, as_urls=True)
    with serve_folder(world / "www") as base_url:
        url_list = write_url_list(world, base_url)
        progress: list[tuple[int, int]] = []
        stats = ingest_web(url_list, root / "web", CFG, on_shard=lambda n, total: progress.append((n, total)))
        yield {"root": root, "world": world, "url_list": url_list, "out": root / "web", "stats": stats, "base": base_url,
               "progress": progress}  # fmt: skip


def _expected(world: Path) -> dict[str, str]:
    """key -> 'ok' or the failure kind img2dataset must report."""
    truth = load_truth(world)
    urls = pq.read_table(world / "web_urls.parquet").to_pylist()
    return {u["key"]: EXPECTED_KIND.get(truth.web_kinds[u["key"]], "ok") for u in urls}


@pytest.mark.slow
def test_every_url_is_accounted_for(served: dict) -> None:
    expected = _expected(served["world"])
    rows = _rows(served["out"])
    assert len(rows) == len(expected) == 30 + 6
    got = {r["key"]: ("ok" if r["status"] == "ok" else failure_kind(r["error"])) for r in rows}
    assert got == expected
    stats = served["stats"]
    assert stats.input == 36 and stats.ok == 30 and stats.failed == 6
    assert stats.failures == {"failed_to_download": 2, "undecodable": 4}
    assert stats.ok + sum(stats.failures.values()) == stats.input
    assert all("404" in r["error"] for r in rows if expected[r["key"]] == "failed_to_download")
    assert all("HTML" in r["error"] for r in rows if r["key"].startswith("web-html"))
    records = [read_completion(p) for p in list_shards(served["out"])]
    assert sum(r.counts["input"] for r in records if r) == 36
    shards = len(records)
    assert sum(n for n, _ in served["progress"]) == shards and {t for _, t in served["progress"]} == {shards}


@pytest.mark.slow
def test_ingested_rows_keep_bytes_ids_and_captions(served: dict) -> None:
    synth = {r["key"]: r for r in _rows(served["world"] / "web")}
    for row in _rows(served["out"]):
        assert row["source"] == "web" and row["url"].startswith(served["base"])
        if row["status"] != "ok":
            assert row["jpg"] is None and row["sha256"] is None
            continue
        original = synth[row["key"]]
        assert row["sha256"] == original["sha256"]  # the served bytes, unchanged
        assert (row["image_id"], row["caption"]) == (original["image_id"], original["caption"])
        assert Image.open(io.BytesIO(row["jpg"])).size == (row["width"], row["height"]) == (32, 32)


@pytest.mark.slow
def test_rerun_skips_finished_shards_without_downloading(served: dict) -> None:
    out = served["out"]
    before = {p.name: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    stats = ingest_web(served["url_list"], out, CFG)
    assert stats.shards_written == 0 and stats.shards_skipped == 3
    assert (stats.input, stats.ok) == (36, 30)
    after = {p.name: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert {k: v for k, v in after.items() if k != "manifest.json"} == {
        k: v for k, v in before.items() if k != "manifest.json"
    }


@pytest.mark.slow
def test_import_of_img2dataset_parquet_output_matches(served: dict, tmp_path: Path) -> None:
    raw = served["out"] / "_img2dataset" / "raw"
    stats = import_img2dataset(raw, tmp_path / "imported", ImportConfig())
    assert (stats.input, stats.ok, stats.failed) == (36, 30, 6)
    imported = {r["key"]: (r["status"], r["sha256"], r["error"]) for r in _rows(tmp_path / "imported")}
    ingested = {r["key"]: (r["status"], r["sha256"], r["error"]) for r in _rows(served["out"])}
    assert imported == ingested
    again = import_img2dataset(raw, tmp_path / "imported", ImportConfig())
    assert again.shards_written == 0 and again.shards_skipped == stats.shards_written


@pytest.mark.slow
def test_import_of_img2dataset_webdataset_output_reencoded(served: dict, tmp_path: Path) -> None:
    """img2dataset decoding itself (2 processes, webdataset tars): bad bytes fail there."""
    args = img2dataset_args(served["out"] / "_img2dataset" / "input.parquet", tmp_path / "wds", REENCODE, "incremental")
    args["output_format"] = "webdataset"
    run_img2dataset(args, tmp_path / "wds.log")
    assert list((tmp_path / "wds").glob("*.tar"))
    stats = import_img2dataset(tmp_path / "wds", tmp_path / "imported", ImportConfig())
    assert (stats.input, stats.ok) == (36, 30)
    assert stats.failures == {"failed_to_download": 2, "failed_to_resize": 4}
    rows = {r["key"]: r for r in _rows(tmp_path / "imported")}
    synth = {r["key"]: r for r in _rows(served["world"] / "web")}
    assert all(rows[k]["sha256"] == synth[k]["sha256"] for k in synth)


@pytest.mark.slow
def test_retry_failed_downloads_only_failures_and_merges_without_duplicates(served: dict, tmp_path: Path) -> None:
    out = tmp_path / "web"
    shutil.copytree(served["out"], out)
    www = served["world"] / "www"
    for j in range(WORLD.broken_per_kind):  # the 404s come back online
        shutil.copy(www / "images" / f"web-{j:06d}.png", www / "images" / f"missing-{j}.png")
    stats = ingest_web(served["url_list"], out, CFG, retry_failed=True)
    retried = pq.read_table(out / "_img2dataset" / "retry" / "input.parquet")
    assert retried.num_rows == 6  # only the failed rows went to img2dataset again
    rows = _rows(out)
    keys = [r["key"] for r in rows]
    assert len(keys) == len(set(keys)) == 36
    status = {r["key"]: r["status"] for r in rows}
    assert all(status[f"web-missing-{j}"] == "ok" for j in range(2))
    assert all(status[f"web-corrupt-{j}"] == "failed" for j in range(2))
    assert (stats.input, stats.ok, stats.failed) == (36, 32, 4)
    assert stats.failures == {"undecodable": 4}
    retried_shards = [read_completion(p) for p in list_shards(out)]
    assert any(r and r.extra.get("retries") == 1 for r in retried_shards)
    assert sum(r.counts["input"] for r in retried_shards if r) == 36


def test_rows_img2dataset_never_wrote_become_failed(tmp_path: Path) -> None:
    good = io.BytesIO()
    Image.new("RGB", (8, 6), "red").save(good, format="PNG")
    expected = [
        {KEY_COLUMN: k, "image_id": k, "url": f"http://x/{k}", "caption": f"c {k}"} for k in ("a", "b", "c", "d")
    ]
    raw = pa.table(
        {
            KEY_COLUMN: ["a", "b", "c"],
            "status": ["success", "success", "failed_to_download"],
            "error_message": [None, None, "timed out"],
            "jpg": [good.getvalue(), b"<html>not an image</html>", None],  # bytes column: encode_format
        }
    )
    pq.write_table(raw, tmp_path / "00000.parquet")
    table = normalise_raw_shard(expected, tmp_path / "00000.parquet", CFG)
    got = {r["key"]: (r["status"], failure_kind(r["error"]) if r["error"] else None) for r in table.to_pylist()}
    assert got == {
        "a": ("ok", None),
        "b": ("failed", "undecodable"),
        "c": ("failed", "failed_to_download"),
        "d": ("failed", "not_emitted"),
    }
    assert table.to_pylist()[0]["width"] == 8 and table.to_pylist()[0]["height"] == 6
    whole_shard_missing = normalise_raw_shard(expected, tmp_path / "00001.parquet", CFG)
    assert set(whole_shard_missing.column("status").to_pylist()) == {"failed"}


@pytest.mark.parametrize("suffix", ["csv", "tsv", "jsonl", "json", "parquet"])
def test_url_lists_in_each_format_with_custom_columns(tmp_path: Path, suffix: str) -> None:
    rows = [{"link": f"http://127.0.0.1:9/{i}.png", "alt": f"caption {i}", "id": i} for i in range(3)]
    path = tmp_path / f"list.{suffix}"
    if suffix == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif suffix == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif suffix == "json":  # a JSON array, not JSON Lines
        path.write_text(json.dumps(rows))
    else:
        sep = "," if suffix == "csv" else "\t"
        path.write_text("link" + sep + "alt" + sep + "id\n" + "".join(f"{r['link']}{sep}{r['alt']}{sep}{r['id']}\n" for r in rows))
    table = read_url_list(path, WebIngestConfig(url_col="link", caption_col="alt", key_col="id"))
    assert table.column(KEY_COLUMN).to_pylist() == ["0", "1", "2"]
    assert table.column("caption").to_pylist() == ["caption 0", "caption 1", "caption 2"]
    with pytest.raises(ValueError, match=r"list\.\w+: no url column 'url'"):
        read_url_list(path, WebIngestConfig())


def test_duplicate_keys_are_refused_with_the_row(tmp_path: Path) -> None:
    path = tmp_path / "dupes.jsonl"
    path.write_text('{"url": "http://a/1", "caption": "x", "key": "k"}\n{"url": "http://a/2", "caption": "y", "key": "k"}\n')
    with pytest.raises(ValueError, match="key 'k' repeats at row 1"):
        read_url_list(path, WebIngestConfig())


def _images(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.new("RGB", (10 + i, 7), (40 * i, 90, 200)).save(folder / name)


def test_human_coco_json_with_a_missing_image(tmp_path: Path) -> None:
    _images(tmp_path / "imgs", ["a.jpg", "b.png"])
    coco = {
        "images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.png"}, {"id": 3, "file_name": "gone.jpg"}],
        "annotations": [
            {"id": 10, "image_id": 1, "caption": "a blue thing"},
            {"id": 11, "image_id": 1, "caption": "something blue"},
            {"id": 12, "image_id": 2, "caption": "a small image"},
            {"id": 13, "image_id": 3, "caption": "lost"},
        ],
    }
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    cfg = HumanIngestConfig(image_root=str(tmp_path / "imgs"), rows_per_shard=3)
    stats = ingest_human(tmp_path / "captions.json", tmp_path / "out", cfg)
    assert (stats.input, stats.ok, stats.failed) == (4, 3, 1) and stats.failures == {"file_not_found": 1}
    rows = {r["key"]: r for r in _rows(tmp_path / "out")}
    assert set(rows) == {"human-10", "human-11", "human-12", "human-13"}
    assert rows["human-10"]["image_id"] == rows["human-11"]["image_id"] == "human-img-1"
    assert rows["human-12"]["width"] == 11 and rows["human-12"]["source"] == "human"
    assert "gone.jpg" in rows["human-13"]["error"]
    again = ingest_human(tmp_path / "captions.json", tmp_path / "out", cfg)
    assert again.shards_written == 0 and again.shards_skipped == 2


def test_human_jsonl_and_blip_list_of_paths(tmp_path: Path) -> None:
    _images(tmp_path, ["x.png", "y.png"])
    (tmp_path / "pairs.jsonl").write_text(
        json.dumps({"image": "x.png", "caption": "first"}) + "\n" + json.dumps({"image": "y.png", "caption": "second"}) + "\n"
    )
    stats = ingest_human(tmp_path / "pairs.jsonl", tmp_path / "a", HumanIngestConfig())
    assert (stats.input, stats.ok) == (2, 2)
    (tmp_path / "blip.json").write_text(json.dumps([{"image": "x.png", "caption": ["one", "two"]}, {"image": "y.png", "caption": "three"}]))
    stats = ingest_human(tmp_path / "blip.json", tmp_path / "b", HumanIngestConfig())
    rows = _rows(tmp_path / "b")
    assert [r["caption"] for r in rows] == ["one", "two", "three"]
    assert rows[0]["image_id"] == rows[1]["image_id"] != rows[2]["image_id"]


@pytest.mark.parametrize("polled", [False, True])
def test_an_img2dataset_run_past_its_limit_is_stopped(tmp_path: Path, polled: bool) -> None:
    path = tmp_path / "list.parquet"
    pq.write_table(pa.table({KEY_COLUMN: ["a"], "url": ["http://127.0.0.1:9/a.png"], "caption": ["x"]}), path)
    args = img2dataset_args(path, tmp_path / "raw", CFG, "incremental")
    with pytest.raises(RuntimeError, match="ran past 0.5 s"):
        run_img2dataset(args, tmp_path / "raw.log", timeout_s=0.5,  # importing img2dataset alone takes longer
                        on_poll=(lambda: None) if polled else None)  # fmt: skip
