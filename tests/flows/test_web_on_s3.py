"""The flow with its web shards and models on S3 (a real moto server on 127.0.0.1) and its
run folder on local disk: caption + filter write what the stages write from local copies."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _upload(local: Path, target) -> None:
    for path in sorted(local.rglob("*")):
        if path.is_file():
            (target / path.relative_to(local).as_posix()).upload(path)


def test_flow_reads_web_shards_and_models_from_s3(s3: str, tmp_path: Path, prefect_harness, random_tiny_model, monkeypatch) -> None:
    from data.shards import list_shards
    from data.storage import location
    from data.synth import SynthConfig, generate_world
    from flows.bootstrap import bootstrap
    from flows.config import load_config
    from tasks.caption import CaptionConfig, run_caption
    from tasks.execution import ExecutionConfig
    from tasks.filter import FilterConfig, run_filter

    monkeypatch.setenv("CAPFILT_MODEL_CACHE", str(tmp_path / "cache"))
    generate_world(tmp_path / "world", SynthConfig(human_images=8, web_images=40, test_images=4, rows_per_shard=20))
    bucket = location(s3)
    _upload(tmp_path / "world" / "web", bucket / "web")
    _upload(random_tiny_model, bucket / "model")
    cfg = load_config({
        "run_dir": str(tmp_path / "run"), "data": {"web": [f"{s3}/web"]},
        "model": {"filter": f"{s3}/model", "captioner": f"{s3}/model"}, "stages": {"stop_after": "filter"},
    })  # fmt: skip
    summary = bootstrap(config=cfg)
    stages = {r["stage"]: r for r in summary["stages"]}
    assert stages["caption"]["shards"] == 2 and stages["caption"]["input"] == 40

    # the same stages on the local copies, outside the flow
    execution = ExecutionConfig(device="cpu", num_workers=0, progress=False)
    web = tmp_path / "world" / "web"
    cap = run_caption([web], tmp_path / "ref" / "caption", random_tiny_model, CaptionConfig(execution=execution))
    filt = run_filter([web], tmp_path / "ref" / "filter", random_tiny_model, FilterConfig(execution=execution), caption_dir=cap.output)
    assert Path(summary["caption_dir"]).name == cap.output.name and Path(summary["filter_dir"]).name == filt.output.name
    for ours, ref in ((Path(summary["caption_dir"]), cap.output), (Path(summary["filter_dir"]) / "kept", filt.output / "kept")):
        assert [p.read_bytes() for p in list_shards(ours)] == [p.read_bytes() for p in list_shards(ref)] != []
