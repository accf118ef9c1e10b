"""Filter stage: ITM scores equal a per-pair reference, each image is encoded once, every
row is accounted for, reruns skip, settings changes write elsewhere, top-k, img2dataset input."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from stage_helpers import caption, jpeg, tiny_model, web_shards, write_pairs

import blip_core
from blip_core.image import ImageTransform
from data.images import decode_image
from data.shards import list_shards, read_completion, read_table
from tasks.execution import ExecutionConfig
from tasks.filter import FilterConfig, run_filter

EXEC = ExecutionConfig(batch_size=3, num_workers=0, progress=False)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model(tmp_path_factory.mktemp("filter-model"))


@pytest.fixture(scope="module")
def loaded(model_dir: Path) -> blip_core.LoadedModel:
    return blip_core.load(model_dir)


def _synthetic(web: Path, folder: Path, per_image: int) -> Path:
    """A caption-stage-like shard: `per_image` synthetic rows for each ok web row."""
    rows = []
    for r in read_table(web, "pairs").to_pylist():
        if r["status"] != "ok":
            continue
        for c in range(per_image):
            rows.append({**r, "key": f"{r['key']}/syn{c}", "source": "synthetic", "caption": caption(hash((r["key"], c)) % 997)})
    path = folder / web.name
    write_pairs(path, [{k: v for k, v in r.items() if k not in ("candidate", "producer")} for r in rows])
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], Path]:
    root = tmp_path_factory.mktemp("filter-in")
    (root / "web").mkdir()
    (root / "cap").mkdir()
    webs = web_shards(root / "web", (5, 4), failed=(1,), garbage=(3,))
    for web in webs:
        _synthetic(web, root / "cap", per_image=2)
    return webs, root / "cap"


def _reference(loaded: blip_core.LoadedModel, data: bytes, text: str) -> float:
    """One pair at a time, as a straightforward loop would do it."""
    pixels = ImageTransform(loaded.model.config.vision.image_size)(decode_image(data).image)[None]
    ids, mask = loaded.tokenizer.encode([text], mode="itm", max_length=35)
    return float(loaded.model.itm_probability(pixels, ids, mask)[0])


def _rows(folder: Path, outcome: str) -> list[dict]:
    return [r for p in list_shards(folder / outcome) for r in read_table(p, "scored").to_pylist()]


def test_scores_accounting_and_outcomes(tmp_path: Path, loaded, inputs) -> None:
    webs, cap = inputs
    stats = run_filter(webs, tmp_path, loaded, FilterConfig(threshold=0.5, execution=EXEC), caption_dir=cap)
    folder = stats.output
    assert folder.parent == tmp_path and folder.name == stats.settings_hash
    kept, rejected, failed = (_rows(folder, o) for o in ("kept", "rejected", "failed"))
    # inputs: 9 web rows, 7 ok-status of which 2 garbage -> (7) * 2 synthetic rows
    assert stats.totals["input"] == 9 + 7 * 2
    assert stats.totals["kept"] == len(kept) and stats.totals["rejected"] == len(rejected)
    assert stats.totals["failed"] == len(failed) == 2 + 2 * 3  # 2 HTTP failures; 2 garbage images x (web + 2 syn)
    for shard in stats.shards:
        for outcome in ("kept", "rejected", "failed"):
            record = read_completion(folder / outcome / shard.shard)
            c = record.counts
            assert c["kept"] + c["rejected"] + c["failed"] == c["input"] == shard.counts["input"]
    keys = [r["key"] for r in kept + rejected + failed]
    assert len(keys) == len(set(keys)) == stats.totals["input"]
    for row in kept + rejected:
        assert row["itm_score"] == pytest.approx(_reference(loaded, row["jpg"], row["caption"]), abs=1e-5)
        assert row["keep"] == (row["itm_score"] >= 0.5) and row["threshold"] == 0.5
        assert row["judge"] == loaded.fingerprint and row["status"] == "ok"
    assert all(r["reject_reason"] == "itm_below_threshold" for r in rejected)
    assert {r["source"] for r in kept + rejected} == {"web", "synthetic"}
    assert all(r["itm_score"] is None and r["status"] == "failed" and r["error"] for r in failed)
    assert any("not an image" in r["error"] for r in failed)


def test_each_image_is_encoded_once(tmp_path: Path, loaded, inputs) -> None:
    webs, cap = inputs
    seen: list[int] = []
    handle = loaded.model.vision.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    try:
        run_filter(webs, tmp_path, loaded, FilterConfig(execution=EXEC), caption_dir=cap)
    finally:
        handle.remove()
    assert sum(seen) == 5  # readable images, once each, for their 15 captions


def test_rerun_skips_and_settings_change_writes_elsewhere(tmp_path: Path, loaded, inputs) -> None:
    webs, cap = inputs
    first = run_filter(webs, tmp_path, loaded, FilterConfig(execution=EXEC), caption_dir=cap)
    mtimes = {p: p.stat().st_mtime_ns for p in first.output.rglob("*.parquet")}
    bigger = ExecutionConfig(batch_size=8, num_workers=1, progress=False)
    again = run_filter(webs, tmp_path, loaded, FilterConfig(execution=bigger), caption_dir=cap)
    assert again.output == first.output and all(s.skipped for s in again.shards)
    assert {p: p.stat().st_mtime_ns for p in first.output.rglob("*.parquet")} == mtimes
    assert again.totals == first.totals
    other = run_filter(webs, tmp_path, loaded, FilterConfig(threshold=0.3, execution=EXEC), caption_dir=cap)
    assert other.output != first.output and not any(s.skipped for s in other.shards)
    assert {p: p.stat().st_mtime_ns for p in first.output.rglob("*.parquet")} == mtimes


def test_top_k_keeps_best_synthetic_per_image(tmp_path: Path, loaded, inputs) -> None:
    webs, cap = inputs
    stats = run_filter(webs, tmp_path, loaded, FilterConfig(threshold=0.0, top_k=1, execution=EXEC), caption_dir=cap)
    kept, rejected = _rows(stats.output, "kept"), _rows(stats.output, "rejected")
    syn_kept = [r for r in kept if r["source"] == "synthetic"]
    assert len(syn_kept) == len({r["image_id"] for r in syn_kept}) == 5
    for row in syn_kept:
        others = [r for r in rejected if r["image_id"] == row["image_id"] and r["source"] == "synthetic"]
        assert len(others) == 1 and others[0]["reject_reason"] == "not_top_k"
        assert others[0]["itm_score"] <= row["itm_score"]
    assert all(r["source"] == "synthetic" for r in rejected)


def test_img2dataset_parquet_is_read_as_is(tmp_path: Path, loaded) -> None:
    n = 4
    data = [jpeg(i) for i in range(n)]
    status = ["success", "failed_to_download", "success", "success"]
    table = pa.table(
        {
            "key": [f"{i:09d}" for i in range(n)],
            "url": [f"http://x/{i}" for i in range(n)],
            "caption": [caption(i) for i in range(n - 1)] + [None],
            "status": status,
            "error_message": [None, "HTTP Error 404", None, None],
            "width": pa.array([24, None, 24, 24], pa.int64()),
            "height": pa.array([24, None, 24, 24], pa.int64()),
            "original_width": pa.array([24, None, 24, 24], pa.int64()),
            "original_height": pa.array([24, None, 24, 24], pa.int64()),
            "exif": [None] * n,
            "sha256": [hashlib.sha256(d).hexdigest() if s == "success" else None for d, s in zip(data, status)],
            "jpg": [d if s == "success" else None for d, s in zip(data, status)],
        }
    )
    src = tmp_path / "i2d" / "00007.parquet"
    src.parent.mkdir()
    pq.write_table(table, src)
    stats = run_filter([src.parent], tmp_path / "out", loaded, FilterConfig(execution=EXEC))
    assert [s.shard for s in stats.shards] == ["part-00007.parquet"]
    failed = _rows(stats.output, "failed")
    assert [(r["key"], r["error"]) for r in failed] == [("000000001", "failed_to_download: HTTP Error 404")]
    rejected = _rows(stats.output, "rejected")
    assert [r["reject_reason"] for r in rejected if r["key"] == "000000003"] == ["empty_caption"]
    assert stats.totals["input"] == n and stats.totals["kept"] + stats.totals["rejected"] == 3
    scored = [r for r in _rows(stats.output, "kept") + rejected if r["itm_score"] is not None]
    assert len(scored) == 2 and np.all(np.isfinite([r["itm_score"] for r in scored]))


def test_refuses_a_captioning_export_as_filter(tmp_path: Path, loaded, inputs) -> None:
    blip_core.export_hf(loaded.model, loaded.tokenizer, tmp_path / "hf-cap", kind="captioning")
    with pytest.raises(ValueError, match="captioning export"):
        run_filter(inputs[0], tmp_path / "out", tmp_path / "hf-cap", FilterConfig(execution=EXEC))


def test_transformers_retrieval_folder_gives_the_same_scores(tmp_path: Path, loaded, inputs) -> None:
    webs, cap = inputs
    hf_dir = blip_core.export_hf(loaded.model, loaded.tokenizer, tmp_path / "hf-itm", kind="retrieval")
    ours = run_filter(webs, tmp_path / "a", loaded, FilterConfig(execution=EXEC), caption_dir=cap)
    theirs = run_filter(webs, tmp_path / "b", hf_dir, FilterConfig(execution=EXEC), caption_dir=cap)
    assert theirs.output.name != ours.output.name  # another judge fingerprint, another folder

    def scores(folder: Path) -> dict[str, float]:
        return {r["key"]: r["itm_score"] for o in ("kept", "rejected") for r in _rows(folder, o)}

    a, b = scores(ours.output), scores(theirs.output)
    assert a.keys() == b.keys() and max(abs((a[k] or 0) - (b[k] or 0)) for k in a) < 1e-5


@pytest.mark.slow
def test_real_img2dataset_output_goes_straight_into_the_filter(tmp_path: Path, loaded) -> None:
    """img2dataset downloads from a local server (one URL 404s); its raw Parquet is the input."""
    from data.ingest_web import run_img2dataset, serve_folder

    www = tmp_path / "www"
    www.mkdir()
    for i in range(3):
        (www / f"{i}.jpg").write_bytes(jpeg(i, size=40))
    with serve_folder(www) as base:
        urls = [f"{base}/{i}.jpg" for i in range(3)] + [f"{base}/missing.jpg"]
        pq.write_table(pa.table({"url": urls, "caption": [caption(i) for i in range(4)]}), tmp_path / "urls.parquet")
        args = {
            "url_list": str(tmp_path / "urls.parquet"), "input_format": "parquet", "url_col": "url",
            "caption_col": "caption", "output_folder": str(tmp_path / "raw"), "output_format": "parquet",
            "processes_count": 1, "thread_count": 4, "image_size": 32, "resize_mode": "no",
            "enable_wandb": False, "timeout": 5, "retries": 0,
        }
        run_img2dataset(args, tmp_path / "img2dataset.log", timeout_s=180)
    stats = run_filter([tmp_path / "raw"], tmp_path / "out", loaded, FilterConfig(execution=EXEC))
    assert stats.totals["input"] == 4 and stats.totals["failed"] == 1
    assert stats.totals["kept"] + stats.totals["rejected"] == 3
    (failed,) = _rows(stats.output, "failed")
    assert failed["url"].endswith("missing.jpg") and "404" in failed["error"]
    scored = _rows(stats.output, "kept") + _rows(stats.output, "rejected")
    assert all(r["itm_score"] is not None and r["source"] == "web" for r in scored)


def test_shards_from_other_tools_differing_in_nullability_or_column_order_are_accepted(
    tmp_path: Path, loaded, inputs
) -> None:
    """Another tool's writer: every field nullable, columns in another order. Same rows, same verdicts."""
    webs, cap = inputs
    other = tmp_path / "other"
    (other / "web").mkdir(parents=True)
    (other / "cap").mkdir()
    for src, folder in [(w, other / "web") for w in webs] + [(c, other / "cap") for c in list_shards(cap)]:
        table = pq.read_table(src)
        loose = pa.schema([f.with_nullable(True) for f in table.schema]).remove_metadata()
        table = table.cast(loose)
        pq.write_table(table.select(list(reversed(table.column_names))), folder / src.name)
    ours = run_filter(webs, tmp_path / "ours", loaded, FilterConfig(execution=EXEC), caption_dir=cap)
    theirs = run_filter(list_shards(other / "web"), tmp_path / "theirs", loaded, FilterConfig(execution=EXEC),
                        caption_dir=other / "cap")  # fmt: skip
    assert theirs.totals == ours.totals
    for outcome in ("kept", "rejected", "failed"):
        assert [r["key"] for r in _rows(theirs.output, outcome)] == [r["key"] for r in _rows(ours.output, outcome)]


def test_a_real_schema_mismatch_names_file_column_expected_and_found(tmp_path: Path, loaded, inputs) -> None:
    webs, cap = inputs
    bad = tmp_path / "cap"
    bad.mkdir()
    for src in list_shards(cap):
        table = pq.read_table(src)
        pq.write_table(table.set_column(table.schema.get_field_index("caption"), "caption",
                                        pa.array(range(table.num_rows), pa.int64())), bad / src.name)  # fmt: skip
    with pytest.raises(Exception, match=r"part-00000\.parquet: column 'caption' has type int64, expected string"):
        run_filter(webs, tmp_path / "out", loaded, FilterConfig(execution=EXEC), caption_dir=bad)


def _pairs_of_repeated_images(path: Path, distinct_bytes: bool) -> Path:
    """img2dataset-style rows: 3 images x 3 captions, one row per pair, the image's bytes in
    each row; with `distinct_bytes` each repeat gets a trailing byte (same pixels, other bytes)."""
    rows = []
    for image in range(3):
        data = jpeg(500 + image)
        for c in range(3):
            blob = data + bytes(c) if distinct_bytes else data
            rows.append({"key": f"i{image}-c{c}", "image_id": f"row{image}-{c}", "source": "web",
                         "caption": caption(40 * image + c), "jpg": blob, "url": None, "width": 24, "height": 24,
                         "sha256": hashlib.sha256(blob).hexdigest(), "status": "ok", "error": None})  # fmt: skip
    return write_pairs(path, rows)


def test_repeated_image_bytes_are_encoded_once_with_the_same_scores(tmp_path: Path, loaded) -> None:
    (tmp_path / "same").mkdir()
    (tmp_path / "distinct").mkdir()
    same = _pairs_of_repeated_images(tmp_path / "same" / "part-00000.parquet", distinct_bytes=False)
    distinct = _pairs_of_repeated_images(tmp_path / "distinct" / "part-00000.parquet", distinct_bytes=True)
    runs = {}
    for name, shard in (("same", same), ("distinct", distinct)):
        seen: list[int] = []
        handle = loaded.model.vision.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
        try:
            stats = run_filter([shard], tmp_path / f"out-{name}", loaded, FilterConfig(execution=EXEC))
        finally:
            handle.remove()
        rows = _rows(stats.output, "kept") + _rows(stats.output, "rejected")
        runs[name] = (sum(seen), {r["key"]: r for r in rows}, stats)
    (enc_same, rows_same, stats_same), (enc_distinct, rows_distinct, stats_distinct) = runs["same"], runs["distinct"]
    assert (enc_same, enc_distinct) == (3, 9)  # each distinct image once vs every row
    assert stats_same.images == 3 and stats_distinct.images == 9
    assert rows_same.keys() == rows_distinct.keys() and len(rows_same) == 9
    for key, row in rows_same.items():
        assert row["itm_score"] == pytest.approx(rows_distinct[key]["itm_score"], abs=1e-6)
        assert row["keep"] == rows_distinct[key]["keep"] and row["jpg"] == rows_distinct[key]["jpg"][:len(row["jpg"])]
        assert row["itm_score"] == pytest.approx(_reference(loaded, row["jpg"], row["caption"]), abs=1e-5)
    assert stats_same.totals == stats_distinct.totals


def test_same_image_rows_groups_ok_rows_by_content_only() -> None:
    from tasks.filter import same_image_rows

    a, b = jpeg(1), jpeg(2)
    table = pa.table({"jpg": pa.array([a, b, a, a, None, b], pa.binary()),
                      "status": pa.array(["ok", "ok", "failed", "ok", "ok", "ok"])})  # fmt: skip
    canonical, images = same_image_rows(table)
    assert canonical.tolist() == [0, 1, 2, 0, 4, 1]  # the failed and the null row stand alone
    assert images.tolist() == [0, 1]
