"""`capfilt run` with its run folder on S3 (a real moto server on 127.0.0.1): the whole
bootstrap, training included, from pair shards on S3; the same run on local disk answers
the same queries; a rerun from a fresh local working folder (another machine) retrains
and recomputes nothing; no secret in any object of the run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

_SQL = ("SELECT (SELECT count(*) FROM dataset) AS d, (SELECT count(*) FROM scored) AS s, "
        "(SELECT count(*) FROM synthetic) AS c, "
        "(SELECT sum(counts['input']) FROM stage_stats WHERE stage = 'filter') AS i")  # fmt: skip
_REWRITTEN = ("current.json", "stages.jsonl", "report.md", "report.html")  # every run writes these again


def _upload(local: Path, target) -> None:
    for path in sorted(local.rglob("*")):
        if path.is_file():
            (target / path.relative_to(local).as_posix()).upload(path)


def _config(run_dir: str, data: str, **extra):
    from flows.config import load_config

    stage = {"steps": 3, "batch_size": 8, "checkpoint_every": 2, "queue_size": 16}
    return load_config({
        "run_dir": run_dir, "device": "cpu", "loader_workers": 0,
        "data": {"human": [f"{data}/human"], "web": [f"{data}/web"], "test": [f"{data}/test"]},
        "model": {"preset": "tiny", "vocab_size": 128},
        "train": {"pretrain": stage, "finetune_filter": stage, "finetune_captioner": stage, "final": stage},
        "filter": {"threshold": 0.0},  # every web and synthetic caption kept: D' has all three sources
        "evaluate": {"max_images": 8}, "runner": {"max_workers": 2}, **extra,
    })  # fmt: skip


def _objects(run) -> dict[str, tuple[str, str]]:
    """Every object below the run URL: relative key -> (ETag, LastModified)."""
    found = run.fs.find(run.path, detail=True)
    base = run.path.rstrip("/") + "/"
    return {name[len(base):]: (str(info.get("ETag")), str(info.get("LastModified"))) for name, info in found.items()}


def _tables(folder) -> dict[str, dict[str, list]]:
    """Each shard below `folder` (by its path inside it) as columns of Python values."""
    import pyarrow.parquet as pq

    return {p.relative_to(folder).as_posix(): pq.read_table(p.open("rb")).to_pydict()
            for p in sorted(folder.rglob("part-*.parquet"))}  # fmt: skip


def _query(run: str, sql: str = _SQL) -> list[dict]:
    from typer.testing import CliRunner

    from flows.cli import app

    result = CliRunner().invoke(app, ["query", run, sql, "--format", "json"])
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.output.splitlines() if line.strip()]


def test_a_url_run_folder_refuses_the_demo_world_and_keeps_no_run_record(tmp_path: Path) -> None:
    """The demo world and img2dataset fetches are made on a local disk: a URL run folder
    names what to do instead, before anything is written; run.json is never read there."""
    from flows.bootstrap import bootstrap
    from flows.config import load_config
    from flows.run_record import finished_summary, forget_record, write_record

    for data, named in (({"world": {"n_human": 10, "n_web": 10, "n_test": 4}}, "data.world"),
                        ({"web_urls": str(tmp_path / "urls.parquet"), "human": [str(tmp_path)], "test": [str(tmp_path)]}, "data.web_urls")):  # fmt: skip
        cfg = load_config({"run_dir": "s3://no-such-bucket/run", "data": data})
        with pytest.raises(ValueError, match=rf"{named}.*data.human / data.web / data.test"):
            bootstrap.fn(config=cfg)  # the check comes before the lock: no server is asked
    cfg = _config("s3://no-such-bucket/run", str(tmp_path))
    assert finished_summary(cfg) is None
    forget_record(cfg), write_record(cfg, {"run_dir": cfg.run_dir})  # no request made: the bucket does not exist


@pytest.mark.slow
def test_bootstrap_on_an_s3_run_folder(s3: str, s3_secret: str, tmp_path: Path, prefect_harness, monkeypatch) -> None:
    from data.storage import location
    from data.synth import SynthConfig, generate_world
    from flows.bootstrap import WORK_DIR_ENV, bootstrap

    monkeypatch.setenv("CAPFILT_MODEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(WORK_DIR_ENV, str(tmp_path / "work-1"))
    monkeypatch.chdir(tmp_path)  # a URL taken for a relative path would show up here as ./s3:
    world = tmp_path / "world"
    generate_world(world, SynthConfig(human_images=24, web_images=40, test_images=8, rows_per_shard=20))
    bucket = location(s3)
    for split in ("human", "web", "test"):
        _upload(world / split, bucket / "inputs" / split)

    summary = bootstrap(config=_config(f"{s3}/run", f"{s3}/inputs"))
    run = bucket / "run"
    assert summary["final_model"].startswith(f"{s3}/run/models/final/") and summary["report"] == f"{s3}/run/report.md"
    objects = _objects(run)
    for role in ("pretrain", "filter", "captioner", "final"):
        published = [k for k in objects if k.startswith(f"models/{role}/") and k.endswith("/final/config.json")]
        assert len(published) == 1, (role, sorted(objects))
        assert any(k.startswith(f"models/{role}/") and k.endswith("model.safetensors") for k in objects)
    for stage in ("caption", "filter", "assemble"):
        shards = [k for k in objects if k.startswith(f"{stage}/") and k.endswith(".parquet")]
        assert shards and all(s.removesuffix(".parquet") + ".done.json" in objects for s in shards), stage
    for name in ("current.json", "stages.jsonl", "eval/metrics.json", "report.md", "report.html"):
        assert name in objects, name
    current = json.loads((run / "current.json").read_text())["current"]
    assert current["model/final"].startswith("models/final/") and current["caption"].startswith("caption/")
    report = (run / "report.md").read_text()
    for heading in ("## Training", "## Filter", "## Evaluation", "## Galleries"):  # read and written on S3
        assert heading in report, heading
    linked = re.findall(r"\]\(((?:report|gallery)-[^)]+\.(?:png|html))\)", report)
    assert any(n.endswith(".png") for n in linked) and any(n.endswith(".html") for n in linked)
    assert all(name in objects for name in linked), linked
    assert not (run / "run.json").exists()  # no fast-path record for a URL run folder
    for key in objects:  # the fixture's secret key never lands in the run
        assert s3_secret.encode() not in (run / key).read_bytes(), key

    # the same run on local disk from the same shards: the same models, the same answers
    local = bootstrap(config=_config(str(tmp_path / "local"), str(world)))
    assert Path(local["final_model"]).parent.name == location(summary["final_model"]).parent.name
    [remote_answer], [local_answer] = _query(f"{s3}/run"), _query(str(tmp_path / "local"))
    assert remote_answer == local_answer and remote_answer["d"] == 24 + 80 and int(remote_answer["i"]) == 80  # web + synthetic
    rows = "SELECT image_id, caption FROM dataset ORDER BY image_id, caption"
    assert _query(f"{s3}/run", rows) == _query(str(tmp_path / "local"), rows) != []

    # a rerun from a fresh working folder (another machine): nothing trained or recomputed
    monkeypatch.setenv(WORK_DIR_ENV, str(tmp_path / "work-2"))
    again = bootstrap(config=_config(f"{s3}/run", f"{s3}/inputs"))
    assert again["final_model"] == summary["final_model"]
    trained = [r for r in again["stages"] if r["stage"].startswith("train")]
    assert len(trained) == 4 and not (tmp_path / "work-2" / "models").exists()
    after = _objects(run)
    kept = {k: v for k, v in objects.items() if not k.startswith(_REWRITTEN) and not k.startswith(("report-", "gallery-", ".lock"))}
    assert {k: after.get(k) for k in kept} == kept

    # caption + filter on Dask worker processes, which load the published models from the URL
    dask = bootstrap(config=_config(f"{s3}/run-dask", f"{s3}/inputs", runner={"kind": "dask", "dask_workers": 2},
                                    stages={"stop_after": "filter"}))  # fmt: skip
    assert {r["stage"]: r for r in dask["stages"]}["filter"]["runner"] == "dask"
    for key in ("caption_dir", "filter_dir"):
        ours, ref = location(dask[key]), location(summary[key])
        assert ours.name == ref.name
        got, want = _tables(ours), _tables(ref)
        assert got.keys() == want.keys() and got != {}
        for name, table in got.items():  # ITM scores: fp32 noise between worker processes and threads (~1e-7)
            scores = table.pop("itm_score", None)
            assert scores == pytest.approx(want[name].pop("itm_score", None), abs=1e-5), name
            assert table == want[name], name
    from typer.testing import CliRunner

    from flows.cli import app

    result = CliRunner().invoke(app, ["report", f"{s3}/run"])
    assert result.exit_code == 0 and f"{s3}/run/report.md" in result.output, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "local", "work-1", "work-2", "world"]
