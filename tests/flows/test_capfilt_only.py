"""Caption + filter only, on someone's img2dataset shards, with given models: no training runs."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.slow


def _as_img2dataset(src: Path, dst: Path) -> int:
    """Rewrite one of our pairs shards in img2dataset's own Parquet layout (00000.parquet)."""
    t = pq.read_table(src)
    ok = pc.equal(t.column("status"), "ok")
    table = pa.table({
        "key": t.column("key"), "url": t.column("url"), "caption": t.column("caption"),
        "status": pc.if_else(ok, "success", "failed_to_download"), "error_message": t.column("error"),
        "width": t.column("width"), "height": t.column("height"), "sha256": t.column("sha256"), "jpg": t.column("jpg"),
    })  # fmt: skip
    pq.write_table(table, dst)
    return table.num_rows


def _as_webdataset(parquet: Path) -> None:
    """img2dataset's webdataset format of the same rows, in place: NNNNN.tar (the fetched
    images, KEY.jpg / .txt / .json, written by the webdataset library) + the sidecar."""
    import json

    import webdataset as wds

    table = pq.read_table(parquet)
    with open(parquet.with_suffix(".tar"), "wb") as handle:
        writer = wds.TarWriter(handle)
        for row in table.to_pylist():
            if row["status"] == "success":
                meta = json.dumps({"key": row["key"], "url": row["url"], "caption": row["caption"]})
                writer.write({"__key__": row["key"], "jpg": row["jpg"], "txt": row["caption"] or "", "json": meta})
        writer.close()
    pq.write_table(table.drop_columns(["jpg"]), parquet)


@pytest.mark.parametrize("fmt", ["parquet", "webdataset"])
def test_caption_and_filter_on_img2dataset_shards(tmp_path: Path, prefect_harness, random_tiny_model, fmt: str) -> None:
    """`data.web` names img2dataset's output folder in either of its formats (webdataset read in place)."""
    from data.synth import SynthConfig, generate_world
    from flows.bootstrap import bootstrap
    from flows.config import load_config

    generate_world(tmp_path / "world", SynthConfig(human_images=8, web_images=60, test_images=4, rows_per_shard=30))
    shards = tmp_path / "img2dataset"
    shards.mkdir()
    rows = sum(_as_img2dataset(p, shards / f"{i:05d}.parquet")
               for i, p in enumerate(sorted((tmp_path / "world" / "web").glob("part-*.parquet"))))  # fmt: skip
    if fmt == "webdataset":
        for parquet in sorted(shards.glob("*.parquet")):
            _as_webdataset(parquet)
    cfg = load_config({
        "run_dir": str(tmp_path / "run"), "data": {"web": [str(shards)]},
        "model": {"filter": str(random_tiny_model), "captioner": str(random_tiny_model)},
        "stages": {"stop_after": "filter"},
    })  # fmt: skip
    summary = bootstrap(config=cfg)
    assert not (tmp_path / "run" / "models").exists()  # nothing was trained
    stages = {r["stage"]: r for r in summary["stages"]}
    assert set(stages) == {"ingest", "caption", "filter"}
    assert stages["ingest"]["web"] == stages["caption"]["input"] == rows and stages["caption"]["shards"] == 2
    filt = stages["filter"]
    assert filt["input"] == rows + stages["caption"]["kept"]  # web captions + one synthetic per image
    assert filt["kept"] + filt["rejected"] + filt["failed"] == filt["input"]
    assert sorted(p.name for p in (Path(summary["filter_dir"]) / "kept").glob("*.parquet")) == [
        "part-00000.parquet", "part-00001.parquet"]
    # web data read in place still has its `web` view (issue 23): the rows as the filter read them
    from data.catalog import open_catalog
    from data.inputs import read_pairs

    con = open_catalog(tmp_path / "run")
    web = con.execute("SELECT key, status FROM web ORDER BY key").fetchall()
    con.close()
    expected = sorted((r["key"], r["status"]) for p in sorted(shards.glob("*.tar" if fmt == "webdataset" else "*.parquet"))
                      for r in read_pairs(p, columns=["key", "status"]).to_pylist())  # fmt: skip
    assert web == expected and len(web) == rows
