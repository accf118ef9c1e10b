"""Caption, filter and assemble with the run folder, the inputs and the model on S3 (a real
moto server on 127.0.0.1): the same bytes as a local run; a shard left without its
completion record (a killed write) is redone to the same bytes; no secret lands in the run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from stage_helpers import tiny_model, web_shards

from data.layout import RunLayout
from data.shards import list_shards, read_completion
from data.storage import RemotePath, location
from tasks.assemble import AssembleConfig, run_assemble
from tasks.caption import CaptionConfig, run_caption
from tasks.execution import ExecutionConfig
from tasks.filter import FilterConfig, run_filter
from tasks.model_store import publish_model

EXEC = ExecutionConfig(batch_size=4, num_workers=0, progress=False)


def _upload_folder(local: Path, target: RemotePath) -> None:
    for path in sorted(local.rglob("*")):
        if path.is_file():
            (target / path.relative_to(local).as_posix()).upload(path)


def _run_stages(root, web, model, tmp: Path) -> dict[str, object]:
    """caption -> filter -> assemble into the run folder `root`; the three settings folders."""
    layout = RunLayout(root)
    caption = run_caption([web], layout.stage("caption"), model, CaptionConfig(execution=EXEC))
    filtered = run_filter([web], layout.stage("filter"), model, FilterConfig(execution=EXEC), caption_dir=caption.output)
    kept = [filtered.output / "kept"]
    assembled = run_assemble(kept, layout.stage("assemble"), AssembleConfig(rows_per_shard=4, execution=EXEC))
    for stats in (caption, filtered, assembled):
        layout.mark_current(stats.stage, stats.output)
    return {"caption": caption, "filter": filtered, "assemble": assembled}


def _shard_bytes(folder) -> dict[str, bytes]:
    """Relative name -> bytes of every data shard below a settings folder."""
    folder = location(folder)
    found = {}
    for sub in ("", "kept", "rejected", "failed"):
        here = folder / sub if sub else folder
        for shard in list_shards(here):
            found[f"{sub}/{shard.name}"] = shard.read_bytes()
    return found


@pytest.fixture(scope="module")
def local_world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("s3-world")
    web = base / "web"
    web_shards(web, (5, 4, 3), failed=(1,), garbage=(2,))
    return {"web": web, "model": tiny_model(base / "model")}


def _s3_inputs(s3: str, world: dict[str, Path]) -> tuple[RemotePath, RemotePath]:
    bucket = location(s3)
    _upload_folder(world["web"], bucket / "inputs/web")
    _upload_folder(world["model"], bucket / "models/tiny")
    return bucket / "inputs/web", bucket / "models/tiny"


@pytest.fixture(scope="module")
def runs(s3_module: str, local_world: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The three stages run once into a local run folder and once into ``s3://<bucket>/run``
    (inputs and model uploaded to the bucket; the model staged through a fresh local cache)."""
    base = tmp_path_factory.mktemp("s3-runs")
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("CAPFILT_MODEL_CACHE", str(base / "model-cache"))
        local = _run_stages(base / "run", local_world["web"], local_world["model"], base)
        web, model = _s3_inputs(s3_module, local_world)
        remote = _run_stages(f"{s3_module}/run", web, model, base)
    return {"s3": s3_module, "local": local, "remote": remote, "web": web, "model": model, "base": base}


def test_stages_on_s3_equal_a_local_run(runs: dict) -> None:
    local, remote, s3 = runs["local"], runs["remote"], runs["s3"]
    for stage in ("caption", "filter", "assemble"):
        assert remote[stage].settings_hash == local[stage].settings_hash, stage
        assert isinstance(remote[stage].output, RemotePath)
        ours, theirs = _shard_bytes(remote[stage].output), _shard_bytes(local[stage].output)
        assert ours == theirs and ours, stage
        assert remote[stage].totals == local[stage].totals
    # the record of current outputs is written (relative paths) and read back on S3
    layout = RunLayout(f"{s3}/run")
    assert layout.current_stage("filter") == remote["filter"].output
    assert RunLayout(runs["base"] / "run").read_current() == layout.read_current()
    # the model was staged through the local cache, not read from a shared disk
    assert any((runs["base"] / "model-cache").iterdir())


def test_unrecorded_shard_on_s3_is_redone_to_the_same_bytes(runs: dict) -> None:
    folder = runs["remote"]["caption"].output
    before = _shard_bytes(folder)
    victim = folder / "part-00001.parquet"
    # a write killed after the data and before its record; and one killed mid-upload (no object)
    (folder / "part-00001.done.json").unlink()
    (folder / "part-00002.parquet").unlink()
    (folder / "part-00002.done.json").unlink()
    again = run_caption([runs["web"]], RunLayout(f"{runs['s3']}/run").stage("caption"), runs["model"], CaptionConfig(execution=EXEC))
    assert [s.skipped for s in again.shards] == [True, False, False]
    assert _shard_bytes(folder) == before
    assert read_completion(victim) is not None


def test_no_secret_in_the_run_folder(runs: dict, s3_secret: str) -> None:
    run = location(runs["s3"]) / "run"
    texts = [p.read_bytes() for p in run.glob("**/*") if p.name.endswith((".json", ".md", ".html", ".jsonl"))]
    assert len(texts) > 10 and not any(s3_secret.encode() in t for t in texts)


def test_publish_model_uploads_config_last(runs: dict, local_world: dict[str, Path]) -> None:
    target = publish_model(local_world["model"], f"{runs['s3']}/models/final")
    names = sorted(p.name for p in location(target).iterdir())
    assert "config.json" in names and names == sorted(p.name for p in local_world["model"].iterdir() if p.is_file())


def test_capfilt_query_answers_over_s3(runs: dict) -> None:
    from typer.testing import CliRunner

    from flows.cli import app

    local = runs["local"]
    sql = ("SELECT (SELECT count(*) FROM dataset) AS d, (SELECT count(*) FROM scored) AS s, "
           "(SELECT count(*) FROM synthetic) AS c, (SELECT sum(counts['input']) FROM stage_stats WHERE stage = 'filter') AS i")  # fmt: skip
    answers = {}
    for run in (str(runs["base"] / "run"), f"{runs['s3']}/run"):
        result = CliRunner().invoke(app, ["query", run, sql, "--format", "json"])
        assert result.exit_code == 0, result.output
        answers[run] = result.output
    remote = answers[f"{runs['s3']}/run"]
    assert remote == answers[str(runs["base"] / "run")]
    row = json.loads(remote.splitlines()[0])
    assert row["d"] == local["assemble"].totals["kept"] > 0
    assert int(row["i"]) == local["filter"].totals["input"] > 0


def test_storage_options_from_the_run_config_keep_the_secret_out(s3: str, s3_secret: str, monkeypatch, tmp_path: Path) -> None:
    """Credentials given as ${VAR} references in `storage.options` reach s3fs (the AWS key
    variables are unset), and neither the config's dump nor the written files hold them."""
    from data.storage import configure
    from flows.config import ConfigError, load_config

    monkeypatch.setenv("MY_S3_KEY", "capfilt-test-key")
    monkeypatch.setenv("MY_S3_SECRET", s3_secret)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    values = {"preset": "demo-quick", "run_dir": str(tmp_path / "run"), "data": {"web": [f"{s3}/web"]},
              "storage": {"options": {"s3": {"key": "${MY_S3_KEY}", "secret": "${MY_S3_SECRET}"}}}}  # fmt: skip
    cfg = load_config(values)
    assert s3_secret not in cfg.model_dump_json() and s3_secret not in repr(cfg)
    with pytest.raises(ConfigError, match=r"storage.options.s3.secret: give a secret as an environment reference"):
        load_config({**values, "storage": {"options": {"s3": {"secret": s3_secret}}}})
    try:
        cfg.apply_storage()
        target = location(f"{s3}/probe/x.json")
        assert target.options["secret"] == s3_secret
        target.write_text("{}")
        assert s3_secret not in repr(target) and s3_secret not in str(target)
        assert target.read_text() == "{}"
    finally:
        configure({})


def test_inputs_by_url_glob_and_a_missing_prefix_named(runs: dict) -> None:
    from data.inputs import expand_inputs

    s3 = runs["s3"]
    assert [p.name for p in expand_inputs([f"{s3}/inputs/web/part-0000[01].parquet"])] == ["part-00000.parquet", "part-00001.parquet"]
    assert len(expand_inputs([f"{s3}/inputs/web"])) == 3
    with pytest.raises(FileNotFoundError, match=rf"input {s3}/nothing-here: no Parquet or webdataset shards there"):
        expand_inputs([f"{s3}/nothing-here"])
