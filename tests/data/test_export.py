"""`capfilt export`: each format read back by its real consumer equals D' (rows, captions, pixels)."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from data import export as export_module
from data.export import ExportError, dataset_shards, export, image_extension, plan_export, safe_stem
from data.layout import RunLayout
from data.shards import read_table, shard_name, write_shard

# Keys as the stages write them: human and web keys, synthetic `webkey/synN`, and a dot.
KEYS = [["h0", "h1", "w0", "w0/syn0", "w0/syn1"], ["w.1", "w1/syn0", "w2", "h2", "w2/syn0"]]


def _image(value: int, fmt: str) -> bytes:
    buffer = io.BytesIO()
    pixels = np.full((6, 5, 3), (value * 20 % 256, 255 - value, 7), np.uint8)
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def _source(key: str) -> str:
    return "synthetic" if "/syn" in key else "human" if key.startswith("h") else "web"


def _dataset(keys: list[str], offset: int) -> pa.Table:
    sources = [_source(k) for k in keys]
    judged = [s != "human" for s in sources]
    return pa.table({
        "key": keys,
        "image_id": [k.split("/")[0] for k in keys],
        "source": sources,
        "caption": [f"caption of {k} ünïcode" for k in keys],
        # The synthetic world is PNG, the web is JPEG.
        "jpg": pa.array([_image(offset + i, "JPEG" if s == "web" else "PNG") for i, s in enumerate(sources)], pa.binary()),
        "status": ["ok"] * len(keys),
        "itm_score": pa.array([0.5 + i / 20 if j else None for i, j in enumerate(judged)], pa.float32()),
        "threshold": pa.array([0.3 if j else None for j in judged], pa.float32()),
        "judge": pa.array([("judgefp" if j else None) for j in judged], pa.string()),
        "producer": pa.array([("capfp" if s == "synthetic" else None) for s in sources], pa.string()),
    })


def _write_dprime(folder: Path) -> list[Path]:
    paths = []
    for index, keys in enumerate(KEYS):
        path = folder / shard_name(index)
        write_shard(_dataset(keys, 10 * index), path, "dataset", row_group_size=2)
        paths.append(path)
    return paths


@pytest.fixture()
def dprime(tmp_path: Path) -> list[Path]:
    return _write_dprime(tmp_path / "dprime")


def _rows(paths: list[Path]) -> list[dict]:
    return [row for p in paths for row in read_table(p, "dataset").to_pylist()]


def _pixels(data: bytes | Image.Image) -> np.ndarray:
    image = data if isinstance(data, Image.Image) else Image.open(io.BytesIO(data))
    return np.asarray(image.convert("RGB"))


def _files(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under `folder` -> (inode, mtime_ns)."""
    return {str(p.relative_to(folder)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- pieces


def test_safe_stems_are_unique_file_names_and_extensions_follow_the_bytes() -> None:
    keys = [k for shard in KEYS for k in shard] + ["w0_syn0", "a" * 300]
    stems = [safe_stem(k) for k in keys]
    assert len(set(stems)) == len(keys)
    assert all("/" not in s and "." not in s and len(s) <= 110 for s in stems)
    assert safe_stem("h0") == "h0" and safe_stem("w0/syn0").startswith("w0_syn0-")
    assert image_extension(_image(1, "JPEG")) == "jpg" and image_extension(_image(1, "PNG")) == "png"
    assert image_extension(_image(1, "WEBP")) == "webp" and image_extension(b"<html>") is None


def test_plan_cuts_dprime_in_order_across_row_groups(dprime: list[Path]) -> None:
    plan = plan_export(dprime, "parquet", shard_rows=4)
    assert [s.rows for s in plan.shards] == [4, 4, 2] and plan.rows == 10
    first = plan.shards[1].pieces  # rows 4..7: the last row of shard 0, then 3 of shard 1
    assert [(p.path.name, p.row_group, p.start, p.stop) for p in first] == [
        ("part-00000.parquet", 2, 0, 1), ("part-00001.parquet", 0, 0, 2), ("part-00001.parquet", 1, 0, 1)]
    assert plan_export(dprime, "parquet", 4).settings != plan_export(dprime, "webdataset", 4).settings


# ----------------------------------------------------------------------------- webdataset


def test_webdataset_reads_back_dprime(dprime: list[Path], tmp_path: Path) -> None:
    import webdataset as wds

    out = tmp_path / "wds"
    progress: list[tuple[int, int]] = []
    stats = export(dprime, out, "webdataset", shard_rows=4, on_shard=lambda rows, total: progress.append((rows, total)))
    assert (stats.rows, stats.shards, stats.written) == (10, 3, 3)
    assert progress == [(4, 10), (4, 10), (2, 10)]  # after each output shard: its rows, of all
    assert stats.by_source == {"human": 3, "web": 3, "synthetic": 4}
    urls = [str(out / f"{i:05d}.tar") for i in range(3)]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("pil"))
    expected = _rows(dprime)
    assert [s["__key__"] for s in samples] == [safe_stem(r["key"]) for r in expected]
    for sample, row in zip(samples, expected):
        ext = "jpg" if row["source"] == "web" else "png"
        assert set(sample) - {"__key__", "__url__", "__local_path__"} == {ext, "txt", "json"}
        assert sample["txt"] == row["caption"]
        assert np.array_equal(_pixels(sample[ext]), _pixels(row["jpg"]))
        meta = sample["json"]
        assert meta["key"] == row["key"] and meta["stem"] == sample["__key__"] and meta["image"] == f"{sample['__key__']}.{ext}"
        for name in ("source", "image_id", "itm_score", "threshold", "judge", "producer", "caption"):
            assert meta[name] == row[name]
    sidecar = pa.concat_tables([pq.read_table(out / f"{i:05d}.parquet") for i in range(3)])
    assert sidecar.column("key").to_pylist() == [r["key"] for r in expected]
    assert sidecar.column("stem").to_pylist() == [s["__key__"] for s in samples]
    assert "jpg" not in sidecar.column_names
    assert json.loads((out / "sizes.json").read_text()) == {"00000.tar": 4, "00001.tar": 4, "00002.tar": 2}
    stats_file = json.loads((out / "00002_stats.json").read_text())
    assert stats_file["count"] == stats_file["successes"] == 2


def test_the_same_dprime_exports_to_identical_bytes(dprime: list[Path], tmp_path: Path) -> None:
    for fmt in ("webdataset", "parquet", "blip-json"):
        first, second = tmp_path / f"{fmt}-a", tmp_path / f"{fmt}-b"
        export(dprime, first, fmt, shard_rows=3)
        export(dprime, second, fmt, shard_rows=3)
        names = sorted(_files(first))
        assert names == sorted(_files(second))
        assert all((first / n).read_bytes() == (second / n).read_bytes() for n in names), fmt


# ----------------------------------------------------------------------------- parquet


def test_hugging_face_datasets_and_duckdb_read_the_parquet_export(dprime: list[Path], tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    out = tmp_path / "pq"
    export(dprime, out, "parquet", shard_rows=4)
    loaded = datasets.load_dataset("parquet", data_dir=str(out), split="train", cache_dir=str(tmp_path / "hf"))
    assert isinstance(loaded.features["image"], datasets.Image)
    expected = _rows(dprime)
    assert loaded.num_rows == len(expected)
    assert loaded["key"] == [r["key"] for r in expected]
    assert loaded["caption"] == [r["caption"] for r in expected]
    assert loaded["source"] == [r["source"] for r in expected]
    for got, row in zip(loaded, expected):
        assert isinstance(got["image"], Image.Image)
        assert np.array_equal(_pixels(got["image"]), _pixels(row["jpg"]))
        assert got["itm_score"] == row["itm_score"]  # float32 in both
    glob = str(out / "*.parquet")
    con = duckdb.connect()
    rows = con.execute(f"SELECT key, image.bytes, caption FROM read_parquet('{glob}')").fetchall()
    assert sorted(rows) == sorted((r["key"], r["jpg"], r["caption"]) for r in expected)


# ----------------------------------------------------------------------------- blip-json


def test_blip_json_annotations_point_at_the_images(dprime: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "blip"
    stats = export(dprime, out, "blip-json", shard_rows=4)
    annotations = json.loads((out / "annotations.json").read_text(encoding="utf-8"))
    expected = _rows(dprime)
    assert stats.rows == len(annotations) == len(expected)
    for ann, row in zip(annotations, expected):
        assert not Path(ann["image"]).is_absolute() and ann["image"].startswith("images/")
        assert ann["caption"] == row["caption"] and ann["key"] == row["key"] and ann["image_id"] == row["image_id"]
        assert Path(ann["image"]).suffix == (".jpg" if row["source"] == "web" else ".png")
        with Image.open(out / ann["image"]) as image:  # BLIP: Image.open(os.path.join(image_root, ann["image"]))
            assert np.array_equal(_pixels(image), _pixels(row["jpg"]))
    assert len(list((out / "images").rglob("*.*"))) == len(expected)


# ----------------------------------------------------------------------------- accounting, resume


def test_a_row_without_image_bytes_is_an_error_naming_shard_and_key(dprime: list[Path], tmp_path: Path) -> None:
    table = _dataset(["w9"], 0)
    table = table.set_column(table.column_names.index("jpg"), "jpg", pa.array([None], pa.binary()))
    bad = tmp_path / "dprime" / shard_name(2)
    write_shard(table, bad, "dataset")
    with pytest.raises(ExportError, match=r"part-00002\.parquet.*'w9'"):
        export([*dprime, bad], tmp_path / "out", "webdataset", shard_rows=100)
    assert not list((tmp_path / "out").glob("*.tar*"))  # nothing half-written left


def test_a_crash_mid_export_resumes_with_only_the_unfinished_shards(dprime: list[Path], tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "wds"
    real = export_module.WRITERS["webdataset"]

    def crash_on_shard_1(shard, folder):  # noqa: ANN001, ANN202
        if shard.index == 1:
            raise KeyboardInterrupt("killed")
        return real(shard, folder)

    monkeypatch.setitem(export_module.WRITERS, "webdataset", crash_on_shard_1)
    with pytest.raises(KeyboardInterrupt):
        export(dprime, out, "webdataset", shard_rows=4)
    monkeypatch.setitem(export_module.WRITERS, "webdataset", real)
    before = _files(out)
    assert "00000.tar" in before and "00001.tar" not in before and not any(n.endswith(".tmp") for n in before)
    stats = export(dprime, out, "webdataset", shard_rows=4)
    assert (stats.written, stats.skipped, stats.rows) == (2, 1, 10)
    assert _files(out)["00000.tar"] == before["00000.tar"]


# ----------------------------------------------------------------------------- the command


@pytest.fixture()
def run_folder(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    layout = RunLayout(run)
    old, current = layout.stage("assemble") / "0ld", layout.stage("assemble") / "c0ffee"
    write_shard(_dataset(["old"], 0), old / shard_name(0), "dataset")
    _write_dprime(current)
    layout.write_current({"assemble": current})
    return run


def test_cli_exports_the_current_dprime_and_a_rerun_rewrites_nothing(run_folder: Path, tmp_path: Path) -> None:
    from flows.cli import app

    runner = CliRunner()
    for fmt in ("webdataset", "blip-json", "parquet"):
        out = tmp_path / f"out-{fmt}"
        result = runner.invoke(app, ["export", str(run_folder), str(out), "--format", fmt, "--shard-size", "4"])
        assert result.exit_code == 0, result.output
        assert "exported 10 rows (human 3, web 3, synthetic 4) from 2 D' shards as 3" in result.output
        assert "(3 written, 0 already complete)" in result.output
        before = _files(out)
        again = runner.invoke(app, ["export", str(run_folder), str(out), "--format", fmt, "--shard-size", "4"])
        assert again.exit_code == 0 and "(0 written, 3 already complete)" in again.output
        assert _files(out) == before
    assert dataset_shards(run_folder)[0].parent.name == "c0ffee"  # the recorded D', not the other folder
    other = runner.invoke(app, ["export", str(run_folder), str(tmp_path / "out-parquet"), "-f", "parquet", "--shard-size", "5"])
    assert other.exit_code == 1 and "another D' or other settings" in other.output
    direct = runner.invoke(app, ["export", "--input", str(run_folder / "assemble/c0ffee"), str(tmp_path / "direct"), "-f", "parquet"])
    assert direct.exit_code == 0 and "exported 10 rows" in direct.output and "as 1 parquet shards" in direct.output
    assert os.path.isfile(tmp_path / "direct" / "part-00000.parquet")
    missing = runner.invoke(app, ["export", str(tmp_path / "nowhere"), str(tmp_path / "o"), "-f", "parquet"])
    assert missing.exit_code == 1 and "no part-*.parquet" in missing.output


# ----------------------------------------------------------------------------- where it must not write (issue 23)


def _export(*args: str):  # noqa: ANN202 (a click Result)
    from flows.cli import app

    return CliRunner().invoke(app, ["export", *args])


def _one_line_error(result) -> str:  # noqa: ANN001
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("capfilt export: "), result.output
    return lines[0]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_export_refuses_a_folder_holding_someone_elses_files(run_folder: Path, tmp_path: Path) -> None:
    theirs = tmp_path / "img2dataset"
    theirs.mkdir()
    (theirs / "00000.tar").write_bytes(b"their tar")
    (theirs / "00000.parquet").write_bytes(b"their sidecar")
    before = _snapshot(theirs)
    for fmt in ("webdataset", "parquet", "blip-json"):
        line = _one_line_error(_export(str(run_folder), str(theirs), "-f", fmt))
        assert str(theirs) in line and "not empty" in line and "empty or new folder" in line
    assert _snapshot(theirs) == before and not (theirs / ".capfilt").exists()
    (tmp_path / "a-file").write_text("mine")
    assert "it is a file" in _one_line_error(_export(str(run_folder), str(tmp_path / "a-file"), "-f", "parquet"))
    out = tmp_path / "wds"
    assert _export(str(run_folder), str(out), "-f", "webdataset").exit_code == 0
    line = _one_line_error(_export(str(run_folder), str(out), "-f", "parquet"))  # another kind of export
    assert "holds a capfilt webdataset export" in line


def test_export_never_writes_into_its_own_dprime_input(run_folder: Path) -> None:
    dprime = run_folder / "assemble" / "c0ffee"
    before = _snapshot(run_folder)
    line = _one_line_error(_export("--input", str(dprime), str(dprime), "-f", "parquet"))
    assert "holds the D' shard" in line and "part-00000.parquet" in line
    _one_line_error(_export(str(run_folder), str(run_folder), "-f", "parquet"))
    _one_line_error(_export(str(run_folder), str(run_folder / "assemble"), "-f", "webdataset"))
    assert _snapshot(run_folder) == before


@pytest.mark.parametrize(("fmt", "link"), [("webdataset", "00000.tar"), ("blip-json", "images"), ("parquet", ".capfilt")])
def test_export_never_follows_a_link_inside_out_to_write_outside_it(run_folder: Path, tmp_path: Path, fmt: str,
                                                                    link: str) -> None:  # fmt: skip
    out, outside = tmp_path / "out", tmp_path / "outside"
    assert _export(str(run_folder), str(out), "-f", fmt, "--shard-size", "4").exit_code == 0
    outside.mkdir()
    (outside / "precious").write_text("keep me")
    target = out / link
    if target.is_dir():
        import shutil

        shutil.rmtree(target)
        target.symlink_to(outside, target_is_directory=True)
    else:
        target.unlink()
        target.symlink_to(outside / "precious")
    line = _one_line_error(_export(str(run_folder), str(out), "-f", fmt, "--shard-size", "4"))
    assert f"{out / link} is a symbolic link" in line
    assert _snapshot(outside) == {"precious": b"keep me"}


def test_our_webdataset_export_reads_back_as_input(run_folder: Path, tmp_path: Path) -> None:
    from flows.cli import app

    out = tmp_path / "wds"
    assert _export(str(run_folder), str(out), "-f", "webdataset", "--shard-size", "4").exit_code == 0
    result = CliRunner().invoke(app, ["ingest", "img2dataset", str(out), str(tmp_path / "back")])
    assert result.exit_code == 0, result.output
    back = [r for p in sorted((tmp_path / "back").glob("part-*.parquet")) for r in read_table(p, "pairs").to_pylist()]
    expected = _rows(dataset_shards(run_folder))
    assert [r["key"] for r in back] == [r["key"] for r in expected]  # the D' keys, not the stems
    assert [r["caption"] for r in back] == [r["caption"] for r in expected]
    assert all(r["status"] == "ok" and np.array_equal(_pixels(r["jpg"]), _pixels(e["jpg"])) for r, e in zip(back, expected))
    assert [r["image_id"] for r in back] == [r["image_id"] for r in expected]


# ----------------------------------------------------------------------------- URLs (issue 23)


def test_export_takes_an_s3_run_folder_and_an_s3_out(run_folder: Path, tmp_path: Path, s3: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    import fsspec

    fs = fsspec.filesystem("s3", use_listings_cache=False)
    fs.put(str(run_folder), f"{s3}/run", recursive=True)
    monkeypatch.chdir(tmp_path)
    for fmt in ("webdataset", "blip-json", "parquet"):
        result = _export(f"{s3}/run", f"{s3}/out-{fmt}", "-f", fmt, "--shard-size", "4")
        assert result.exit_code == 0, result.output
        assert "exported 10 rows (human 3, web 3, synthetic 4)" in result.output and f"to {s3}/out-{fmt} " in result.output
    assert not (tmp_path / "s3:").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    local = tmp_path / "local-wds"
    assert _export(str(run_folder), str(local), "-f", "webdataset", "--shard-size", "4").exit_code == 0
    for name in ("00000.tar", "00001.parquet", "sizes.json"):
        assert fs.cat_file(f"{s3}/out-webdataset/{name}") == (local / name).read_bytes()
    again = _export(f"{s3}/run", f"{s3}/out-webdataset", "-f", "webdataset", "--shard-size", "4")
    assert again.exit_code == 0 and "(0 written, 3 already complete)" in again.output
    fs.pipe(f"{s3}/theirs/00000.tar", b"their tar")
    assert "not empty" in _one_line_error(_export(f"{s3}/run", f"{s3}/theirs", "-f", "webdataset"))
