"""The stage commands' options are their config classes' fields: every setting is on the CLI once."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from flows.commands.config_options import build, field_help, options
from tasks.assemble import AssembleConfig
from tasks.caption import CaptionConfig
from tasks.execution import ExecutionConfig
from tasks.filter import FilterConfig


def _fields(cls: type) -> set[str]:
    names = set()
    for f in dataclasses.fields(cls):
        names |= _fields(ExecutionConfig) if f.name == "execution" else {f.name}
    return names


@pytest.mark.parametrize("cls", [CaptionConfig, FilterConfig, AssembleConfig])
def test_every_field_is_an_option_and_builds_back(cls: type) -> None:
    params = options(cls)
    assert {p.name for p in params} == _fields(cls)
    values = {p.name: p.default.default for p in params}  # the options' defaults
    assert build(cls, values) == cls()


def test_help_is_the_fields_own_comment() -> None:
    assert field_help(FilterConfig)["threshold"].startswith("keep when softmax ITM P(match) >= threshold")
    assert "DataLoader processes" in field_help(ExecutionConfig)["num_workers"]


def test_a_bad_value_is_refused_by_the_configs_own_check(tmp_path: Path) -> None:
    args = ["filter", "--input", str(tmp_path), "--output", str(tmp_path / "out"), "--model", str(tmp_path),
            "--threshold", "3"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "threshold must be in [0, 1], got 3.0" in result.output
    assert not (tmp_path / "out").exists()
