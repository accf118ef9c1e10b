"""The stages read img2dataset's webdataset output in place: caption, filter and assemble give
exactly the outputs they give for the same samples in img2dataset's parquet format,
through the CLI too, and a truncated tar or a sidecar that disagrees with its tar ends
as failed rows with the reason (every sample key in the stage's accounting)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from stage_helpers import tiny_model
from typer.testing import CliRunner
from webdataset_shards import Sample, jpeg, samples, write_parquet_format, write_webdataset_format

import blip_core
from data.ingest import failure_kind
from data.shards import list_shards, read_table
from flows.cli import app
from tasks.caption import CaptionConfig, run_caption
from tasks.execution import ExecutionConfig
from tasks.filter import FilterConfig, run_filter

EXEC = ExecutionConfig(batch_size=3, num_workers=0, progress=False)
OUTCOMES = ("kept", "rejected", "failed")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model(tmp_path_factory.mktemp("wds-model"))


@pytest.fixture(scope="module")
def loaded(model_dir: Path) -> blip_core.LoadedModel:
    return blip_core.load(model_dir)


@pytest.fixture(scope="module")
def both_formats(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two shards of the same samples in img2dataset's parquet and webdataset formats."""
    root = tmp_path_factory.mktemp("wds-in")
    for index, rows in enumerate([samples(0, 5, failed=(1,), garbage=(3,)), samples(5, 4)]):
        write_parquet_format(root / "parquet", index, rows)
        write_webdataset_format(root / "wds", index, rows)
    return {"parquet": root / "parquet", "wds": root / "wds"}


def _outputs(folder: Path, outcomes: tuple[str, ...] = OUTCOMES) -> dict[str, list[dict]]:
    """outcome -> rows of every shard, by shard name."""
    return {o: [r for p in list_shards(folder / o) for r in read_table(p, "scored").to_pylist()] for o in outcomes}


def test_caption_and_filter_give_the_same_outputs_for_both_formats(tmp_path: Path, loaded, both_formats) -> None:
    results = {}
    for fmt, folder in both_formats.items():
        captions = run_caption([folder], tmp_path / fmt / "caption", loaded, CaptionConfig(execution=EXEC))
        scored = run_filter([folder], tmp_path / fmt / "filter", loaded, FilterConfig(execution=EXEC), caption_dir=captions.output)
        syn = [read_table(p, "pairs").to_pylist() for p in list_shards(captions.output)]
        results[fmt] = (captions.totals, syn, scored.totals, _outputs(scored.output))
    assert results["wds"] == results["parquet"]
    caption_totals, _, filter_totals, outputs = results["wds"]
    assert caption_totals["input"] == 9 and caption_totals["failed"] == 2  # one 404, one HTML page
    assert filter_totals["web_input"] == 9 and filter_totals["failed"] == 2
    kinds = sorted(failure_kind(r["error"]) for r in outputs["failed"])
    assert kinds == ["failed_to_download", "undecodable"]


def test_assemble_takes_a_webdataset_folder_as_a_pairs_input(tmp_path: Path, both_formats) -> None:
    from tasks.assemble import AssembleConfig, run_assemble

    cfg = AssembleConfig(rows_per_shard=4, execution=EXEC)
    made = {fmt: run_assemble([folder], tmp_path / fmt, cfg) for fmt, folder in both_formats.items()}
    rows = {fmt: [r for p in list_shards(s.output) for r in read_table(p, "dataset").to_pylist()] for fmt, s in made.items()}
    assert rows["wds"] == rows["parquet"] and made["wds"].totals == made["parquet"].totals
    assert made["wds"].settings_hash != made["parquet"].settings_hash  # other input bytes, another folder
    assert made["wds"].totals["input"] == 9


def _cli_filter(inputs: list[str], out: Path, model: Path) -> dict:
    args = ["filter", "--input", *inputs, "--output", str(out), "--model", str(model),
            "--batch-size", "3", "--workers", "0", "--no-progress"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return json.loads(result.output[result.output.index("{") :])


def test_cli_filter_on_a_damaged_webdataset_folder_accounts_for_every_key(tmp_path: Path, model_dir: Path) -> None:
    folder = tmp_path / "wds"
    rows = samples(0, 6)
    tar = write_webdataset_format(folder, 0, rows)
    tar.write_bytes(tar.read_bytes()[:9000])  # cut inside the second sample
    stray = Sample(key="000000099", caption="listed, never written", data=jpeg(99))
    write_webdataset_format(folder, 1, samples(10, 3), sidecar_rows=samples(10, 2) + [stray])
    summary = _cli_filter([str(folder)], tmp_path / "out", model_dir)
    assert summary["shards"] == 2 and summary["skipped"] == 0
    totals = summary["totals"]
    assert totals["input"] == totals["kept"] + totals["rejected"] + totals["failed"] == 6 + 4
    failed = {r["key"]: r["error"] for r in _outputs(Path(summary["output"]), ("failed",))["failed"]}
    assert failure_kind(failed.pop("000000099")) == "missing_from_tar"
    assert failure_kind(failed.pop("000000012")) == "not_in_sidecar"
    assert sorted(failed) == [f"{i:09d}" for i in range(1, 6)]
    assert all(failure_kind(e) == "truncated_tar" and "00000.tar stops at byte 9000" in e for e in failed.values())
    again = _cli_filter([str(folder / "*.tar")], tmp_path / "out", model_dir)
    assert again["skipped"] == 2 and again["totals"] == totals  # the rerun is the resume


# ------------------------------------------------------------- real img2dataset output


@pytest.fixture(scope="module")
def img2dataset_both(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """img2dataset itself, from a local HTTP server, writing the same URL list in both
    formats (2 shards; a 404 and an HTML page among the URLs; our key carried as capfilt_key)."""
    from data.ingest_web import KEY_COLUMN, WebIngestConfig, img2dataset_args, run_img2dataset, serve_folder

    root = tmp_path_factory.mktemp("i2d")
    www = root / "www"
    www.mkdir()
    for i in range(7):
        (www / f"{i}.jpg").write_bytes(jpeg(i, size=40))
    (www / "page.jpg").write_bytes(b"<html>not an image</html>")
    names = [f"{i}.jpg" for i in range(4)] + ["missing.jpg", "page.jpg"] + [f"{i}.jpg" for i in range(4, 7)]
    cfg = WebIngestConfig(rows_per_shard=5, processes=1, threads=4, timeout_s=5)
    out = {}
    with serve_folder(www) as base:
        urls = pa.table({KEY_COLUMN: [f"web-{i:03d}" for i in range(len(names))], "url": [f"{base}/{n}" for n in names],
                         "caption": [f"a photo {i}" for i in range(len(names))]})  # fmt: skip
        pq.write_table(urls, root / "urls.parquet")
        for fmt in ("parquet", "webdataset"):
            args = img2dataset_args(root / "urls.parquet", root / fmt, cfg, "incremental")
            args["output_format"] = fmt
            run_img2dataset(args, root / f"{fmt}.log", timeout_s=300)
            out[fmt] = root / fmt
    return out


def _by_key(outputs: dict[str, list[dict]]) -> dict[str, list[dict]]:
    return {o: sorted(rows, key=lambda r: r["key"]) for o, rows in outputs.items()}


@pytest.mark.slow
def test_real_img2dataset_webdataset_output_matches_its_parquet_output(loaded, model_dir: Path, img2dataset_both, tmp_path: Path) -> None:
    wds_folder, parquet_folder = img2dataset_both["webdataset"], img2dataset_both["parquet"]
    assert sorted(p.name for p in wds_folder.glob("*.tar")) == ["00000.tar", "00001.tar"]
    assert "jpg" not in pq.read_schema(wds_folder / "00000.parquet").names  # a real sidecar: no bytes
    ours = run_filter([parquet_folder], tmp_path / "parquet", loaded, FilterConfig(execution=EXEC))
    summary = _cli_filter([str(wds_folder)], tmp_path / "wds", model_dir)
    assert summary["totals"] == ours.totals
    # img2dataset writes rows as their downloads finish, so the two runs' row orders differ,
    # and so do the filter's batches: scores agree to float32 noise, everything else exactly
    theirs, mine = _by_key(_outputs(Path(summary["output"]))), _by_key(_outputs(ours.output))
    assert {o: [{**r, "itm_score": None} for r in rows] for o, rows in theirs.items()} == {
        o: [{**r, "itm_score": None} for r in rows] for o, rows in mine.items()
    }
    pairs = [(a["itm_score"], b["itm_score"]) for o in OUTCOMES for a, b in zip(theirs[o], mine[o])]
    assert all((a is None) == (b is None) and (a is None or abs(a - b) < 1e-5) for a, b in pairs)
    failed = {r["key"]: failure_kind(r["error"]) for r in _outputs(ours.output, ("failed",))["failed"]}
    assert failed == {"web-004": "failed_to_download", "web-005": "undecodable"}
    assert summary["totals"]["web_input"] == 9
