"""RunConfig: presets, YAML, and errors that name the field and the allowed values."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.config import STAGES, ConfigError, RunConfig, load_config, load_yaml, preset


def test_presets_validate_and_differ() -> None:
    quick, demo, gpu = preset("demo-quick"), preset("demo"), preset("gpu")
    assert quick.data.world is not None and demo.data.world is not None
    assert quick.data.world.n_web < demo.data.world.n_web
    assert quick.train.pretrain.steps < demo.train.pretrain.steps
    assert gpu.device == "cuda" and gpu.runner.kind == "dask" and gpu.model.preset == "base"
    assert quick.run_dir == "runs/demo-quick" and demo.run_dir == "runs/demo"


def test_preset_fills_only_unset_fields() -> None:
    cfg = load_config({"preset": "demo-quick", "run_dir": "x", "train": {"pretrain": {"steps": 7}}})
    assert cfg.run_dir == "x"
    assert cfg.train.pretrain.steps == 7
    assert cfg.train.pretrain.batch_size == preset("demo-quick").train.pretrain.batch_size


def test_bad_choice_names_field_and_allowed_values() -> None:
    with pytest.raises(ConfigError) as err:
        load_config({"preset": "demo", "runner": {"kind": "ray"}, "caption": {"strategy": "topk"}})
    text = str(err.value)
    assert "runner.kind" in text and "'threads' or 'dask'" in text
    assert "caption.strategy" in text and "'nucleus', 'beam' or 'greedy'" in text


def test_unknown_field_and_bad_preset_are_named() -> None:
    with pytest.raises(ConfigError, match=r"filter\.treshold: unknown field"):
        load_config({"preset": "demo", "filter": {"treshold": 0.4}})
    with pytest.raises(ConfigError, match=r"preset: Input should be 'demo', 'demo-quick' or 'gpu'"):
        load_config({"preset": "fast"})
    with pytest.raises(ConfigError, match=r"stages.stop_after"):
        load_config({"preset": "demo", "stages": {"stop_after": "deploy"}})


def test_missing_inputs_are_explained() -> None:
    with pytest.raises(ConfigError, match="data.human"):
        load_config({"data": {"web": ["shards/"]}})
    # caption + filter only, on someone's img2dataset shards with released checkpoints: fine
    cfg = load_config({"data": {"web": ["shards/"]}, "model": {"pretrained": "p", "filter": "f", "captioner": "c"},
                       "stages": {"stop_after": "filter"}})
    assert cfg.runs_stage("filter") and not cfg.runs_stage("assemble") and not cfg.needs_pretrain()
    released = load_config({"data": {"web": ["shards/"]}, "model": {"filter": "f", "captioner": "c"},
                            "stages": {"stop_after": "assemble"}})  # fmt: skip
    assert not released.needs_pretrain() and not released.needs_finetune()
    assert load_config({"preset": "demo"}).needs_pretrain()
    with pytest.raises(ConfigError, match="data.human"):  # the final pretrain needs human pairs
        load_config({"data": {"web": ["shards/"]}, "model": {"filter": "f", "captioner": "c"}})


def test_yaml_roundtrip(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("preset: demo-quick\nrun_dir: runs/x\nfilter:\n  threshold: 0.7\n")
    cfg = load_yaml(path)
    assert cfg.filter.threshold == 0.7 and cfg.run_dir == "runs/x"
    assert RunConfig.model_validate(cfg.model_dump()) == cfg
    path.write_text("filter: [1, 2\n")
    with pytest.raises(ConfigError, match="run.yaml"):
        load_yaml(path)


def test_stage_order() -> None:
    assert STAGES[0] == "ingest" and STAGES[-1] == "evaluate"
    cfg = load_config({"preset": "demo-quick", "stages": {"stop_after": "assemble"}})
    assert cfg.runs_stage("assemble") and not cfg.runs_stage("final")


def test_shipped_yaml_configs_validate() -> None:
    root = Path(__file__).resolve().parents[2] / "presets"
    files = sorted(root.glob("*.yaml"))
    assert files
    for path in files:
        assert load_yaml(path).run_dir


def test_every_stage_setting_is_reachable_from_yaml_and_set(tmp_path: Path) -> None:
    from tasks.caption import CaptionConfig
    from tasks.filter import FilterConfig

    path = tmp_path / "run.yaml"
    path.write_text("preset: demo-quick\ncaption:\n  top_k: 50\n  prompt: 'an image of '\nfilter:\n  max_text_tokens: 30\n")
    cfg = load_yaml(path, sets=["filter.threshold=0.3", "caption.execution.batch_size=7", "filter.top_k=null"])
    assert isinstance(cfg.caption, CaptionConfig) and isinstance(cfg.filter, FilterConfig)  # the stages' own classes
    assert (cfg.caption.top_k, cfg.caption.prompt, cfg.filter.max_text_tokens) == (50, "an image of ", 30)
    assert cfg.filter.threshold == 0.3 and cfg.filter.top_k is None and cfg.caption.execution.batch_size == 7
    assert cfg.caption.execution.num_workers == -1  # untouched fields keep the stage's defaults
    with pytest.raises(ConfigError, match=r"caption\.execution\.batchsize: unknown field"):
        load_yaml(path, sets=["caption.execution.batchsize=7"])
    with pytest.raises(ConfigError, match=r"filter: threshold must be in \[0, 1\], got 3"):
        load_yaml(path, sets=["filter.threshold=3"])
    with pytest.raises(ConfigError, match=r"--set 'filter.threshold': write FIELD=VALUE"):
        load_yaml(path, sets=["filter.threshold"])


def test_the_filter_itm_first_token_is_a_run_config_setting() -> None:
    assert load_config({"preset": "demo-quick"}).filter.itm_first_token == "enc"  # BLIP's convention
    assert load_config({"preset": "demo-quick", "filter": {"itm_first_token": "cls"}}).filter.itm_first_token == "cls"
    with pytest.raises(ConfigError, match=r"filter\.itm_first_token.*'enc'.*'cls'"):
        load_config({"preset": "demo-quick", "filter": {"itm_first_token": "sep"}})


def test_a_stage_block_follows_the_run_device_unless_it_names_its_own() -> None:
    from flows.steps import stage_config

    cfg = load_config({"preset": "demo-quick", "loader_workers": 3, "filter": {"execution": {"device": "cpu"}}})
    caption = stage_config(cfg, cfg.caption)
    assert (caption.execution.device, caption.execution.num_workers, caption.execution.progress) == ("cpu", 3, True)
    assert caption.execution.batch_size == 128 and caption.top_p == cfg.caption.top_p
    assert stage_config(cfg, cfg.filter).execution.device == "cpu"
    quiet = load_config({"preset": "demo-quick", "caption": {"execution": {"progress": False}}})
    assert stage_config(quiet, quiet.caption).execution.progress is False  # a block may turn its progress off
