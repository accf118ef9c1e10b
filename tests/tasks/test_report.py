"""The run report from a small fabricated run folder (real shards, real records, real plots)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pytest
from PIL import Image

from data.shards import CompletionRecord, shard_name, write_completion, write_shard
from tasks.report import artifact_markdown, write_report
from tasks.report.read import read_training_metrics, stage_accounting
from tasks.report.render import Heading, Table, to_html, to_markdown


def _png(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(buf, format="PNG")
    return buf.getvalue()


def _pairs(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(
        rows,
        schema=pa.schema(
            [("key", pa.string()), ("image_id", pa.string()), ("source", pa.string()), ("caption", pa.string()),
             ("jpg", pa.binary()), ("status", pa.string())]
        ),
    )


def _scored(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(
        rows,
        schema=pa.schema(
            [("key", pa.string()), ("image_id", pa.string()), ("source", pa.string()), ("caption", pa.string()),
             ("jpg", pa.binary()), ("status", pa.string()), ("itm_score", pa.float32()), ("keep", pa.bool_()),
             ("reject_reason", pa.string()), ("threshold", pa.float32())]
        ),
    )


def _record(path: Path, kind: str, counts: dict[str, int], seconds: float) -> None:
    write_completion(path, CompletionRecord(shard=path.name, kind=kind, counts=counts, input_fingerprint="f",
                                            settings_hash="h", extra={"seconds": seconds}))


@pytest.fixture()
def run_dir(tmp_path: Path) -> Path:
    run = tmp_path / "myrun"
    img = _png((200, 30, 30))
    human = run / "ingest" / "human" / shard_name(0)
    write_shard(_pairs([{"key": f"h{i}", "image_id": f"h{i}", "source": "human", "caption": "a red circle left",
                         "jpg": img, "status": "ok"} for i in range(3)]), human, "pairs")
    _record(human, "pairs", {"input": 3, "ok": 3, "failed": 0}, 1.0)
    web_rows, syn_rows, kept, rejected = [], [], [], []
    for shard in range(2):
        web = run / "ingest" / "web" / shard_name(shard)
        rows = [{"key": f"w{shard}{i}", "image_id": f"i{shard}{i}", "source": "web",
                 "caption": "click here" if i % 2 else "a red shape", "jpg": img, "status": "ok"} for i in range(4)]
        write_shard(_pairs(rows), web, "pairs")
        _record(web, "pairs", {"input": 4, "ok": 4, "failed": 0}, 2.0)
        web_rows += rows
        syn = [{**r, "key": "s" + r["key"], "source": "synthetic", "caption": "a red circle on the left"} for r in rows]
        cap = run / "caption" / "abc123" / shard_name(shard)
        write_shard(_pairs(syn), cap, "pairs")
        _record(cap, "pairs", {"input": 4, "generated": 4, "failed": 0}, 4.0)
        k, r_ = [], []
        for row in rows + syn:
            good = row["source"] == "synthetic" or row["caption"] != "click here"
            scored = {**row, "itm_score": 0.9 if good else 0.1, "keep": good,
                      "reject_reason": None if good else "itm_below_threshold", "threshold": 0.5}
            (k if good else r_).append(scored)
        for part, rows_ in (("kept", k), ("rejected", r_)):
            p = run / "filter" / "def456" / part / shard_name(shard)
            write_shard(_scored(rows_), p, "scored")
        _record(run / "filter" / "def456" / "kept" / shard_name(shard), "scored",
                {"input": 8, "kept": len(k), "rejected": len(r_), "failed": 0}, 0.5)
    metrics = run / "models" / "pretrain" / "metrics.jsonl"
    metrics.parent.mkdir(parents=True)
    lines = [json.dumps({"step": s, "loss": 3.0 / (s + 1), "loss_itc": 1.0 / (s + 1)}) for s in range(5)]
    metrics.write_text("\n".join(lines) + "\n{\"step\": 5, \"lo")  # torn last line
    (run / "eval").mkdir()
    (run / "eval" / "metrics.json").write_text(json.dumps(
        {"model_dir": "models/final", "retrieval": {"TR@1": 55.5, "IR@1": 44.4}, "captioning": {"BLEU-4": 12.3}}))
    return run


def test_stage_accounting_sums_records(run_dir: Path) -> None:
    acc = {a.stage: a for a in stage_accounting(run_dir)}
    assert set(acc) == {"ingest/human", "ingest/web", "caption", "filter"}
    assert acc["ingest/web"].shards == 2 and acc["ingest/web"].counts["input"] == 8
    assert acc["filter"].counts == {"input": 16, "kept": 12, "rejected": 4, "failed": 0}
    assert acc["caption"].seconds == pytest.approx(8.0)


def test_stage_times_from_jsonl(run_dir: Path) -> None:
    (run_dir / "stages.jsonl").write_text('{"stage": "pretrain", "seconds": 12.5}\n{"stage": "filter", "seco')
    md = write_report(run_dir).read_text()
    assert "| pretrain | 12.5 |  |  |" in md


def test_training_metrics_skip_torn_line(run_dir: Path) -> None:
    runs = read_training_metrics(run_dir)
    assert list(runs) == ["pretrain"] and len(runs["pretrain"]) == 5


def test_write_report_has_every_section_and_plots(run_dir: Path) -> None:
    md_path = write_report(run_dir)
    md = md_path.read_text()
    for section in ("Stage by stage accounting", "Time and throughput", "Training", "Filter",
                    "Rejected by reason", "Keep rate per shard", "Caption lengths", "Examples", "Evaluation"):
        assert f"## {section}" in md or f"### {section}" in md, section
    assert "| filter | 2 | 16 | 12 | 4 | 0 |" in md  # shards, input, kept, rejected, failed
    assert "| caption | 2 | 8 |  |  | 0 | generated 8 |" in md
    assert "| web | itm_below_threshold | 4 |" in md
    assert "| TR@1 | 55.5 |" in md
    assert "| caption | 8.000 | 8 | 1.000 |" in md  # 8 rows in 8 s
    for png in ("report-loss.png", "report-itm-hist.png", "report-keep-rate.png",
                "report-caption-length.png", "report-examples.png"):
        assert f"]({png})" in md
        with Image.open(run_dir / png) as im:
            assert im.size[0] > 200 and im.size[1] > 100
    html_text = (run_dir / "report.html").read_text()
    assert "<table>" in html_text and 'src="report-examples.png"' in html_text
    # rerun is safe and leaves no temporary files
    write_report(run_dir)
    assert not list(run_dir.glob("*.tmp*"))


def test_report_on_an_empty_run_says_what_is_missing(tmp_path: Path) -> None:
    md = write_report(tmp_path).read_text()
    assert "No completion records yet." in md and "No evaluation yet" in md


def test_artifact_markdown_links_files(run_dir: Path) -> None:
    text = artifact_markdown(run_dir)
    assert "file://" in text and "report-itm-hist.png" in text


def test_renderers_escape() -> None:
    blocks = [Heading("a<b"), Table(["x"], [["p|q"], [float("nan")]])]
    assert "p\\|q" in to_markdown(blocks) and "n/a" in to_markdown(blocks)
    assert "a&lt;b" in to_html(blocks, "t")


def test_video_section_puts_video_r1_beside_image_r1(tmp_path: Path) -> None:
    from tasks.report.render import to_markdown
    from tasks.report.sections import report_blocks

    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "metrics.json").write_text(json.dumps({"retrieval": {"TR@1": 11.0, "IR@1": 12.5}}))
    model = {"n_videos": 40, "frames": 8, "retrieval": {"t2v_R@1": 7.5, "t2v_R@5": 20.0, "t2v_R@10": 30.0,
                                                         "v2t_R@1": 5.0}, "captioning": {"CIDEr": 40.0}}  # fmt: skip
    (tmp_path / "eval" / "video.json").write_text(json.dumps({"models": {"final": model, "pretrain": model}}))
    md = to_markdown(report_blocks(tmp_path))
    section = md[md.index("## Zero-shot video"):]
    assert "| final | 40 | 8 | 7.500 | 20.0 | 30.0 | 5.000 | 12.5 | 11.0 |" in section
    assert "| pretrain | 40 | 8 | 7.500 |" in section
    assert "Zero-shot video" not in to_markdown(report_blocks(tmp_path / "eval"))  # no video.json: no section


def _truth(run: Path, web_keys: dict[str, str]) -> None:
    """A synthetic world's truth files: no scenes, each web key's caption kind."""
    import pyarrow.parquet as pq

    (run / "truth").mkdir()
    pq.write_table(pa.table({"image_id": pa.array([], pa.string()), "scene": pa.array([], pa.string())}),
                   run / "truth" / "scenes.parquet")  # fmt: skip
    pq.write_table(pa.table({"key": list(web_keys), "kind": list(web_keys.values())}), run / "truth" / "web_captions.parquet")


def test_keep_rate_against_threshold_with_noise_truth(run_dir: Path) -> None:
    import numpy as np

    from tasks.report.read import read_scored
    from tasks.report.sections import threshold_sweep

    # web "click here" rows (odd i, ITM 0.1) are junk; the rest (0.9) correct; synthetic all 0.9
    _truth(run_dir, {f"w{s}{i}": "junk" if i % 2 else "correct" for s in range(2) for i in range(4)})
    asm = run_dir / "assemble" / "a1b2c3"
    asm.mkdir(parents=True)
    (asm / "stage.json").write_text(json.dumps({"settings_hash": "a1b2c3", "settings": {"stage": "assemble", "threshold": 0.3}}))
    md = write_report(run_dir).read_text()
    assert "## Keep rate against threshold" in md and "](report-threshold.png)" in md
    with Image.open(run_dir / "report-threshold.png") as im:
        assert im.size[0] > 400 and im.size[1] > 100  # two panels
    header = "| threshold | synthetic keep rate | web keep rate | synthetic kept | web kept | noise precision | noise recall |"
    assert header in md
    assert "| 0.100 | 1.000 | 1.000 | 8 | 8 | n/a | 0.000 |" in md  # nothing rejected yet
    assert "| 0.300 | 1.000 | 0.500 | 8 | 4 | 1.000 | 1.000 |" in md  # the four junk rows, only they
    assert "| 0.900 | 1.000 | 0.500 | 8 | 4 | 1.000 | 1.000 |" in md  # 0.9 reaches 0.9
    assert "thresholds in use: filter 0.50, assemble 0.30" in md
    assert "RUN/filter/def456/kept RUN/filter/def456/rejected" in md
    sweep = threshold_sweep(read_scored(run_dir / "filter" / "def456"), np.array([0.0, 0.95]), None)
    assert {k: v.tolist() for k, v in sweep.kept.items()} == {"synthetic": [8, 0], "web": [8, 0]}
    assert sweep.precision is None and sweep.rows == {"synthetic": 8, "web": 8}
    png = (run_dir / "report-threshold.png").read_bytes()
    assert write_report(run_dir).read_text() == md and (run_dir / "report-threshold.png").read_bytes() == png  # deterministic


def test_keep_rate_against_threshold_without_truth(run_dir: Path) -> None:
    md = write_report(run_dir).read_text()
    assert "| threshold | synthetic keep rate | web keep rate | synthetic kept | web kept |\n" in md
    assert "| 0.500 | 1.000 | 0.500 | 8 | 4 |" in md and "noise precision" not in md
