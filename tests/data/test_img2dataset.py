"""The one img2dataset adapter: the same img2dataset parquet gives the same pairs rows
through ingestion's import and through the stages' reader, failed and garbage rows included."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data.img2dataset import KEY_COLUMN, failure_text
from data.ingest import failure_kind
from data.ingest_web import ImportConfig, import_img2dataset
from data.inputs import read_pairs
from data.schema import SchemaError
from data.shards import read_table


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 90)).save(buffer, format="PNG")
    return buffer.getvalue()


GOOD = _png(12, 9)
HTML = b"<!doctype html><html><body>404 page saved as .jpg</body></html>"


def _img2dataset_shard(path: Path, **overrides: list) -> Path:
    """An img2dataset parquet shard (its own column set): good, failed, garbage, no bytes."""
    status = ["success", "failed_to_download", "success", "success"]
    jpg = [GOOD, None, HTML, None]
    n = len(status)
    columns = {
        "key": ["000000000", "000000001", "000000002", "000000003"],
        "url": [f"http://example.com/{i}.jpg" for i in range(n)],
        "caption": ["a red square", "lost", "an html page", None],
        "status": status,
        "error_message": [None, "HTTP Error 404: Not Found", None, None],
        "width": pa.array([12, None, 64, 64], pa.int64()),  # img2dataset's sizes: ours come from decoding
        "height": pa.array([9, None, 64, 64], pa.int64()),
        "original_width": pa.array([12, None, 64, 64], pa.int64()),
        "original_height": pa.array([9, None, 64, 64], pa.int64()),
        "exif": [None] * n,
        "sha256": [hashlib.sha256(b).hexdigest() if b else None for b in jpg],
        "jpg": pa.array(jpg, pa.binary()),
        **overrides,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path


def test_import_and_stage_reader_give_the_same_pairs_rows(tmp_path: Path) -> None:
    src = _img2dataset_shard(tmp_path / "i2d" / "00000.parquet")
    import_img2dataset(src.parent, tmp_path / "imported", ImportConfig())
    imported = read_table(tmp_path / "imported" / "part-00000.parquet", "pairs")
    staged = read_pairs(src)
    assert staged.schema.equals(imported.schema, check_metadata=False)
    assert staged.to_pylist() == imported.to_pylist()
    rows = {r["key"]: r for r in staged.to_pylist()}
    assert list(rows) == ["000000000", "000000001", "000000002", "000000003"]  # img2dataset's keys, unchanged
    good, failed, garbage, empty = rows.values()
    assert (good["status"], good["error"], good["image_id"], good["source"]) == ("ok", None, "000000000", "web")
    assert (good["width"], good["height"], good["jpg"]) == (12, 9, GOOD)
    assert good["sha256"] == hashlib.sha256(GOOD).hexdigest()
    assert failed["error"] == "failed_to_download: HTTP Error 404: Not Found" and failed["jpg"] is None
    assert failure_kind(garbage["error"]) == "undecodable" and "HTML" in garbage["error"]
    assert (garbage["jpg"], garbage["width"], garbage["sha256"]) == (None, None, None)
    assert failure_kind(empty["error"]) == "no_image_bytes"
    assert [r["status"] for r in rows.values()] == ["ok", "failed", "failed", "failed"]


def test_capfilt_key_names_the_row_in_both_paths(tmp_path: Path) -> None:
    keys = ["web-a", "web-b", "web-c", "web-d"]
    src = _img2dataset_shard(tmp_path / "i2d" / "00003.parquet", **{KEY_COLUMN: keys})
    import_img2dataset(src.parent, tmp_path / "imported", ImportConfig())
    imported = read_table(tmp_path / "imported" / "part-00003.parquet", "pairs")
    assert read_pairs(src).to_pylist() == imported.to_pylist()
    assert imported.column("key").to_pylist() == imported.column("image_id").to_pylist() == keys


def test_failure_text_stands_in_for_nulls() -> None:
    assert failure_text("failed_to_resize", "cannot identify image") == "failed_to_resize: cannot identify image"
    assert failure_text(None, None) == "failed: no error message"


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        (["000000000", None, "000000002", "000000003"], r"row 1 has a null 'key'.*fix or drop that row"),
        (["000000000", "000000001", "000000000", "000000003"], r"'000000000' repeats at rows 0 and 2.*drop the repeat"),
    ],
)
def test_bad_keys_name_the_file_row_and_fix_in_both_paths(tmp_path: Path, keys: list, message: str) -> None:
    src = _img2dataset_shard(tmp_path / "i2d" / "00000.parquet", key=keys)
    with pytest.raises(SchemaError, match=message) as staged:
        read_pairs(src)
    with pytest.raises(SchemaError, match=message) as imported:
        import_img2dataset(src.parent, tmp_path / "imported", ImportConfig())
    assert str(src) in str(staged.value) and str(src) in str(imported.value)


def test_webdataset_sidecar_without_its_tar_is_refused_by_the_stage_reader(tmp_path: Path) -> None:
    table = pq.read_table(_img2dataset_shard(tmp_path / "i2d" / "00000.parquet")).drop_columns(["jpg"])
    pq.write_table(table, tmp_path / "i2d" / "00000.parquet")
    with pytest.raises(SchemaError, match=r"00000\.parquet: no image bytes column.*NNNNN\.tar beside it: put that tar back"):
        read_pairs(tmp_path / "i2d" / "00000.parquet")
