"""Hostile run configs through `capfilt run` (issue 23): each refused in one line at
validation, before Prefect starts, naming the field: a literal secret at any depth, a key
given twice, an unset ``${VAR}``; `--config` takes a preset's name; the shipped preset
runs on any machine (`device: auto`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from data.run_lock import run_lock
from flows.cli import app
from flows.config import load_yaml

SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"


def _run(tmp_path: Path, text: str, *extra: str) -> tuple[int, str]:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    result = CliRunner().invoke(app, ["run", "--config", str(path), *extra])
    return result.exit_code, result.stderr


def _refused(tmp_path: Path, text: str, *expected: str) -> str:
    code, stderr = _run(tmp_path, text)
    assert code == 1, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("capfilt run: error: "), stderr
    for part in expected:
        assert part in lines[0], lines[0]
    return lines[0]


# Valid but for what each test adds: caption + filter of web shards with given models, no training.
REST = "data:\n  web: [web]\nmodel:\n  captioner: m\n  filter: m\nstages:\n  stop_after: filter\n"
BASE = "run_dir: {run}\n" + REST


@pytest.mark.parametrize(("storage", "place"), [
    ({"s3": {"client_kwargs": {"aws_secret_access_key": SECRET}}}, "storage.options.s3.client_kwargs.aws_secret_access_key"),
    ({"s3": {"config_kwargs": {"proxies": [{"password": SECRET}]}}}, "storage.options.s3.config_kwargs.proxies[0].password"),
    ({"s3": {"client_kwargs": {"region_name": "AKIAIOSFODNN7EXAMPLE"}}}, "storage.options.s3.client_kwargs.region_name"),
    ({"s3": {"endpoint_url": f"http://admin:{SECRET.replace('/', '%2F')}@127.0.0.1:9000"}}, "storage.options.s3.endpoint_url"),
])  # fmt: skip
def test_a_literal_secret_at_any_depth_is_refused(tmp_path: Path, storage: dict, place: str) -> None:
    line = _refused(tmp_path, BASE.format(run=tmp_path / "r") + "storage:\n  options: " + json.dumps(storage) + "\n",
                    place)  # fmt: skip
    assert SECRET not in line and "AKIAIOSFODNN7EXAMPLE" not in line
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("url", [
    f"s3://AKIAIOSFODNN7EXAMPLE:{SECRET.replace('/', '')}@bucket/web",
    "https://bucket.s3.amazonaws.com/web/00000.parquet?X-Amz-Credential=x&X-Amz-Signature=0123abcd",
    "https://account.blob.core.windows.net/web/00000.parquet?sv=2024-01-01&sig=AbC%2Fdef",
])  # fmt: skip
def test_a_secret_in_another_field_is_refused(tmp_path: Path, url: str) -> None:
    line = _refused(tmp_path, f"run_dir: {tmp_path / 'r'}\ndata:\n  web: ['{url}']\n", "data.web[0]", "secret")
    assert "0123abcd" not in line and "AbC" not in line


def test_secret_references_are_kept_as_references(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAPFILT_TEST_SECRET_23", SECRET)
    path = tmp_path / "run.yaml"
    path.write_text(BASE.format(run=tmp_path / "r") + "storage:\n  options:\n    s3:\n      client_kwargs:\n"
                    "        aws_secret_access_key: ${CAPFILT_TEST_SECRET_23}\n")  # fmt: skip
    cfg = load_yaml(path)
    assert SECRET not in cfg.model_dump_json()  # what Prefect stores as the flow's parameter
    assert cfg.storage.resolved()["s3"]["client_kwargs"]["aws_secret_access_key"] == SECRET


@pytest.mark.parametrize(("text", "key", "lines"), [
    ("run_dir: {a}\nrun_dir: {b}\n" + REST, "'run_dir'", "lines 1 and 2"),
    ("run_dir: {a}\n" + REST + "filter:\n  threshold: 0.5\n  top_k: 2\n  threshold: 0.1\n", "'threshold'", "lines 10 and 12"),
])  # fmt: skip
def test_a_key_given_twice_is_refused_naming_it_and_its_lines(tmp_path: Path, text: str, key: str, lines: str) -> None:
    _refused(tmp_path, text.format(a=tmp_path / "a", b=tmp_path / "b"), key, "given twice", lines)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_an_unset_variable_in_run_dir_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CAPFILT_UNSET_23", raising=False)
    _refused(tmp_path, "run_dir: ${CAPFILT_UNSET_23}/run\n" + REST, "run_dir", "CAPFILT_UNSET_23 is not set")
    assert not any("$" in p.name for p in tmp_path.rglob("*"))


def test_a_set_variable_in_run_dir_is_its_value(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAPFILT_SCRATCH_23", str(tmp_path))
    path = tmp_path / "run.yaml"
    path.write_text("run_dir: ${CAPFILT_SCRATCH_23}/run\n" + REST)
    assert load_yaml(path).run_dir == f"{tmp_path}/run"


def test_an_unset_variable_in_storage_options_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CAPFILT_UNSET_KEY_23", raising=False)
    _refused(tmp_path, BASE.format(run=tmp_path / "r") + "storage:\n  options:\n    s3:\n      client_kwargs:\n"
             "        aws_access_key_id: ${CAPFILT_UNSET_KEY_23}\n",
             "storage.options.s3.client_kwargs.aws_access_key_id", "CAPFILT_UNSET_KEY_23 is not set")  # fmt: skip


@pytest.mark.parametrize("name", ["capfilt-on-img2dataset", "demo-quick", "gpu"])
def test_config_takes_a_preset_name(tmp_path: Path, name: str) -> None:
    # refused only by the lock taken here: the name was read as a config
    with run_lock(tmp_path / "held"):
        result = CliRunner().invoke(app, ["run", "--config", name, "--run-dir", str(tmp_path / "held"), "--set", "device=cpu"])
    assert result.exit_code == 1 and "is in use by another capfilt process" in result.stderr, result.stderr


def test_an_unknown_config_lists_the_presets(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["run", "--config", "no-such-preset"])
    assert result.exit_code == 1
    assert "no-such-preset: no such file, and no preset has that name" in result.stderr
    assert "capfilt-on-img2dataset, demo, demo-quick, gpu" in result.stderr


def test_the_shipped_preset_runs_on_any_machine(tmp_path: Path) -> None:
    import torch

    from flows.preflight import preflight

    cfg = load_yaml("capfilt-on-img2dataset", run_dir=str(tmp_path / "run"))
    assert cfg.device == "auto" and cfg.loader_workers == -1
    assert preflight(cfg).device == ("cuda" if torch.cuda.is_available() else "cpu")
